"""Hostile tenant code against the seccomp policy (sandbox_host/isolation.py) and, where the
supervisor runs activations as root without a uid drop, against the capability drop. Every
denied call must fail with EPERM from inside a real step; what a step legitimately needs (the
supervisor connection, threads, subprocesses, asyncio) must keep working."""

from __future__ import annotations

import os
import platform
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sandbox_host import isolation
from tests.conftest import deploy_source
from tests.integration.arena import ATTACKER, Arena

# Tenant code: `call(name, *args)` runs one raw syscall by its number and says how it ended.
RAW = """
import ctypes, errno
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

def call(name, *args):
    if _libc.syscall(params["nr"][name], *args) < 0:
        return errno.errorcode[ctypes.get_errno()]
    return "ok"
"""


def raw_calls(code: str) -> str:
    return RAW + textwrap.dedent(code)


CLONE_NEWUSER = 0x10000000
SIGCHLD = 17


def numbers() -> dict[str, int]:
    machine = platform.machine()
    if machine not in isolation.SYSCALLS:
        pytest.skip(f"no seccomp policy for {machine}")
    return isolation.SYSCALLS[machine]


@pytest.fixture
def root_socket(tmp_short: Path) -> Any:
    """A datagram socket owned by root on a path any user may reach and write, like journald's
    /dev/log: what the reported attack sent to."""
    d = tmp_short / "dev"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    path = d / "log"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    path.chmod(0o666)
    s.setblocking(False)
    yield s, path
    s.close()


def test_socketpair_and_sendto_cannot_reach_a_root_socket_file(arena: Arena, root_socket) -> None:
    arena.need("seccomp")
    listener, path = root_socket
    st = arena.attack(
        """
        import socket
        out = {}
        try:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            a.sendto(b"<0>evil", params["path"])
            out["dgram_pair"] = "sent"
        except OSError as exc:
            out["dgram_pair"] = exc.strerror
        a, b = socket.socketpair()  # a stream pair stays (asyncio needs one): no destination
        for how, send in (
            ("stream_sendto", lambda: a.sendto(b"<0>evil", params["path"])),
            ("stream_sendmsg", lambda: a.sendmsg([b"<0>evil"], [], 0, params["path"])),
        ):
            try:
                send()
                out[how] = "sent"
            except OSError as exc:
                out[how] = exc.strerror
        try:
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"<0>evil", params["path"])
            out["socket"] = "sent"
        except OSError as exc:
            out["socket"] = exc.strerror
        result = out
        """,
        path=str(path),
    )
    out = st["output"]
    assert out["dgram_pair"] == "Operation not permitted"
    assert out["stream_sendto"] == "Operation not permitted"  # an address: refused by the filter
    # sendmsg's address is in memory the filter cannot read; a connected stream refuses it.
    assert out["stream_sendmsg"] == "Transport endpoint is already connected"
    assert out["socket"] == "Operation not permitted"
    with pytest.raises(BlockingIOError):
        listener.recv(100)  # nothing arrived


def test_keyrings_are_out_of_reach(arena: Arena) -> None:
    arena.need("seccomp")
    st = arena.attack(
        raw_calls(
            """
        KEY_SPEC_SESSION_KEYRING, KEYCTL_GET_KEYRING_ID, KEYCTL_JOIN = -3, 0, 1
        result = {
            "add_key": call("add_key", b"user", b"stolen", b"data", 4, KEY_SPEC_SESSION_KEYRING),
            "request_key": call("request_key", b"user", b"stolen", None, 0),
            "keyctl_get": call("keyctl", KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0),
            "keyctl_join": call("keyctl", KEYCTL_JOIN, b"_ses"),
        }
        """
        ),
        nr=numbers(),
    )
    assert st["output"] == dict.fromkeys(
        ("add_key", "request_key", "keyctl_get", "keyctl_join"), "EPERM"
    )


def test_no_user_namespace_nor_any_other(arena: Arena) -> None:
    arena.need("seccomp")
    st = arena.attack(
        raw_calls(
            """
        import os
        out = {
            "unshare_user": call("unshare", params["newuser"]),
            "unshare_nothing": call("unshare", 0),
            "clone_user": call("clone", params["newuser"] | params["sigchld"], 0, 0, 0, 0),
            "clone3": call("clone3", 0, 0),
        }
        fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        out["setns"] = call("setns", fd, 0)
        result = out
        """
        ),
        nr=numbers(),
        newuser=CLONE_NEWUSER,
        sigchld=SIGCHLD,
    )
    assert st["output"] == {
        "unshare_user": "EPERM",
        "unshare_nothing": "EPERM",
        "clone_user": "EPERM",
        "clone3": "ENOSYS",  # so the C library falls back to clone, whose flags are checked
        "setns": "EPERM",
    }


def test_every_denied_call_fails_with_eperm(arena: Arena) -> None:
    arena.need("seccomp")
    nr = numbers()
    names = [n for n in isolation.DENIED + isolation.DENIED_WITHOUT_NETWORK if n in nr]
    st = arena.attack(
        raw_calls("result = {name: call(name) for name in params['names']}"),
        nr=nr,
        names=names,
    )
    assert st["output"] == dict.fromkeys(names, "EPERM")


