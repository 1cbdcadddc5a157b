"""OS isolation an activation applies to itself before it loads any tenant byte.

Order matters and is fixed by `activation.run`: (as root) a private network namespace, then a
private IPC namespace → Landlock → drop uid/gid (or, root without a sandbox uid, every
capability) → parent-death signal → rlimits → connect → seccomp (synchronised to every thread).
Each function raises OSError when the kernel refuses; the supervisor decided beforehand which
layers this host supports, so a failure here is a real error and the activation exits.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import sys
from collections.abc import Iterable, Mapping
from typing import NamedTuple

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# ctypes looks a function up on its first call; do it here, at import in the fork server, and
# not again in every activation.
for _name in ("unshare", "setns", "prctl", "capset"):
    getattr(_libc, _name)

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


class Target(NamedTuple):
    """A path opened (O_PATH) ahead of time for a Landlock rule, and whether it is a directory."""

    fd: int
    is_dir: bool


def open_targets(paths: Iterable[str], lowest_fd: int) -> dict[str, Target]:
    """O_PATH fds for `paths`, numbered from `lowest_fd` up (the paths this host lacks left out).
    The fork server's nursery opens the interpreter's read-only paths once, so that each of its
    activations only adds rules: about 80 system calls fewer per activation."""
    targets = {}
    for path in paths:
        if path == "/proc" or path.startswith("/proc/"):
            continue  # /proc/self is the opener's: each activation opens its own
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest_fd)
            targets[path] = Target(high, stat.S_ISDIR(os.fstat(high).st_mode))
        finally:
            os.close(fd)
    return targets


def restrict_filesystem(
    read_only: Iterable[str], read_write: Iterable[str], opened: Mapping[str, Target] | None = None
) -> int:
    """Allow reading `read_only` and everything under `read_write`; deny the rest of the tree.
    `opened`: targets opened ahead of time (`open_targets`); the caller closes them.

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
                if opened is not None and (target := opened.get(path)) is not None:
                    _add_rule(int(fd), path, target, rights & handled)
                else:
                    _allow(int(fd), path, rights & handled)
        if _libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, int(fd), 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(int(fd))
    return abi


def _allow(ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a path this host lacks (say /lib64) grants nothing
    try:
        # What was opened, not the path again.
        _add_rule(ruleset, path, Target(fd, stat.S_ISDIR(os.fstat(fd).st_mode)), rights)
    finally:
        os.close(fd)


def _add_rule(ruleset: int, path: str, target: Target, rights: int) -> None:
    if not target.is_dir:
        rights &= _FILE_RIGHTS  # directory rights on a file are EINVAL
    attr = struct.pack("=Qi", rights, target.fd)  # landlock_path_beneath_attr is packed
    if _libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, attr, 0):
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_add_rule({path}): {os.strerror(err)}")


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


# --------------------------------------------------------------------------- capabilities

_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Each bit with its _LOCKED twin: uid 0 gains no capability by exec (NOROOT), a uid change keeps
# none and grants none (NO_SETUID_FIXUP, KEEP_CAPS locked off), and ambient ones can't be raised.
_SECBITS_NO_ROOT = (
    (1 << 0) | (1 << 1)  # SECBIT_NOROOT, _LOCKED
    | (1 << 2) | (1 << 3)  # SECBIT_NO_SETUID_FIXUP, _LOCKED
    | (1 << 5)  # SECBIT_KEEP_CAPS_LOCKED (KEEP_CAPS itself off)
    | (1 << 6) | (1 << 7)  # SECBIT_NO_CAP_AMBIENT_RAISE, _LOCKED
)  # fmt: skip


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    rc = int(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg2}): {os.strerror(err)}")
    return rc


