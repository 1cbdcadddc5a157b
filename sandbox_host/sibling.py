"""fork(2) whose child is a child of our parent: clone(CLONE_PARENT), for the nursery's spares.

A spare must be the supervisor's own child (it reaps it, reads its rusage and holds its zombie
while it kills the process group). Forking through a middle process that exits re-parents the
spare too, but that costs a second copy of the page tables and the teardown of a whole address
space on every activation: 1.9 ms of CPU per spare against 0.65 ms for one fork, measured in a
process that imports what the fork server imports.

Python has no clone(), so this calls the system call through ctypes, wrapped in the interpreter's
own fork hooks (`PyOS_BeforeFork` and its pair, as `os.fork` does). The C library's fork also
stores the child's thread id in its thread descriptor (`raise`, `pthread_kill` and friends read
it); CLONE_CHILD_SETTID makes the kernel write it there, at an offset found once at start-up
(`probe`) by comparing a forked child's descriptor with ours. Where anything of that is not
available, `probe` returns None and the caller forks through a middle process as before.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

_CLONE_PARENT = 0x00008000
_CLONE_CHILD_SETTID = 0x01000000
_SIGCHLD = 17
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}
_DESCRIPTOR_SCAN_BYTES = 1024  # the thread descriptor is larger than this in every C library

# PyDLL: the GIL stays held across the call, as os.fork holds it across fork().
_libc = ctypes.PyDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.pthread_self.restype = ctypes.c_void_p
_api = ctypes.pythonapi


class SiblingFork:
    """Forks children of this process's parent. Made by `probe`."""

    def __init__(self, machine: str, tid_address: int) -> None:
        self._nr = _SYS_CLONE[machine]
        self.tid = tid_address  # where the C library keeps the calling thread's id
        self._flags = ctypes.c_ulong(_CLONE_PARENT | _CLONE_CHILD_SETTID | _SIGCHLD)
        self._aarch64 = machine == "aarch64"  # its clone takes tls before child_tid

    def fork(self) -> int:
        """As os.fork(): 0 in the child, the child's pid here; OSError when clone fails."""
        null, tid = ctypes.c_void_p(0), ctypes.c_void_p(self.tid)
        _api.PyOS_BeforeFork()
        if self._aarch64:
            pid = _libc.syscall(self._nr, self._flags, null, null, null, tid)
        else:
            pid = _libc.syscall(self._nr, self._flags, null, null, tid, null)
        if pid == 0:
            _api.PyOS_AfterFork_Child()
            return 0
        err = ctypes.get_errno()
        _api.PyOS_AfterFork_Parent()
        if pid < 0:
            raise OSError(err, f"clone(CLONE_PARENT): {os.strerror(err)}")
        return int(pid)


def probe() -> SiblingFork | None:
    """A SiblingFork for this process, or None where it cannot work here (another machine, a C
    library that keeps no thread id, a process with threads, or clone refused). Costs one
    ordinary fork, and one sibling fork to check the result."""
    machine = platform.machine()
    if machine not in _SYS_CLONE or threading.active_count() != 1:
        return None
    try:
        base = _libc.pthread_self()
    except AttributeError:
        return None
    mine = _offsets(base, threading.get_native_id())
    if not mine:
        return None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the C library's own fork stores our new tid: see where
        os.close(r)
        found = _offsets(base, threading.get_native_id()) & mine
        os.write(w, ",".join(map(str, sorted(found))).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    offsets = [int(x) for x in answer.split(",") if x]
    if len(offsets) != 1:
        return None
    sibling = SiblingFork(machine, base + offsets[0])
    return sibling if _works(sibling) else None


def _offsets(base: int, tid: int) -> set[int]:
    words = (ctypes.c_int32 * (_DESCRIPTOR_SCAN_BYTES // 4)).from_address(base)
    return {i * 4 for i, value in enumerate(words) if value == tid}


def _works(sibling: SiblingFork) -> bool:
    """Fork one sibling and check it is our parent's child with its own tid recorded."""
    parent = os.getppid()
    r, w = os.pipe()
    try:
        pid = sibling.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return False
    if pid == 0:
        me = os.getpid()
        ok = os.getppid() == parent and threading.get_native_id() == me
        os.write(w, b"1" if ok and ctypes.c_int32.from_address(sibling.tid).value == me else b"0")
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        ok = f.read() == b"1"
    # Our parent reaps it (it is its child): nothing to wait for here.
    return ok