def test_argument_checked_calls_deny_only_the_dangerous_use(arena: Arena) -> None:
    arena.need("seccomp")
    st = arena.attack(
        raw_calls(
            """
        import fcntl, os, termios
        r, w = os.pipe()
        out = {
            "personality_query": call("personality", 0xFFFFFFFF),
            "personality_no_aslr": call("personality", 0x0040000),
            "ioctl_fionread": call("ioctl", r, termios.FIONREAD, ctypes.byref(ctypes.c_int())),
            "ioctl_tiocsti": call("ioctl", 0, termios.TIOCSTI, b"x"),
            "sendto_address": call("sendto", w, b"x", 1, 0, b"\\x01\\x00/dev/log", 11),
            "unknown_newer_call": _libc.syscall(params["unknown"]) == -1
            and errno.errorcode[ctypes.get_errno()],
        }
        result = out
        """
        ),
        nr=numbers(),
        unknown=isolation.FIRST_UNKNOWN_NR,
    )
    assert st["output"] == {
        "personality_query": "ok",
        "personality_no_aslr": "EPERM",
        "ioctl_fionread": "ok",
        "ioctl_tiocsti": "EPERM",
        "sendto_address": "EPERM",
        "unknown_newer_call": "ENOSYS",
    }


def test_a_step_still_has_threads_subprocesses_and_asyncio(arena: Arena) -> None:
    arena.need("seccomp")
    st = arena.attack(
        """
        import asyncio, subprocess, sys, threading

        async def main():
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "print(6 * 7)", stdout=asyncio.subprocess.PIPE
            )
            out, _ = await proc.communicate()
            return int(out)

        seen = []
        threads = [threading.Thread(target=seen.append, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ran = subprocess.run([sys.executable, "-c", "print('child')"], capture_output=True)
        result = {
            "threads": sorted(seen),
            "subprocess": ran.stdout.decode().strip(),
            "asyncio": asyncio.run(main()),
        }
        """
    )
    assert st["output"] == {"threads": [0, 1, 2, 3], "subprocess": "child", "asyncio": 42}


def test_root_without_a_sandbox_uid_has_no_capability(make_daemon) -> None:
    if os.geteuid() != 0:
        pytest.skip("activations run as root only under a root supervisor")
    daemon = make_daemon('[isolation]\nuid = "off"\n')
    c = daemon.client(timeout_s=60)
    deploy_source(c, "evil", ATTACKER)
    code = """
        import os
        status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines())
        out = {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
        out["uid"] = os.getuid()
        import subprocess, sys
        # The child reads its own sets with capget: Landlock grants this process's /proc entry
        # only, not its children's.
        probe = (
            "import ctypes, struct; d = ctypes.create_string_buffer(24); "
            "ctypes.CDLL(None).capget(struct.pack('=Ii', 0x20080522, 0), d); "
            "print(sum(struct.unpack('=6I', d.raw)))"
        )
        child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        out["exec_caps"] = child.stdout.strip() or child.stderr[-300:]
        open("mine", "w").close()
        try:
            os.chown("mine", 4242, 4242)
            out["chown"] = "ok"
        except OSError as exc:
            out["chown"] = exc.strerror
        result = out
    """
    c.create("evil", "attack", {"code": textwrap.dedent(code)}, id="caps")
    out = c.wait("evil", "caps", timeout_s=60)["output"]
    zero = "0" * 16
    assert out == {
        "CapInh": zero,
        "CapPrm": zero,
        "CapEff": zero,
        "CapBnd": zero,
        "CapAmb": zero,
        "uid": 0,
        "exec_caps": "0",  # nothing regained by an exec: empty bounding set, SECBIT_NOROOT
        "chown": "Operation not permitted",
    }


def test_a_network_tenant_sends_udp_but_still_reaches_no_socket_file(
    make_daemon, root_socket
) -> None:
    daemon = make_daemon("[tenants.online]\nnetwork = true\n")
    if "seccomp" not in {e["layer"] for e in daemon.events("isolation.layer")}:
        pytest.skip("isolation layer seccomp is not available on this host")
    listener, path = root_socket
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(30)
    c = daemon.client(timeout_s=60)
    deploy_source(c, "online", ATTACKER)
    code = """
        import socket
        out = {}
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"datagram", ("127.0.0.1", params["port"]))
        out["udp"] = "sent"
        for how, make in (
            ("unix_dgram", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)),
            ("dgram_pair", lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)),
        ):
            try:
                make()
                out[how] = "created"
            except OSError as exc:
                out[how] = exc.strerror
        a, b = socket.socketpair()
        try:  # sendto with an address is allowed here (UDP needs it); a stream pair refuses it
            a.sendto(b"<0>evil", params["path"])
            out["stream_sendto"] = "sent"
        except OSError as exc:
            out["stream_sendto"] = exc.strerror
        result = out
    """
    try:
        c.create(
            "online",
            "attack",
            {"code": textwrap.dedent(code), "port": udp.getsockname()[1], "path": str(path)},
            id="n",
        )
        out = c.wait("online", "n", timeout_s=60)["output"]
        assert udp.recv(100) == b"datagram"
    finally:
        udp.close()
    assert out == {
        "udp": "sent",
        "unix_dgram": "Operation not permitted",
        "dgram_pair": "Operation not permitted",
        "stream_sendto": "Transport endpoint is already connected",
    }
    with pytest.raises(BlockingIOError):
        listener.recv(100)
