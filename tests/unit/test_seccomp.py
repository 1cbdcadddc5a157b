"""The activation's seccomp policy and capability drop, without a daemon: the BPF program run by a
small interpreter for both architectures, and the real filter installed in a forked child."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox_host import isolation, limits
from sandbox_host.isolation import (
    AUDIT_ARCH,
    RET_ALLOW,
    RET_ENOSYS,
    RET_EPERM,
    RET_KILL_PROCESS,
    SYSCALLS,
    syscall_filter,
)

CLONE_NEWUSER = 0x10000000
CLONE_THREAD_FLAGS = 0x3D0F00  # what glibc's pthread_create passes
SIGCHLD = 17
SOCK_DGRAM = 2


def run_bpf(code: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """Classic BPF as seccomp runs it, for the opcodes the policy uses."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    insns = [struct.unpack_from("=HBBI", code, at) for at in range(0, len(code), 8)]
    pc, acc = 0, 0
    while True:
        op, jt, jf, k = insns[pc]
        pc += 1
        if op == 0x20:
            acc = struct.unpack_from("=I", data, k)[0]
        elif op == 0x54:
            acc &= k
        elif op == 0x05:
            pc += k
        elif op in (0x15, 0x35, 0x45):
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[op]
            pc += jt if taken else jf
        elif op == 0x06:
            return k
        else:
            raise AssertionError(f"opcode {op:#x} not emulated")


@pytest.mark.parametrize("machine", sorted(SYSCALLS))
@pytest.mark.parametrize("allow_inet", [False, True])
def test_the_policy_decides_by_name_and_arguments(machine: str, allow_inet: bool) -> None:
    count, code = syscall_filter(machine, allow_inet=allow_inet)
    assert count == len(code) // 8 < 4096
    nr, arch = SYSCALLS[machine], AUDIT_ARCH[machine]

    def verdict(name: str, *args: int) -> int:
        return run_bpf(code, nr[name], arch, args)

    for name in isolation.DENIED:
        if name in nr:
            assert verdict(name) == RET_EPERM, name
    net = RET_ALLOW if allow_inet else RET_EPERM
    for name in isolation.DENIED_WITHOUT_NETWORK:
        if name != "socket":
            assert verdict(name) == net, name
    assert verdict("socket", socket.AF_INET, 1) == net
    assert verdict("socket", socket.AF_INET6, 2) == net
    assert verdict("socket", socket.AF_UNIX, 1) == RET_EPERM
    assert verdict("socket", socket.AF_NETLINK, 3) == RET_EPERM
    assert verdict("socketpair", socket.AF_UNIX, SOCK_DGRAM) == RET_EPERM  # the reported attack
    assert verdict("socketpair", socket.AF_UNIX, 1 | socket.SOCK_CLOEXEC) == RET_ALLOW
    assert verdict("socketpair", socket.AF_UNIX, 5) == RET_ALLOW
    assert verdict("socketpair", socket.AF_INET, 1) == RET_EPERM
    assert verdict("sendto", 3, 0, 1, 0, 0) == RET_ALLOW  # connected: no address
    assert verdict("sendto", 3, 0, 1, 0, 0x7FFF_0000_1000) == net
    assert verdict("sendto", 3, 0, 1, 0, 0x7FFF_0000_0000) == net  # low word zero
    assert verdict("clone", SIGCHLD) == RET_ALLOW
    assert verdict("clone", CLONE_THREAD_FLAGS) == RET_ALLOW
    assert verdict("clone", SIGCHLD | CLONE_NEWUSER) == RET_EPERM
    assert verdict("clone", isolation.CLONE_NEWNET) == RET_EPERM
    assert verdict("clone3") == RET_ENOSYS
    assert verdict("personality", 0xFFFFFFFF) == RET_ALLOW
    assert verdict("personality", 0x0040000) == RET_EPERM  # ADDR_NO_RANDOMIZE
    assert verdict("ioctl", 0, 0x5401) == RET_ALLOW  # TCGETS
    assert verdict("ioctl", 0, isolation.TIOCSTI) == RET_EPERM
    assert verdict("seccomp") == RET_ALLOW
    assert run_bpf(code, 0, arch) == RET_ALLOW  # read on x86_64, io_setup on aarch64
    assert run_bpf(code, isolation.FIRST_UNKNOWN_NR, arch) == RET_ENOSYS
    assert run_bpf(code, 0x40000000, arch) == RET_KILL_PROCESS  # x32
    assert run_bpf(code, 0, 0x40000003) == RET_KILL_PROCESS  # i386


