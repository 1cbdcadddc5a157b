"""Start one activation process (spawn mode) and know how to kill its process group."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import IO

import msgspec

from supervisor.config import Limits, Paths

# Everything an activation sees of the environment; nothing of the supervisor's leaks in.
_BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    # glibc reserves 64 MiB of address space per arena per thread; under RLIMIT_AS that is waste.
    "MALLOC_ARENA_MAX": "2",
}


class Sandbox(msgspec.Struct, frozen=True):
    """The isolation an activation applies to itself (`sandbox_host.__main__` reads it)."""

    memory_mib: int
    cpu_seconds: int
    max_pids: int
    scratch: str
    uid: int | None = None  # drop to this uid (root only)
    gid: int | None = None  # and this group, shared by the tenant's activations
    network_namespace: bool = False  # unshare a private network namespace (root only)
    landlock: bool = False
    read_only: tuple[str, ...] = ()  # on top of the interpreter's own paths
    read_write: tuple[str, ...] = ()  # on top of the scratch dir
    seccomp: bool = False
    allow_inet: bool = False


def sandbox_for(
    on: dict[str, bool], limits: Limits, scratch: Path, uid: int | None, gid: int | None
) -> Sandbox:
    """The sandbox of one activation of a tenant, given which layers are enabled."""
    return Sandbox(
        memory_mib=limits.memory_mib,
        cpu_seconds=limits.cpu_seconds,
        max_pids=limits.max_pids,
        scratch=str(scratch),
        uid=uid,
        gid=gid,
        network_namespace=on["network"] and not limits.network,
        landlock=on["landlock"],
        read_only=limits.readable_paths,
        read_write=limits.writable_paths,
        seccomp=on["seccomp"],
        allow_inet=limits.network,
    )


def make_scratch(paths: Paths, activation: int, uid: int | None, gid: int | None) -> Path:
    """A private directory for one activation: 0700, owned by its sandbox uid when it has one."""
    scratch = paths.runtime_dir / "scratch" / str(activation)
    scratch.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    scratch.mkdir(mode=0o700)
    if uid is not None and gid is not None:
        os.chown(scratch, uid, gid)
    return scratch


def remove_scratch(scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)


def spawn(paths: Paths, limits: Limits, sandbox: Sandbox) -> subprocess.Popen[bytes]:
    """`python -I -m sandbox_host` in its own session with a clean env and the scratch as cwd.

    The child blocks reading its token from stdin: the caller first puts it in its cgroups,
    then calls `send_token`, so no line of it runs outside its limits for long.
    """
    env = dict(_BASE_ENV, HOME=sandbox.scratch, TMPDIR=sandbox.scratch)
    proc = subprocess.Popen(
        [
            limits.python or paths.python, "-I", "-m", "sandbox_host",
            "--endpoint", paths.sandbox_endpoint,
            "--ppid", str(os.getpid()),
            "--sandbox", msgspec.json.encode(sandbox).decode(),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=sandbox.scratch,
        env=env,
        close_fds=True,
        start_new_session=True,
    )  # fmt: skip
    for stream in (proc.stdout, proc.stderr):
        assert stream is not None
        os.set_blocking(stream.fileno(), False)
    return proc


def send_token(proc: subprocess.Popen[bytes], token: str) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # it died already; the reaper will say why
        proc.stdin.write(token.encode() + b"\n")  # 33 bytes into a fresh pipe never block
        proc.stdin.close()


def kill_group(pid: int) -> None:
    """SIGKILL the activation's whole process group (it is a session leader: pgid == pid)."""
    if pid <= 0:  # never started; killpg(0) would hit the supervisor's own group
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class ZygoteError(Exception):
    """The fork server is gone or did not answer; the caller falls back to spawn mode."""


class ForkedProcess:
    """What the supervisor needs of an activation forked by the zygote (a Popen look-alike)."""

    def __init__(self, pid: int, stdin: int, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.stdin: IO[bytes] | None = os.fdopen(stdin, "wb", buffering=0)
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
    """The supervisor's handle on one fork server (`sandbox_host.zygote`)."""

    def __init__(self, python: str) -> None:
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
            ],
            stdin=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            env=dict(_BASE_ENV),
            start_new_session=True,
            close_fds=True,
        )
        theirs.close()
        self.control = ours
        self.control.settimeout(5.0)
        self.next_id = 0

    def spawn(self, paths: Paths, sandbox: Sandbox) -> ForkedProcess:
        pipes = [os.pipe() for _ in range(3)]
        stdin_r, stdin_w = pipes[0]
        (out_r, out_w), (err_r, err_w) = pipes[1], pipes[2]
        self.next_id += 1
        request = {
            "id": self.next_id,
            "endpoint": paths.sandbox_endpoint,
            "ppid": os.getpid(),
            "scratch": sandbox.scratch,
            "env": dict(_BASE_ENV, HOME=sandbox.scratch, TMPDIR=sandbox.scratch),
            "sandbox": msgspec.to_builtins(sandbox),
        }
        try:
            socket.send_fds(self.control, [msgspec.json.encode(request)], [stdin_r, out_w, err_w])
            reply = msgspec.json.decode(self.control.recv(4096))
        except (OSError, msgspec.DecodeError) as exc:
            for fd in (stdin_r, stdin_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            raise ZygoteError(f"fork server did not answer: {exc}") from None
        for fd in (stdin_r, out_w, err_w):
            os.close(fd)
        if reply.get("id") != self.next_id or not reply.get("pid"):
            for fd in (stdin_w, out_r, err_r):
                os.close(fd)
            raise ZygoteError(f"fork server answered {reply!r}")
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        return ForkedProcess(int(reply["pid"]), stdin_w, out_r, err_r)

    def close(self) -> None:
        self.control.close()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