def drop_capabilities() -> None:
    """Root without a uid of its own keeps uid 0 but no capability, not even after an exec.

    Lock the securebits first (that and the bounding set need CAP_SETPCAP, which goes last), then
    empty the ambient and bounding sets, then effective, permitted and inheritable at once. The
    bounding set is walked until the kernel says EINVAL (past CAP_LAST_CAP) rather than read from
    /proc/sys, which Landlock has already closed.
    """
    _prctl(_PR_SET_SECUREBITS, _SECBITS_NO_ROOT)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(64):
        try:
            _prctl(_PR_CAPBSET_READ, cap)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                break
            raise
        _prctl(_PR_CAPBSET_DROP, cap)
    header = struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    data = bytes(2 * 3 * 4)  # two __user_cap_data_struct {effective, permitted, inheritable}
    if _libc.capset(header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset(0, 0, 0): {os.strerror(err)}")


# --------------------------------------------------------------------------- seccomp
#
# A deny-list of whole classes, each denied with EPERM (so a library probing a call degrades
# instead of dying), installed once the supervisor connection exists:
#
# - sockets: no socket() (only AF_INET/AF_INET6 for tenants with `network`); socketpair() only
#   AF_UNIX stream or seqpacket (asyncio's self-pipe) — those are connected and ignore a
#   destination, whereas a datagram pair's sendto(path) reaches any socket file the tenant can
#   write (journald's /dev/log, systemd's notify socket). Without `network` also no connect, bind,
#   listen, accept, nor sendto with a destination address. sendmsg/sendmmsg are allowed: seccomp
#   sees only the msghdr pointer, never msg_name; that is safe because no socket that honours a
#   destination can exist (the supervisor connection is a connected stream, which refuses or
#   ignores one).
# - namespaces and mounts: setns, unshare, clone with any CLONE_NEW* flag; clone3 answers ENOSYS
#   (its flags are in memory, out of the filter's reach) so the C library falls back to clone;
#   mount, umount2, pivot_root, chroot and the new mount API.
# - other processes: ptrace, process_vm_readv/writev, process_madvise, pidfd_getfd, kcmp,
#   migrate_pages, move_pages.
# - kernel attack surface a step has no use for: bpf, perf_event_open, userfaultfd, io_uring,
#   keyrings, lookup_dcookie, personality other than a query or PER_LINUX, ioctl TIOCSTI and
#   TIOCLINUX (typing into a terminal), on x86_64 modify_ldt, uselib, iopl, ioperm.
# - host administration: modules, kexec, reboot, swap, acct, clocks, syslog, quotas, fanotify,
#   vhangup, host and domain names, file handles (open_by_handle_at walks past any mount).
# - syscall numbers this table does not know (newer kernels) answer ENOSYS, so a future call
#   falls back as on an older kernel; other ABIs (i386, x32) kill the process as before.
#
# Anything else is allowed. An allow-list would also bind every program a step may exec (a
# shell, git, a compiler), each with its own needs; the ENOSYS rule for unknown numbers gives the
# part of an allow-list's benefit that matters: a syscall added later is not silently allowed.

_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_EPERM = RET_ERRNO | errno.EPERM
RET_ENOSYS = RET_ERRNO | errno.ENOSYS
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SOCK_STREAM, SOCK_SEQPACKET, SOCK_TYPE_MASK = 1, 5, 0xF
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
PER_LINUX, PER_QUERY = 0, 0xFFFFFFFF
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID = 0x08000000, 0x10000000, 0x20000000
# Every CLONE_NEW* flag clone() takes (CLONE_NEWTIME is clone3/unshare only).
CLONE_NAMESPACES = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
) | CLONE_NEWNET
# Syscall numbers from here on are unknown to these tables (file_setattr, 6.17, is 469).
FIRST_UNKNOWN_NR = 470
_X32_BIT = 0x40000000

_BPF_LD_W_ABS = 0x20
_BPF_ALU_AND_K = 0x54
_BPF_JA = 0x05
_BPF_JEQ_K = 0x15
_BPF_JGE_K = 0x35
_BPF_JSET_K = 0x45
_BPF_RET_K = 0x06
_DATA_NR, _DATA_ARCH, _DATA_ARGS = 0, 4, 16  # offsets in struct seccomp_data