@pytest.mark.parametrize("machine", sorted(SYSCALLS))
def test_every_number_below_the_unknown_ones_gets_its_verdict(machine: str) -> None:
    _, code = syscall_filter(machine, allow_inet=False)
    nr = SYSCALLS[machine]
    denied = {nr[n] for n in isolation.DENIED + isolation.DENIED_WITHOUT_NETWORK if n in nr}
    checked = {nr[n] for n in ("ioctl", "clone", "socketpair", "personality", "sendto")}
    for number in range(isolation.FIRST_UNKNOWN_NR):
        if number in checked:
            continue
        expected = (
            RET_ENOSYS if number == nr["clone3"] else RET_EPERM if number in denied else RET_ALLOW
        )
        assert run_bpf(code, number, AUDIT_ARCH[machine]) == expected, number


def test_every_denied_name_has_a_number_and_only_legacy_calls_are_x86_only() -> None:
    names = set(isolation.DENIED + isolation.DENIED_WITHOUT_NETWORK)
    assert names <= set(SYSCALLS["x86_64"])
    legacy = {"modify_ldt", "uselib", "iopl", "ioperm", "create_module", "get_kernel_syms"}
    legacy |= {"query_module", "_sysctl"}
    assert names - set(SYSCALLS["aarch64"]) == legacy


def test_the_assembler_refuses_a_bad_jump() -> None:
    p = isolation._Program()
    p.op(0x15, 1, jt="nowhere")
    with pytest.raises(ValueError, match="never defined"):
        p.code()
    far = isolation._Program()
    far.op(0x15, 1, jt="end")
    for _ in range(300):
        far.op(0x06, RET_ALLOW)
    far.label("end")
    far.op(0x06, RET_EPERM)
    with pytest.raises(ValueError, match="out of range"):
        far.code()


def header_numbers(path: Path) -> dict[str, int]:
    text = path.read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", text)}


@pytest.mark.parametrize(
    "machine, header",
    [
        ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
        ("aarch64", "/usr/include/asm-generic/unistd.h"),
    ],
)
def test_the_numbers_match_the_kernel_headers(machine: str, header: str) -> None:
    if not Path(header).exists():
        pytest.skip(f"kernel header {header} is not installed")
    known = header_numbers(Path(header))
    checked = {name: n for name, n in SYSCALLS[machine].items() if name in known}
    assert len(checked) > 40
    assert checked == {name: known[name] for name in checked}


