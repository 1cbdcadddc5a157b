"""Process limits an activation applies to itself before it touches any tenant byte."""

from __future__ import annotations

import ctypes
import os
import resource
import signal

from protocol.launch import ExitCode

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl  # noqa: B018 -- looked up now, in the fork server, not in each activation


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed: {os.strerror(err)}")


def apply_rlimits(
    *,
    memory_mib: int,
    cpu_seconds: int,
    max_processes: int | None = None,
    max_files: int = 256,
    max_file_mib: int = 64,
) -> None:
    """Address space, CPU seconds (soft → SIGXCPU, hard a second later → SIGKILL), files, core."""
    mem = memory_mib * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))
    size = max_file_mib * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if max_processes is not None:
        # Counted per uid, so only meaningful when this activation has a uid of its own.
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))


def set_name(name: str) -> None:
    """The process name `ps` and `top` show (at most 15 bytes): the fork server's processes all
    share its command line, and this tells a nursery, a spare and an activation apart."""
    if _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NAME) failed: {os.strerror(err)}")


def no_new_privs() -> None:
    """setuid binaries and file capabilities can no longer raise this process's privileges."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def die_with_parent(expected_parent: int) -> None:
    """SIGKILL this process when the supervisor dies; exit now if it already has.

    Set after any uid change (a uid change clears it) and re-check the parent right after, because
    the parent may have died before the prctl took effect.
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_parent:
        os._exit(ExitCode.ORPHANED)