# Numbers of the calls the policy names (the rest pass untouched): x86_64 from
# arch/x86/entry/syscalls/syscall_64.tbl, aarch64 from include/uapi/asm-generic/unistd.h, where
# the legacy calls (and socketcall) do not exist. Numbers from 403 up are shared by all.
_COMMON = {
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442,
    "quotactl_fd": 443, "open_tree_attr": 467,
}  # fmt: skip
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": _COMMON | {
        "ioctl": 16, "socket": 41, "connect": 42, "accept": 43, "sendto": 44, "bind": 49,
        "listen": 50, "socketpair": 53, "clone": 56, "ptrace": 101, "syslog": 103,
        "uselib": 134, "personality": 135, "vhangup": 153, "modify_ldt": 154,
        "pivot_root": 155, "_sysctl": 156, "adjtimex": 159, "chroot": 161, "acct": 163,
        "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
        "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173,
        "create_module": 174, "init_module": 175, "delete_module": 176, "get_kernel_syms": 177,
        "query_module": 178, "quotactl": 179, "nfsservctl": 180, "lookup_dcookie": 212,
        "clock_settime": 227, "kexec_load": 246, "add_key": 248, "request_key": 249,
        "keyctl": 250, "migrate_pages": 256, "unshare": 272, "move_pages": 279, "accept4": 288,
        "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
        "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310,
        "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "seccomp": 317,
        "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
    },
    "aarch64": _COMMON | {
        "lookup_dcookie": 18, "ioctl": 29, "umount2": 39, "mount": 40, "pivot_root": 41,
        "nfsservctl": 42, "chroot": 51, "vhangup": 58, "quotactl": 60, "acct": 89,
        "personality": 92, "unshare": 97, "kexec_load": 104, "init_module": 105,
        "delete_module": 106, "clock_settime": 112, "syslog": 116, "ptrace": 117,
        "reboot": 142, "sethostname": 161, "setdomainname": 162, "settimeofday": 170,
        "adjtimex": 171, "socket": 198, "socketpair": 199, "bind": 200, "listen": 201,
        "accept": 202, "connect": 203, "sendto": 206, "add_key": 217, "request_key": 218,
        "keyctl": 219, "clone": 220, "swapon": 224, "swapoff": 225, "migrate_pages": 238,
        "move_pages": 239, "perf_event_open": 241, "accept4": 242, "fanotify_init": 262,
        "name_to_handle_at": 264, "open_by_handle_at": 265, "clock_adjtime": 266, "setns": 268,
        "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "finit_module": 273,
        "seccomp": 277, "bpf": 280, "userfaultfd": 282, "kexec_file_load": 294,
    },
}  # fmt: skip
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

DENIED = (
    # namespaces and mounts
    "setns", "unshare", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "open_tree_attr", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd", "kcmp",
    "migrate_pages", "move_pages",
    # kernel attack surface
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "add_key", "request_key", "keyctl", "lookup_dcookie", "modify_ldt",
    "uselib", "iopl", "ioperm",
    # host administration
    "init_module", "finit_module", "delete_module", "create_module", "get_kernel_syms",
    "query_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "syslog", "quotactl",
    "quotactl_fd", "fanotify_init", "vhangup", "sethostname", "setdomainname", "nfsservctl",
    "_sysctl", "name_to_handle_at", "open_by_handle_at",
)  # fmt: skip
DENIED_WITHOUT_NETWORK = ("socket", "connect", "bind", "listen", "accept", "accept4")


