"""An activation's channel against the supervisor's real sandbox server: the routing id is the
token, messages of every size cross both ways, and whatever goes wrong ends the activation with
its reserved exit code, never a hang."""

from __future__ import annotations

import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from protocol.codec import decode_from_activation, encode
from protocol.launch import ExitCode
from protocol.limits import MAX_SANDBOX_FRAME_BYTES
from protocol.messages import Ack, Activate, Hello
from supervisor.sandbox_server import SandboxServer

CHILD = """
import os, sys
from protocol.launch import ExitCode
from protocol.messages import Activate, Hello
from sandbox_host.channel import Channel

ch = Channel(sys.argv[1], sys.argv[2], timeout_s=float(sys.argv[3]))
ch.send(Hello(token=sys.argv[2], pid=os.getpid(), protocol_version=1))
act = ch.recv(ExitCode.NO_ACTIVATE)
assert isinstance(act, Activate)
print(len(act.code), flush=True)
ch.send(Hello(token="again", pid=1 + len(act.code), protocol_version=1))
ch.wait_ack()
os._exit(0)
"""


def bind(path: Path) -> SandboxServer:
    return SandboxServer(
        path,
        mode=0o600,
        max_message=2 * MAX_SANDBOX_FRAME_BYTES,
        max_queued=16,
        log=structlog.get_logger(),
    )


@pytest.fixture
def router(tmp_path: Path) -> Iterator[tuple[str, SandboxServer]]:
    srv = bind(tmp_path / "sandbox.sock")
    yield f"ipc://{srv.path}", srv
    srv.close()


def start(endpoint: str, token: str, timeout_s: float = 30.0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), endpoint, token, str(timeout_s)],
        stdout=subprocess.PIPE,
        text=True,
    )


def receive(srv: SandboxServer) -> tuple[bytes, object]:
    """The next message, running the server as the supervisor's loop does meanwhile (which
    also writes what waits for a peer whose socket was full)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not srv.pending:
            select.select([srv.fileno()], [], [], 0.1)
        srv.pump()
        if (got := srv.receive()) is not None:
            identity, [frame] = got
            return identity, decode_from_activation(frame)
    raise AssertionError("nothing came from the activation")


@pytest.mark.parametrize("code_bytes", [0, 200, 300, 3 * 1024 * 1024])
def test_messages_cross_both_ways_under_the_token(router, code_bytes: int) -> None:
    endpoint, sock = router
    proc = start(endpoint, "tok-1")
    identity, hello = receive(sock)
    assert identity == b"tok-1" and isinstance(hello, Hello) and hello.token == "tok-1"
    code = bytes(range(256)) * (code_bytes // 256) + b"x" * (code_bytes % 256)
    activate = Activate(mode="run", tenant="t", filename="w.py", code_kind="source", code=code)
    sock.send(identity, encode(activate))
    identity, echo = receive(sock)
    assert identity == b"tok-1" and isinstance(echo, Hello) and echo.pid == 1 + code_bytes
    sock.send(identity, encode(Ack()))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.strip() == str(code_bytes)


def test_a_refusal_ends_the_activation_with_its_code(router) -> None:
    endpoint, sock = router
    proc = start(endpoint, "tok-2")
    identity, _ = receive(sock)
    sock.send(identity, encode(Activate("run", "t", "w.py", "source", b"")))
    receive(sock)
    sock.send(identity, encode(Ack(ok=False)))
    assert proc.wait(timeout=30) == ExitCode.REFUSED


def test_silence_and_a_closed_supervisor_end_it_too(router) -> None:
    endpoint, sock = router
    proc = start(endpoint, "tok-3", timeout_s=0.5)
    receive(sock)  # and never answer
    assert proc.wait(timeout=30) == ExitCode.NO_ACTIVATE
    proc = start(endpoint, "tok-4")
    receive(sock)
    sock.close()  # the supervisor is gone
    assert proc.wait(timeout=30) == ExitCode.NO_ACTIVATE


PAUSED = """
import os, sys
from protocol.launch import ExitCode
from protocol.messages import Hello
from sandbox_host.channel import Channel

ch = Channel(sys.argv[1], sys.argv[2])
ch.send(Hello(token=sys.argv[2], pid=os.getpid(), protocol_version=1))
ch.recv(ExitCode.NO_ACTIVATE)
print("activated", flush=True)
sys.stdin.readline()  # the supervisor is gone by now
ch.send(Hello(token=sys.argv[2], pid=os.getpid(), protocol_version=1))
os._exit(0)
"""


def test_a_supervisor_gone_before_a_send_ends_it_as_unacknowledged(tmp_path: Path) -> None:
    sock = bind(tmp_path / "gone.sock")
    endpoint = f"ipc://{sock.path}"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PAUSED), endpoint, "tok-5"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    identity, _ = receive(sock)
    sock.send(identity, encode(Activate("run", "t", "w.py", "source", b"")))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "activated"
    sock.close()  # the connection with it
    out, _ = proc.communicate("go\n", timeout=30)
    assert proc.returncode == ExitCode.NO_ACK, out  # not a traceback of a broken pipe
