"""Start one activation process (spawn mode) and know how to kill its process group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import msgspec

from protocol.launch import Sandbox
from supervisor.config import Limits, Paths

__all__ = ["BASE_ENV", "Sandbox", "sandbox_for", "spawn"]  # Sandbox: defined in protocol.launch

# Everything an activation sees of the environment; nothing of the supervisor's leaks in.
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    # glibc reserves 64 MiB of address space per arena per thread; under RLIMIT_AS that is waste.
    "MALLOC_ARENA_MAX": "2",
}


def sandbox_for(
    on: dict[str, bool], limits: Limits, scratch: str, uid: int | None, gid: int | None
) -> Sandbox:
    """The sandbox of one activation of a tenant, given which layers are enabled."""
    return Sandbox(
        memory_mib=limits.memory_mib,
        cpu_seconds=limits.cpu_seconds,
        max_pids=limits.max_pids,
        scratch=scratch,
        uid=uid,
        gid=gid,
        network_namespace=on["network"] and not limits.network,
        ipc_namespace=on["network"],  # the namespace layer: every activation, network or not
        landlock=on["landlock"],
        read_only=limits.readable_paths,
        read_write=limits.writable_paths,
        seccomp=on["seccomp"],
        allow_inet=limits.network,
    )


def scratch_root(paths: Paths) -> Path:
    return paths.runtime_dir / "scratch"


def scratch_path(paths: Paths, tenant: str, activation: int) -> str:
    """In the tenant's dir: its tmpfs, when the disk layer is on (see `supervisor.disk`). A
    string, as the launch and reap paths use it: pathlib's objects cost more than the syscalls."""
    return f"{paths.runtime_dir}/scratch/{tenant}/{activation}"


def make_scratch(
    paths: Paths, tenant: str, activation: int, uid: int | None, gid: int | None
) -> str:
    """A private directory for one activation: 0700, owned by its sandbox uid when it has one.
    Its tenant's dir exists already (`disk.ScratchSpace.prepare`)."""
    scratch = scratch_path(paths, tenant, activation)
    os.mkdir(scratch, 0o700)
    if uid is not None and gid is not None:
        os.chown(scratch, uid, gid)
    return scratch


def spawn(paths: Paths, limits: Limits, sandbox: Sandbox) -> subprocess.Popen[bytes]:
    """`python -I -m sandbox_host` in its own session with a clean env and the scratch as cwd.

    The child blocks reading its token from stdin: the caller first puts it in its cgroups,
    then calls `send_token`, so no line of it runs outside its limits for long.
    """
    env = dict(BASE_ENV, HOME=sandbox.scratch, TMPDIR=sandbox.scratch)
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


def kill_uid(uid: int) -> None:
    """SIGKILL every process running as sandbox uid `uid`, wherever it went (another session,
    a double fork): what an activation leaves behind when there are no cgroups to find it by.

    A short-lived child takes the uid and signals everything of that uid (`kill(-1)`), which the
    kernel limits to processes of the same uid: the only race-free way to find them all."""
    if uid <= 0:
        return
    pid = os.fork()
    if pid == 0:  # only async-signal-safe work here: the parent has ZeroMQ's threads
        try:
            os.setresgid(65534, 65534, 65534)
            os.setgroups([])
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def kill_group(pid: int) -> None:
    """SIGKILL the activation's whole process group (it is a session leader: pgid == pid)."""
    if pid <= 0:  # never started; killpg(0) would hit the supervisor's own group
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