class _Program:
    """A classic-BPF assembler with named jump targets, so no offset is counted by hand."""

    def __init__(self) -> None:
        self._insns: list[tuple[int, str | None, str | None, int | str]] = []
        self._labels: dict[str, int] = {}

    def op(self, code: int, k: int = 0, jt: str | None = None, jf: str | None = None) -> None:
        """One instruction; a conditional jump goes to label `jt` when true, `jf` when false,
        and to the next instruction where a label is not given."""
        self._insns.append((code, jt, jf, k))

    def goto(self, label: str) -> None:
        self._insns.append((_BPF_JA, None, None, label))

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"BPF label {name} is defined twice")
        self._labels[name] = len(self._insns)

    def load(self, offset: int) -> None:
        self.op(_BPF_LD_W_ABS, offset)

    def load_arg(self, index: int, high: bool = False) -> None:
        # seccomp_data.args are u64; both supported ABIs are little-endian: low word first.
        self.load(_DATA_ARGS + 8 * index + (4 if high else 0))

    def code(self) -> bytes:
        out = []
        for at, (code, jt, jf, k) in enumerate(self._insns):
            if isinstance(k, str):
                k = self._offset(at, k, limit=0xFFFFFFFF)
            out.append(struct.pack("=HBBI", code, self._offset(at, jt), self._offset(at, jf), k))
        return b"".join(out)

    def __len__(self) -> int:
        return len(self._insns)

    def _offset(self, at: int, label: str | None, limit: int = 255) -> int:
        if label is None:
            return 0
        if label not in self._labels:
            raise ValueError(f"BPF label {label} is never defined")
        offset = self._labels[label] - at - 1
        if not 0 <= offset <= limit:
            raise ValueError(f"BPF jump from {at} to {label} is out of range ({offset})")
        return offset


def _rule_socket_inet(p: _Program) -> None:
    p.load_arg(0)  # the address family
    p.op(_BPF_JEQ_K, AF_INET, jt="allow")
    p.op(_BPF_JEQ_K, AF_INET6, jt="allow")
    p.goto("eperm")


def _rule_socketpair(p: _Program) -> None:
    p.load_arg(0)
    p.op(_BPF_JEQ_K, AF_UNIX, jf="eperm")
    p.load_arg(1)  # the type, with SOCK_NONBLOCK and SOCK_CLOEXEC above the mask
    p.op(_BPF_ALU_AND_K, SOCK_TYPE_MASK)
    p.op(_BPF_JEQ_K, SOCK_STREAM, jt="allow")
    p.op(_BPF_JEQ_K, SOCK_SEQPACKET, jt="allow")
    p.goto("eperm")


def _rule_sendto_connected(p: _Program) -> None:
    p.load_arg(4, high=False)  # dest_addr: only NULL, as on a connected socket
    p.op(_BPF_JEQ_K, 0, jf="eperm")
    p.load_arg(4, high=True)
    p.op(_BPF_JEQ_K, 0, jt="allow", jf="eperm")


def _rule_clone(p: _Program) -> None:
    p.load_arg(0)  # flags: the kernel reads only their low 32 bits
    p.op(_BPF_JSET_K, CLONE_NAMESPACES, jt="eperm", jf="allow")


def _rule_personality(p: _Program) -> None:
    p.load_arg(0)  # an unsigned int to the kernel
    p.op(_BPF_JEQ_K, PER_QUERY, jt="allow")
    p.op(_BPF_JEQ_K, PER_LINUX, jt="allow", jf="eperm")


def _rule_ioctl(p: _Program) -> None:
    p.load_arg(1)  # the request, an unsigned int to the kernel
    p.op(_BPF_JEQ_K, TIOCSTI, jt="eperm")
    p.op(_BPF_JEQ_K, TIOCLINUX, jt="eperm", jf="allow")


def _ranges(numbers: list[int]) -> list[tuple[int, int]]:
    """Sorted numbers as runs of consecutive ones: [(first, last), ...]."""
    runs: list[tuple[int, int]] = []
    for n in numbers:
        if runs and runs[-1][1] + 1 == n:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs


def _deny_ranges(p: _Program, runs: list[tuple[int, int]], done: str, tag: str) -> None:
    """EPERM when the syscall number (in the accumulator) is in one of `runs`, else on to `done`.

    A binary search, not a chain: the kernel emulates the program for every syscall number when
    it installs it (to cache what is always allowed), and a chain of 80 would cost that 80 steps
    per number, in every activation.
    """
    if len(runs) <= 2:
        for i, (first, last) in enumerate(runs):
            if first == last:
                p.op(_BPF_JEQ_K, first, jt="eperm")
                continue
            p.op(_BPF_JGE_K, first, jf=f"{tag}{i}")
            p.op(_BPF_JGE_K, last + 1, jf="eperm")
            p.label(f"{tag}{i}")
        p.goto(done)
        return
    mid = len(runs) // 2
    p.op(_BPF_JGE_K, runs[mid][0], jt=f"{tag}r")
    _deny_ranges(p, runs[:mid], done, f"{tag}l")
    p.label(f"{tag}r")
    _deny_ranges(p, runs[mid:], done, f"{tag}r")


