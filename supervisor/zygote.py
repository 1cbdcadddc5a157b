"""The supervisor's handle on the fork server (`sandbox_host.zygote`), used without blocking.

`request` sends one fork request with the activation's three pipe ends attached and returns at
once; the reply (the new pid) arrives on `fileno()`, which the loop polls, and `replies` turns it
into a `ForkedProcess`. The loop never waits for a fork, so one slow fork does not hold up the
results of other activations.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import time
from typing import IO

import msgspec

from protocol.launch import ForkReply, ForkRequest, Sandbox
from supervisor.config import Paths
from supervisor.launcher import BASE_ENV

REPLY_TIMEOUT_S = 5.0  # a request unanswered this long means the fork server is stuck


class ZygoteError(Exception):
    """The fork server is gone, stuck or talking nonsense; the caller restarts it or spawns."""


class ForkedProcess:
    """What the supervisor needs of an activation forked by the zygote (a Popen look-alike).
    It has its token already, so there is no stdin to write to."""

    stdin: IO[bytes] | None = None

    def __init__(self, pid: int, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.stdout: IO[bytes] | None = os.fdopen(stdout, "rb", buffering=0)
        self.stderr: IO[bytes] | None = os.fdopen(stderr, "rb", buffering=0)
        self.returncode: int | None = None

    def wait(self) -> int:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode or 0


class Zygote:
    """One fork server process and the requests it has not answered yet."""

    def __init__(self, python: str, spares: int = 2) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        os.set_inheritable(theirs.fileno(), True)
        self.proc = subprocess.Popen(
            [
                python,
                "-I",
                "-m",
                "sandbox_host.zygote",
                "--ppid",
                str(os.getpid()),
                "--control-fd",
                str(theirs.fileno()),
                "--spares",
                str(spares),
            ],
            stdin=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            env=dict(BASE_ENV),
            start_new_session=True,
            close_fds=True,
        )
        theirs.close()
        self.control = ours
        self.control.setblocking(False)  # the loop polls it; a full send buffer is waited out
        self.next_id = 0
        self.last_used = time.monotonic()  # the last request, for stopping an idle fork server
        # request id → (sent at, our ends of the activation's stdout and stderr pipes)
        self.pending: dict[int, tuple[float, int, int]] = {}

    def fileno(self) -> int:
        return self.control.fileno()

    def request(self, paths: Paths, sandbox: Sandbox, token: str, tenant: str) -> int:
        """Ask for one activation; returns the request id its reply will carry. The child gets
        its token with the request (this socket is the supervisor's and the fork server's
        alone) and joins `sandbox.cgroup_procs` itself, so it starts without waiting for us.
        Without network it enters `tenant`'s network namespace, which the fork server keeps."""
        (stdin_r, stdin_w), (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe(), os.pipe()
        self.next_id += 1
        request = ForkRequest(
            id=self.next_id,
            endpoint=paths.sandbox_endpoint,
            ppid=os.getpid(),
            token=token,
            env=dict(BASE_ENV, HOME=sandbox.scratch, TMPDIR=sandbox.scratch),
            sandbox=sandbox,
            netns=tenant if sandbox.network_namespace else None,
        )
        os.close(stdin_w)  # its stdin reads as empty
        try:
            self._send(msgspec.json.encode(request), [stdin_r, out_w, err_w])
        except OSError as exc:
            for fd in (out_r, err_r):
                os.close(fd)
            raise ZygoteError(f"could not send to the fork server: {exc}") from None
        finally:
            for fd in (stdin_r, out_w, err_w):  # the zygote holds its own copies now
                os.close(fd)
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        self.last_used = time.monotonic()
        self.pending[self.next_id] = (self.last_used, out_r, err_r)
        return self.next_id

    def _send(self, data: bytes, fds: list[int]) -> None:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while True:
            try:
                socket.send_fds(self.control, [data], fds)
                return
            except BlockingIOError:  # a backlog of requests: wait for room, but not forever
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [self.control], [], left)[1]:
                    raise TimeoutError("the fork server is not taking requests") from None

    def replies(self) -> list[tuple[int, ForkedProcess]]:
        """Every answer that has arrived, without waiting. Raises ZygoteError when the fork
        server has gone (end of stream) or sent something that is not an answer."""
        out: list[tuple[int, ForkedProcess]] = []
        while True:
            try:
                data = self.control.recv(4096)
            except BlockingIOError:
                return out
            except OSError as exc:
                raise ZygoteError(f"fork server connection failed: {exc}") from None
            if not data:
                raise ZygoteError(f"fork server exited (status {self.proc.poll()})")
            try:
                reply = msgspec.json.decode(data, type=ForkReply)
            except msgspec.DecodeError:
                raise ZygoteError(f"fork server answered {data[:200]!r}") from None
            rid, pid = reply.id, reply.pid
            entry = self.pending.pop(rid, None)
            if entry is None or pid <= 0:
                raise ZygoteError(f"fork server answered {reply!r} to no open request")
            _, out_r, err_r = entry
            out.append((rid, ForkedProcess(pid, out_r, err_r)))

    def stuck(self, mono: float) -> bool:
        """True when the oldest open request has waited longer than REPLY_TIMEOUT_S. Requests
        are kept in the order they were sent, so the oldest is the first."""
        oldest = next(iter(self.pending.values()), None)
        return oldest is not None and mono - oldest[0] > REPLY_TIMEOUT_S

    def close(self) -> list[int]:
        """Kill the fork server; returns the ids of the requests it never answered."""
        abandoned = list(self.pending)
        for _, *fds in self.pending.values():
            for fd in fds:
                os.close(fd)
        self.pending.clear()
        self.control.close()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        return abandoned
