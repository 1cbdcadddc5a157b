"""Tenant output: read each activation's stdout/stderr pipes without blocking and log every line
with tenant, instance and step, at a bounded cost per loop iteration and per activation.

A tenant controls what arrives on these pipes, and a process it left behind (setsid, double
fork) can keep writing after its activation has reported. So nothing here loops until a pipe is
empty: each iteration reads at most one chunk per pipe and logs at most a fixed number of lines,
fairly across activations; an activation's output beyond its caps (bytes *and* lines: a flood of
empty lines costs a log line each) is dropped with one warning, and its pipes are then read only
once per iteration and thrown away, so a flood neither fills the log nor keeps the loop busy.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

import zmq

from supervisor.activation import SETTLED, Activation

MAX_OUTPUT_BYTES = 1 << 20  # logged per activation, newlines counted; the rest is dropped
MAX_OUTPUT_LINES = 10_000  # logged per activation
MAX_LINE_BYTES = 16_384  # a longer line is logged in pieces of this size
READ_BYTES = 65_536  # one read per pipe per iteration (a pipe's default capacity)
QUEUED_BYTES = 4 * READ_BYTES  # read but not yet logged, per pipe: beyond it the writer waits
LINES_PER_ITERATION = 1000  # logged per loop iteration, across all activations
LINES_PER_TURN = 100  # logged for one activation before the next one's turn
DRAIN_READS = 4  # chunks read from each pipe before one of the activation's messages
STDERR_TAIL_BYTES = 8192  # kept for crash reports


@dataclass
class _Pipe:
    act: Activation
    stream: str  # stdout | stderr
    # Read, not yet logged: (seq, step) as they were when the bytes were read, and the bytes.
    queue: deque[tuple[int | None, str | None, bytes]] = field(default_factory=deque)
    queued: int = 0
    partial: bytes = b""  # an unterminated line
    throttled: bool = False  # over its activation's caps: read once an iteration, discarded
    quiet: bool = False  # its activation is settled: not polled, read when it is reaped
    eof: bool = False


class OutputCapture:
    def __init__(self, poller: zmq.Poller) -> None:
        self.poller = poller
        self.pipes: dict[int, _Pipe] = {}  # fd → pipe, while the fd is open
        self.leftover: deque[_Pipe] = deque()  # forgotten activations' unlogged lines
        self.throttled: set[int] = set()  # fds of throttled pipes: read every iteration
        self.turn = 0  # whose lines come first this iteration

    def watch(self, act: Activation) -> None:
        assert act.proc is not None and act.proc.stdout and act.proc.stderr
        for stream, pipe in (("stdout", act.proc.stdout), ("stderr", act.proc.stderr)):
            self.pipes[pipe.fileno()] = _Pipe(act, stream)
            self.poller.register(pipe.fileno(), zmq.POLLIN)
        if act.state == SETTLED:  # it reported before its fork server said it exists
            self.settled(act)

    def busy(self) -> bool:
        """Lines wait to be logged: the loop should come back at once."""
        return bool(self.leftover) or any(p.queue for p in self.pipes.values())

    def ready(self, fds: list[object]) -> None:
        """One iteration: one read from each ready pipe (and each throttled one), then log a
        bounded number of lines, round robin across activations."""
        for fd in fds:
            if isinstance(fd, int) and (pipe := self.pipes.get(fd)) and not pipe.throttled:
                self._read(fd, pipe)
        for fd in list(self.throttled):
            self._read(fd, self.pipes[fd])
        self._log_lines()

    def drain(self, act: Activation) -> None:
        """Read what the activation has written so far (a bounded amount), attributed to its
        current step: called before one of its messages changes that step. Logged later."""
        for fd, pipe in list(self.pipes.items()):
            if pipe.act is act:
                for _ in range(DRAIN_READS):
                    if pipe.eof or not self._read(fd, pipe):
                        break

    def settled(self, act: Activation) -> None:
        """The activation's fate is decided and its process is about to exit: stop polling its
        pipes, whose end of file would each wake the loop once more just before the exit does.
        What it writes until it is reaped is read then (`drain`, at most DRAIN_READS chunks a
        pipe, as before any message), and a straggler it left is killed with it.

        Only a pipe found empty goes quiet: one that still holds output (a backlog not logged
        yet) stays polled, or the exiting process could block flushing its last partial line
        into it, unread, until the settled grace kills it and the line is lost."""
        for fd, pipe in list(self.pipes.items()):
            if pipe.act is not act or pipe.throttled or pipe.quiet:
                continue
            if pipe.queued >= QUEUED_BYTES or self._read(fd, pipe):
                continue  # more to read: polled until it is drained, as before
            if fd in self.pipes:  # empty, not at its end (`_read` closes a pipe at its end)
                self.poller.unregister(fd)
                pipe.quiet = True

    def forget(self, act: Activation) -> None:
        """The activation is reaped: stop watching its pipes. Lines read but not logged yet are
        logged over the next iterations, within the same per-iteration budget."""
        for fd, pipe in list(self.pipes.items()):
            if pipe.act is act:
                self._close(fd, pipe)

    # ------------------------------------------------------------------ internals

    def _read(self, fd: int, pipe: _Pipe) -> bool:
        """One read; False when nothing more can be read now (empty, full queue, EOF)."""
        if pipe.queued >= QUEUED_BYTES and not pipe.throttled:
            return False  # the writer waits until we have logged what we hold
        try:
            chunk = os.read(fd, READ_BYTES)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            pipe.eof = True
            self._close(fd, pipe)
            return False
        act = pipe.act
        if pipe.stream == "stderr":
            act.stderr_tail = (act.stderr_tail + chunk)[-STDERR_TAIL_BYTES:]
        if pipe.throttled:
            act.output_dropped += len(chunk)
            return True
        lines = chunk.count(b"\n")
        if (
            act.output_bytes + len(chunk) > MAX_OUTPUT_BYTES
            or act.output_lines + lines > MAX_OUTPUT_LINES
        ):
            self._over_cap(act, chunk)
            return True
        act.output_bytes += len(chunk)
        act.output_lines += lines
        pipe.queue.append((act.seq, act.step, chunk))
        pipe.queued += len(chunk)
        return True

    def _over_cap(self, act: Activation, chunk: bytes) -> None:
        """Drop this chunk and everything after it; say so once."""
        act.output_dropped += len(chunk)
        for fd, pipe in self.pipes.items():
            if pipe.act is act and not pipe.throttled:
                pipe.throttled = True
                self.throttled.add(fd)
                if not pipe.quiet:
                    self.poller.unregister(fd)
        act.log.warning(
            "tenant.output_dropped",
            seq=act.seq,
            step=act.step,
            reason="activation output over its limit",
            max_bytes=MAX_OUTPUT_BYTES,
            max_lines=MAX_OUTPUT_LINES,
        )

    def _close(self, fd: int, pipe: _Pipe) -> None:
        if not pipe.throttled and not pipe.quiet:
            self.poller.unregister(fd)
        self.throttled.discard(fd)
        del self.pipes[fd]
        last = pipe.queue[-1][2] if pipe.queue else pipe.partial
        if last and not last.endswith(b"\n") and not pipe.throttled:
            pipe.queue.append((pipe.act.seq, pipe.act.step, b"\n"))  # end the last line
        if pipe.queue:
            self.leftover.append(pipe)

    def _log_lines(self) -> None:
        pipes = [p for p in self.pipes.values() if p.queue] + list(self.leftover)
        if not pipes:
            return
        self.turn = (self.turn + 1) % len(pipes)
        budget = LINES_PER_ITERATION
        for pipe in pipes[self.turn :] + pipes[: self.turn]:
            budget -= _log_some(pipe, min(LINES_PER_TURN, budget))
            if budget <= 0:
                break
        self.leftover = deque(p for p in self.leftover if p.queue)


def _log_some(pipe: _Pipe, budget: int) -> int:
    """Log up to `budget` complete lines from the pipe's queue; returns how many."""
    done = 0
    while pipe.queue and done < budget:
        seq, step, chunk = pipe.queue[0]
        data = pipe.partial + chunk
        start = 0
        while done < budget:
            end = data.find(b"\n", start)
            if end < 0:
                break
            _log(pipe, seq, step, data[start:end])
            done += 1
            start = end + 1
        rest = data[start:]
        if done >= budget and b"\n" in rest:
            # Budget spent mid-chunk: keep the rest at the head, under the same attribution.
            pipe.queue[0] = (seq, step, rest)
            pipe.queued -= len(chunk) - len(rest)
            pipe.partial = b""
            return done
        pipe.queue.popleft()
        pipe.queued -= len(chunk)
        while len(rest) > MAX_LINE_BYTES:  # an endless line: log it in pieces
            _log(pipe, seq, step, rest[:MAX_LINE_BYTES])
            rest = rest[MAX_LINE_BYTES:]
            done += 1
        pipe.partial = rest
    return done


def _log(pipe: _Pipe, seq: int | None, step: str | None, line: bytes) -> None:
    pipe.act.log.info(
        "tenant.output",
        seq=seq,
        step=step,
        stream=pipe.stream,
        line=line.decode("utf-8", "replace"),
    )
