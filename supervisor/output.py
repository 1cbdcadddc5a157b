"""Tenant output: read each activation's stdout/stderr pipes without blocking and log every line
with tenant, instance and step. Activations' partial lines and stderr tails live on them."""

from __future__ import annotations

import os

import zmq

from supervisor.activation import Activation

MAX_OUTPUT_BYTES = 1 << 20  # tenant output logged per activation; the rest is counted, not logged
STDERR_TAIL_BYTES = 8192  # kept for crash reports


class OutputCapture:
    def __init__(self, poller: zmq.Poller) -> None:
        self.poller = poller
        self.by_fd: dict[int, tuple[Activation, str]] = {}

    def watch(self, act: Activation) -> None:
        assert act.proc is not None and act.proc.stdout and act.proc.stderr
        for stream, pipe in (("stdout", act.proc.stdout), ("stderr", act.proc.stderr)):
            self.by_fd[pipe.fileno()] = (act, stream)
            self.poller.register(pipe.fileno(), zmq.POLLIN)

    def ready(self, fds: list[object]) -> None:
        """Read one chunk from each ready pipe (the loop comes back for more)."""
        for fd in fds:
            if isinstance(fd, int) and fd in self.by_fd:
                self.read(fd, everything=False)

    def drain(self, act: Activation) -> None:
        """Log everything the activation has written so far."""
        for fd in [fd for fd, (a, _) in self.by_fd.items() if a is act]:
            self.read(fd, everything=True)

    def forget(self, act: Activation) -> None:
        for fd in [fd for fd, (a, _) in self.by_fd.items() if a is act]:
            self.poller.unregister(fd)
            del self.by_fd[fd]

    def read(self, fd: int, everything: bool) -> None:
        act, stream = self.by_fd[fd]
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:  # EOF: flush what is left and stop watching this fd
                rest = act.partial.pop(fd, b"")
                if rest:
                    _log(act, stream, rest)
                self.poller.unregister(fd)
                del self.by_fd[fd]
                return
            if stream == "stderr":
                act.stderr_tail = (act.stderr_tail + chunk)[-STDERR_TAIL_BYTES:]
            *lines, rest = (act.partial.pop(fd, b"") + chunk).split(b"\n")
            for line in lines:
                _log(act, stream, line)
            if rest:
                act.partial[fd] = rest[-65536:]
            if not everything:
                return


def _log(act: Activation, stream: str, line: bytes) -> None:
    act.output_bytes += len(line)
    if act.output_bytes > MAX_OUTPUT_BYTES:
        return
    act.log.info(
        "tenant.output",
        seq=act.seq,
        step=act.step,
        stream=stream,
        line=line.decode("utf-8", "replace"),
    )
