"""OS isolation an activation applies to itself before it loads any tenant byte.

Order matters and is fixed by `activation.run`: (as root) a private network namespace, then a
private IPC namespace → Landlock → drop uid/gid → parent-death signal → rlimits → connect →
seccomp (synchronised to every thread).
Each function raises OSError when the kernel refuses; the supervisor decided beforehand which
layers this host supports, so a failure here is a real error and the activation exits.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys
from collections.abc import Iterable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000

# --------------------------------------------------------------------------- network namespace


def leave_network() -> None:
    """A private network namespace: only a loopback interface, and it is down."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


def enter_network(fd: int) -> None:
    """Join the network namespace `fd` refers to (a tenant's, kept by the fork server)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def leave_ipc() -> None:
    """A private IPC namespace: no SysV object or POSIX message queue of anyone else is visible,
    and the kernel destroys what is left in it when its last process exits."""
    if _libc.unshare(CLONE_NEWIPC) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWIPC): {os.strerror(err)}")


# --------------------------------------------------------------------------- Landlock

_SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_TRUNCATE = 1 << 14
FS_IOCTL_DEV = 1 << 15
_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
READ_ONLY = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is unavailable."""
    abi = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    return max(0, int(abi))


def _handled_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: execute … make_sym
    if abi >= 2:
        rights |= 1 << 13  # refer
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def restrict_filesystem(read_only: Iterable[str], read_write: Iterable[str]) -> int:
    """Allow reading `read_only` and everything under `read_write`; deny the rest of the tree.

    Applies to this thread and every thread or process it creates later, so it must run before
    any thread exists. Returns the ABI used.
    """
    abi = landlock_abi()
    if abi < 1:
        raise OSError(38, "Landlock is not supported by this kernel")
    handled = _handled_rights(abi)
    attr = struct.pack("=Q", handled)
    fd = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, attr, len(attr), 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        for paths, rights in ((read_only, READ_ONLY), (read_write, handled)):
            for path in paths:
                _allow(int(fd), path, rights & handled)
        if _libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, int(fd), 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(int(fd))
    return abi


def _allow(ruleset: int, path: str, rights: int) -> None:
    try:
        target = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a path this host lacks (say /lib64) grants nothing
    try:
        if not os.path.isdir(path):
            rights &= _FILE_RIGHTS  # directory rights on a file are EINVAL
        attr = struct.pack("=Qi", rights, target)  # landlock_path_beneath_attr is packed
        if _libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, attr, 0):
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_add_rule({path}): {os.strerror(err)}")
    finally:
        os.close(target)


def default_read_only() -> list[str]:
    """What an interpreter needs to run: its prefix, import path, system libraries, a few files."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable)}
    paths.update(p for p in sys.path if p and os.path.isabs(p))
    paths.update(
        [
            "/usr", "/lib", "/lib64", "/bin", "/sbin",
            "/etc/ld.so.cache", "/etc/localtime", "/etc/ssl", "/etc/ca-certificates",
            "/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/passwd", "/etc/group",
            "/dev/zero", "/dev/urandom", "/dev/random", "/proc/self",
        ]
    )  # fmt: skip
    return sorted(paths)


# --------------------------------------------------------------------------- identity


def drop_privileges(uid: int, gid: int) -> None:
    """Become the activation's own sandbox user; no supplementary groups; no way back."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError(1, "privilege drop did not take")


# --------------------------------------------------------------------------- seccomp

_ARCH = {
    # machine: (AUDIT_ARCH, socket, seccomp, io_uring_setup)
    "x86_64": (0xC000003E, 41, 317, 425),
    "aarch64": (0xC00000B7, 198, 277, 425),
}
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_EPERM = 0x00050000 | 1
_LD_ABS_W = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10


def seccomp_supported() -> bool:
    return platform.machine() in _ARCH and os.path.exists("/proc/self/status")


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def deny_new_sockets(*, allow_inet: bool) -> None:
    """From now on `socket()` fails with EPERM (or allows only IPv4/IPv6 when the tenant may use
    the network), and io_uring is unavailable. Installed on every thread at once (TSYNC), after
    the supervisor connection exists, so not even a UNIX socket to the API can be opened.
    """
    arch, nr_socket, nr_seccomp, nr_io_uring = _ARCH[platform.machine()]
    prog = [
        _insn(_LD_ABS_W, 0, 0, 4),  # seccomp_data.arch
        _insn(_JEQ_K, 1, 0, arch),
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),  # another ABI (i386, x32 entry): never ours
        _insn(_LD_ABS_W, 0, 0, 0),  # seccomp_data.nr
        _insn(_JGE_K, 0, 1, 0x40000000),  # x32 syscall numbers
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),
        _insn(_JEQ_K, 0, 1, nr_io_uring),
        _insn(_RET_K, 0, 0, _RET_EPERM),
        _insn(_JEQ_K, 1, 0, nr_socket),
        _insn(_RET_K, 0, 0, _RET_ALLOW),
    ]
    if allow_inet:
        prog += [
            _insn(_LD_ABS_W, 0, 0, 16),  # args[0], low 32 bits: the address family
            _insn(_JEQ_K, 2, 0, AF_INET),
            _insn(_JEQ_K, 1, 0, AF_INET6),
            _insn(_RET_K, 0, 0, _RET_EPERM),
            _insn(_RET_K, 0, 0, _RET_ALLOW),
        ]
    else:
        prog.append(_insn(_RET_K, 0, 0, _RET_EPERM))
    code = b"".join(prog)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("=HxxxxxxQ", len(prog), ctypes.addressof(buf))
    rc = _libc.syscall(nr_seccomp, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC, fprog)
    if rc != 0:
        err = ctypes.get_errno() if rc < 0 else 1
        raise OSError(err, f"seccomp(SET_MODE_FILTER, TSYNC): {os.strerror(err)} (rc {rc})")
