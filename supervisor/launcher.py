"""Start one activation process (spawn mode) and know how to kill its process group."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from supervisor.config import Limits, Paths

# Everything an activation sees of the environment; nothing of the supervisor's leaks in.
_BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    # glibc reserves 64 MiB of address space per arena per thread; under RLIMIT_AS that is waste.
    "MALLOC_ARENA_MAX": "2",
}


def make_scratch(paths: Paths, activation: int) -> Path:
    scratch = paths.runtime_dir / "scratch" / str(activation)
    scratch.mkdir(parents=True, mode=0o700)
    return scratch


def remove_scratch(scratch: Path) -> None:
    shutil.rmtree(scratch, ignore_errors=True)


def spawn(paths: Paths, limits: Limits, token: str, scratch: Path) -> subprocess.Popen[bytes]:
    """`python -I -m sandbox_host` in its own session, clean env, scratch cwd, token on stdin."""
    env = dict(_BASE_ENV, HOME=str(scratch), TMPDIR=str(scratch))
    proc = subprocess.Popen(
        [
            paths.python,
            "-I",
            "-m",
            "sandbox_host",
            "--endpoint",
            paths.sandbox_endpoint,
            "--ppid",
            str(os.getpid()),
            "--memory-mib",
            str(limits.memory_mib),
            "--cpu-seconds",
            str(limits.cpu_seconds),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=scratch,
        env=env,
        close_fds=True,
        start_new_session=True,
    )
    assert proc.stdin is not None
    # A 33-byte write to a fresh pipe never blocks.
    proc.stdin.write(token.encode() + b"\n")
    proc.stdin.close()
    for stream in (proc.stdout, proc.stderr):
        assert stream is not None
        os.set_blocking(stream.fileno(), False)
    return proc


def kill_group(pid: int) -> None:
    """SIGKILL the activation's whole process group (it is a session leader: pgid == pid)."""
    if pid <= 0:  # never started; killpg(0) would hit the supervisor's own group
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