def syscall_filter(machine: str, *, allow_inet: bool) -> tuple[int, bytes]:
    """The policy above as a BPF program for `machine`: (instruction count, code)."""
    numbers = SYSCALLS[machine]
    rules = [("ioctl", _rule_ioctl), ("clone", _rule_clone), ("socketpair", _rule_socketpair)]
    rules.append(("personality", _rule_personality))
    if allow_inet:
        rules.append(("socket", _rule_socket_inet))
    else:
        rules.append(("sendto", _rule_sendto_connected))
    denied = DENIED if allow_inet else DENIED + DENIED_WITHOUT_NETWORK
    p = _Program()
    p.load(_DATA_ARCH)
    p.op(_BPF_JEQ_K, AUDIT_ARCH[machine], jf="kill")  # i386 on x86_64, arm32 on aarch64
    p.load(_DATA_NR)
    p.op(_BPF_JGE_K, _X32_BIT, jt="kill")  # x32 shares x86_64's arch tag
    p.op(_BPF_JGE_K, FIRST_UNKNOWN_NR, jt="enosys")
    p.op(_BPF_JEQ_K, numbers["clone3"], jt="enosys")
    # Calls that depend on their arguments first: they are frequent (ioctl, clone) and run the
    # filter every time; a call allowed whatever its arguments the kernel allows from a cache.
    for name, rule in rules:
        p.op(_BPF_JEQ_K, numbers[name], jf=f"after_{name}")
        rule(p)
        p.label(f"after_{name}")
    # legacy calls exist on x86_64 only
    _deny_ranges(p, _ranges(sorted(numbers[n] for n in denied if n in numbers)), "allow", "d")
    p.label("allow")
    p.op(_BPF_RET_K, RET_ALLOW)
    p.label("eperm")
    p.op(_BPF_RET_K, RET_EPERM)
    p.label("enosys")
    p.op(_BPF_RET_K, RET_ENOSYS)
    p.label("kill")
    p.op(_BPF_RET_K, RET_KILL_PROCESS)
    return len(p), p.code()


_MACHINE = os.uname().machine


class _Filter(NamedTuple):
    code: ctypes.Array[ctypes.c_char]  # the instructions, kept alive for the pointer below
    fprog: bytes  # struct sock_fprog {unsigned short len; struct sock_filter *filter}


def _prepare(machine: str, allow_inet: bool) -> _Filter:
    count, code = syscall_filter(machine, allow_inet=allow_inet)
    buf = ctypes.create_string_buffer(code, len(code))
    return _Filter(buf, struct.pack("=HxxxxxxQ", count, ctypes.addressof(buf)))


# Both programs are built at import: in fork mode that is once, in the fork server, instead of
# in every activation (where it costs more than the seccomp() call itself).
_PREPARED = {v: _prepare(_MACHINE, v) for v in (False, True)} if _MACHINE in SYSCALLS else {}


def seccomp_supported() -> bool:
    return _MACHINE in SYSCALLS and os.path.exists("/proc/self/status")


def restrict_syscalls(*, allow_inet: bool) -> None:
    """Install the policy above on every thread at once (TSYNC): on any a library started too.

    Runs after the supervisor connection exists, which keeps working: it needs only send, recv,
    sendmsg, recvmsg, poll and epoll on sockets already open.
    """
    if not _PREPARED:
        raise OSError(errno.ENOSYS, f"no seccomp policy for {_MACHINE}")
    fprog = _PREPARED[allow_inet].fprog
    nr_seccomp = SYSCALLS[_MACHINE]["seccomp"]
    rc = _libc.syscall(nr_seccomp, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC, fprog)
    if rc != 0:
        err = ctypes.get_errno() if rc < 0 else errno.EBUSY  # rc > 0: a thread that refused
        raise OSError(err, f"seccomp(SET_MODE_FILTER, TSYNC): {os.strerror(err)} (rc {rc})")