def in_child(body: Callable[[], Any]) -> Any:
    """Run `body` in a forked child (the filter is for life) and return what it returned."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = json.dumps({"ok": body()})
        except BaseException as exc:  # reported to the parent, which fails the test
            out = json.dumps({"error": repr(exc)})
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    reply = json.loads(data)
    assert "error" not in reply, reply["error"]
    return reply["ok"]


def outcome(call: Callable[[], Any]) -> str:
    try:
        call()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def raw(name: str, *args: Any) -> Callable[[], None]:
    return raw_nr(SYSCALLS[platform.machine()][name], *args)


def raw_nr(nr: int, *args: Any) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def call() -> None:
        if libc.syscall(nr, *args) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return call


def needs_seccomp() -> None:
    if not isolation.seccomp_supported():
        pytest.skip(f"seccomp filters are not supported here ({platform.machine()})")


def test_the_installed_filter_denies_with_eperm_and_leaves_the_rest(tmp_path: Path) -> None:
    needs_seccomp()
    target = tmp_path / "log.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(target))

    def probe() -> dict[str, str]:
        import asyncio
        import subprocess
        import threading

        limits.no_new_privs()  # as every activation has; seccomp needs it without root
        isolation.restrict_syscalls(allow_inet=False)
        stream_a, stream_b = socket.socketpair()
        res = {
            "socketpair_dgram": outcome(lambda: socket.socketpair(type=socket.SOCK_DGRAM)),
            "socket_unix": outcome(lambda: socket.socket(socket.AF_UNIX)),
            "socket_inet": outcome(lambda: socket.socket(socket.AF_INET)),
            "sendto_path": outcome(lambda: stream_a.sendto(b"x", str(target))),
            "send_connected": outcome(lambda: stream_a.send(b"hello")),
            "recv_connected": stream_b.recv(5).decode(),
            "unshare_user": outcome(raw("unshare", CLONE_NEWUSER)),
            "clone_user": outcome(raw("clone", CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)),
            "clone3": outcome(raw("clone3", 0, 0)),
            "keyctl": outcome(raw("keyctl", 0, 0, 0, 0, 0)),
            "add_key": outcome(raw("add_key", b"user", b"k", b"v", 1, -2)),
            "ptrace": outcome(raw("ptrace", 16, os.getppid(), 0, 0)),
            "unknown": outcome(raw_nr(isolation.FIRST_UNKNOWN_NR)),
            "personality_aslr_off": outcome(raw("personality", 0x0040000)),
            "personality_query": outcome(raw("personality", 0xFFFFFFFF)),
        }
        box: list[int] = []
        t = threading.Thread(target=lambda: box.append(1))
        t.start()
        t.join()
        res["thread"] = "ok" if box == [1] else "no"
        res["subprocess"] = str(subprocess.run(["true"], check=False).returncode)
        res["asyncio"] = str(asyncio.run(asyncio.sleep(0, result="ok")))
        return res

    try:
        res = in_child(probe)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.recv(10)  # nothing arrived
    finally:
        listener.close()
    assert res == {
        "socketpair_dgram": "EPERM",
        "socket_unix": "EPERM",
        "socket_inet": "EPERM",
        "sendto_path": "EPERM",
        "send_connected": "ok",
        "recv_connected": "hello",
        "unshare_user": "EPERM",
        "clone_user": "EPERM",
        "clone3": "ENOSYS",
        "keyctl": "EPERM",
        "add_key": "EPERM",
        "ptrace": "EPERM",
        "unknown": "ENOSYS",
        "personality_aslr_off": "EPERM",
        "personality_query": "ok",
        "thread": "ok",
        "subprocess": "0",
        "asyncio": "ok",
    }


def test_a_network_tenant_gets_ip_sockets_and_nothing_else() -> None:
    needs_seccomp()

    def probe() -> dict[str, str]:
        limits.no_new_privs()
        isolation.restrict_syscalls(allow_inet=True)
        return {
            "inet": outcome(lambda: socket.socket(socket.AF_INET).close()),
            "inet6": outcome(lambda: socket.socket(socket.AF_INET6).close()),
            "unix": outcome(lambda: socket.socket(socket.AF_UNIX)),
            "netlink": outcome(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)),
            "socketpair_dgram": outcome(lambda: socket.socketpair(type=socket.SOCK_DGRAM)),
        }

    assert in_child(probe) == {
        "inet": "ok",
        "inet6": "ok",
        "unix": "EPERM",
        "netlink": "EPERM",
        "socketpair_dgram": "EPERM",
    }


def test_dropping_capabilities_leaves_root_powerless(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping capabilities is for root; this runs unprivileged")
    victim = tmp_path / "f"
    victim.write_text("x")

    def probe() -> dict[str, str]:
        isolation.drop_capabilities()
        status = dict(
            line.split(":\t", 1) for line in Path("/proc/self/status").read_text().splitlines()
        )
        sets = {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
        sets["chown"] = outcome(lambda: os.chown(victim, 4242, 4242))
        sets["uid"] = str(os.getuid())
        return sets

    zero = "0" * 16
    assert in_child(probe) == {
        "CapInh": zero,
        "CapPrm": zero,
        "CapEff": zero,
        "CapBnd": zero,
        "CapAmb": zero,
        "chown": "EPERM",
        "uid": "0",
    }
