"""The supervisor's end of the activations' connections (`supervisor.sandbox_server`), against
real peers on a real Unix socket: libzmq DEALERs, the activations' own channel, and raw sockets
that say what a hostile tenant process could."""

from __future__ import annotations

import os
import queue
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import zmtp
from protocol.codec import decode_from_activation, encode
from protocol.launch import ExitCode
from protocol.limits import PROTOCOL_VERSION
from protocol.messages import Ack, Hello
from supervisor.sandbox_server import SandboxServer

MAX_MESSAGE = 64 * 1024
MAX_QUEUED = 4
Ctx = zmq.Context[zmq.Socket[bytes]]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def reasons(self) -> list[str]:
        return [f["reason"] for e, f in self.events if e == "sandbox.connection_refused"]


@pytest.fixture
def log() -> Recorder:
    return Recorder()


@pytest.fixture
def server(tmp_path: Path, log: Recorder) -> Iterator[SandboxServer]:
    srv = SandboxServer(
        tmp_path / "sandbox.sock",
        mode=0o600,
        max_message=MAX_MESSAGE,
        max_queued=MAX_QUEUED,
        log=log,
        max_per_peer=3,
        handshake_s=5.0,
    )
    yield srv
    srv.close()


@pytest.fixture
def zctx() -> Iterator[Ctx]:
    ctx: Ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def dealer(ctx: Ctx, srv: SandboxServer, rid: bytes) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, rid)
    sock.connect(f"ipc://{srv.path}")
    return sock


TICK = 8  # messages taken per tick, as the loop takes a bounded number


def tick(srv: SandboxServer, wait_s: float) -> list[tuple[bytes, list[bytes]]]:
    """One tick of the loop: wait for the server's fd (unless messages wait), pump, take."""
    if not srv.pending:
        select.select([srv.fileno()], [], [], wait_s)
    srv.pump()
    got = []
    while len(got) < TICK and (msg := srv.receive()) is not None:
        got.append(msg)
    return got


def take(srv: SandboxServer, want: int, timeout_s: float = 10.0) -> list[tuple[bytes, list[bytes]]]:
    """`want` messages, in the order the server hands them out."""
    got: list[tuple[bytes, list[bytes]]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(got)} of {want} messages before the deadline")
        got += tick(srv, 0.05)
    return got


def settle(srv: SandboxServer, rounds: int = 20) -> list[tuple[bytes, list[bytes]]]:
    """Tick a little while, keeping whatever arrives: for what must *not* arrive."""
    got = []
    for _ in range(rounds):
        got += tick(srv, 0.02)
    return got


def raw_client(srv: SandboxServer) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(srv.path))
    return sock


def closed_by_server(sock: socket.socket, srv: SandboxServer) -> bool:
    """Whether the server closed this raw connection (after its greeting, if it sent one)."""
    sock.settimeout(0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        settle(srv, 1)
        try:
            if sock.recv(65536) == b"":
                return True
        except BlockingIOError:
            continue
        except ConnectionResetError:
            return True
    return False


def test_libzmq_dealers_and_the_server_trade_messages_under_their_routing_ids(
    server: SandboxServer, zctx: Ctx
) -> None:
    a, b = dealer(zctx, server, b"token-a"), dealer(zctx, server, b"token-b")
    a.send(b"one from a")
    b.send(b"one from b")
    a.send(b"two from a")
    got = take(server, 3)
    assert sorted(got) == [
        (b"token-a", [b"one from a"]),
        (b"token-a", [b"two from a"]),
        (b"token-b", [b"one from b"]),
    ]
    assert [m for rid, m in got if rid == b"token-a"] == [[b"one from a"], [b"two from a"]]
    assert server.send(b"token-b", b"reply to b")
    assert server.send(b"token-a", b"x" * 1000)  # a long frame
    for sock, want in ((b, b"reply to b"), (a, b"x" * 1000)):
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        assert sock.recv() == want


def test_the_activations_own_channel_speaks_to_it(server: SandboxServer) -> None:
    """`sandbox_host.channel` is what every activation runs: Hello out, Ack back, both decoded."""
    from sandbox_host.channel import Channel

    done: queue.Queue[object] = queue.Queue()

    def activation() -> None:
        ch = Channel(f"ipc://{server.path}", "a" * 32, timeout_s=10)
        ch.send(Hello(token="a" * 32, pid=os.getpid(), protocol_version=PROTOCOL_VERSION))
        done.put(ch.recv(ExitCode.NO_ACK))

    thread = threading.Thread(target=activation, daemon=True)
    thread.start()
    [(rid, frames)] = take(server, 1)
    assert rid == b"a" * 32
    hello = decode_from_activation(frames[0])
    assert isinstance(hello, Hello) and hello.token == "a" * 32
    assert server.send(rid, encode(Ack()))
    thread.join(10)
    assert isinstance(done.get(timeout=1), Ack)


def test_a_message_of_several_frames_arrives_as_its_frames(
    server: SandboxServer, zctx: Ctx
) -> None:
    a = dealer(zctx, server, b"t")
    a.send_multipart([b"first", b"second"])
    assert take(server, 1) == [(b"t", [b"first", b"second"])]


def test_an_oversize_frame_drops_its_peer_and_no_one_else(
    server: SandboxServer, zctx: Ctx, log: Recorder
) -> None:
    big, fine = dealer(zctx, server, b"big"), dealer(zctx, server, b"fine")
    big.send(b"x" * (MAX_MESSAGE + 1))
    fine.send(b"hello")
    got = take(server, 1) + settle(server)
    assert got == [(b"fine", [b"hello"])]
    assert any("more than" in r for r in log.reasons())
    assert server.send(b"fine", b"still here")


def test_a_taken_routing_id_is_refused_and_the_first_holder_keeps_it(
    server: SandboxServer, zctx: Ctx, log: Recorder
) -> None:
    first = dealer(zctx, server, b"token")
    first.send(b"from the first")
    assert take(server, 1) == [(b"token", [b"from the first"])]
    second = dealer(zctx, server, b"token")
    second.send(b"from the second")
    assert settle(server) == []
    assert "a routing id already connected" in log.reasons()
    assert server.send(b"token", b"to the first")
    first.setsockopt(zmq.RCVTIMEO, 10_000)
    assert first.recv() == b"to the first"


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64,
        zmtp.greeting()[:10] + b"\x7f\x02" + b"\0" * 52,  # ZMTP 2
        zmtp.greeting()[:12] + b"CURVE".ljust(20, b"\0") + b"\0" * 32,
        zmtp.greeting() + zmtp.frame(b"a message before READY"),
        zmtp.greeting() + zmtp.ready(b"PUB", b"t"),
        zmtp.greeting() + zmtp.ready(b"DEALER", b"t" * 256),
        zmtp.greeting() + zmtp.ready(b"DEALER", b"t") + b"\x40\x00",  # reserved flag bits
    ],
)
def test_what_is_not_a_zmtp3_dealer_is_closed(server: SandboxServer, garbage: bytes) -> None:
    sock = raw_client(server)
    sock.sendall(garbage)
    assert closed_by_server(sock, server)
    assert settle(server) == []


def test_a_peer_that_never_finishes_its_handshake_is_closed(
    server: SandboxServer, log: Recorder
) -> None:
    sock = raw_client(server)
    sock.sendall(zmtp.greeting())  # and never READY
    settle(server, 3)
    server.expire(time.monotonic() + server.handshake_s + 1)
    assert closed_by_server(sock, server)
    assert "no handshake in time" in log.reasons()


def test_one_process_gets_only_a_few_connections(server: SandboxServer, log: Recorder) -> None:
    socks = [raw_client(server) for _ in range(server.max_per_peer + 2)]
    settle(server, 5)
    closed = [closed_by_server_quickly(s, server) for s in socks]
    assert closed.count(True) == 2 and not any(closed[: server.max_per_peer])
    assert "too many connections" in log.reasons()
    for s in socks[:1]:
        s.close()
    settle(server, 5)
    again = raw_client(server)  # a slot came back
    assert not closed_by_server_quickly(again, server)


def closed_by_server_quickly(sock: socket.socket, srv: SandboxServer) -> bool:
    sock.settimeout(0)
    settle(srv, 5)
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return False
    return data == b""


def test_a_flood_waits_in_its_own_queue_and_others_go_first(server: SandboxServer) -> None:
    noisy, quiet = raw_dealer(server, b"noisy"), raw_dealer(server, b"quiet")
    quiet.sendall(zmtp.frame(b"hello"))
    assert take(server, 1) == [(b"quiet", [b"hello"])]
    noisy.sendall(b"".join(zmtp.frame(b"%d" % i) for i in range(500)))
    settle_without_taking(server)
    quiet.sendall(zmtp.frame(b"me too"))
    got = take(server, 501)
    order = [rid for rid, _ in got]
    # the quiet peer's message is among the first handed out after it arrived, not after the
    # flood: the noisy one had at most a tick's share before it
    assert order.index(b"quiet") <= TICK
    assert [m[0] for rid, m in got if rid == b"noisy"] == [b"%d" % i for i in range(500)]


def raw_dealer(srv: SandboxServer, rid: bytes) -> socket.socket:
    """A DEALER peer written by hand: what it sends is in the socket when `sendall` returns."""
    sock = raw_client(srv)
    sock.sendall(zmtp.greeting() + zmtp.ready(b"DEALER", rid))
    return sock


def settle_without_taking(srv: SandboxServer) -> None:
    """Let the server read what it will without taking anything: what it holds stays bounded."""
    for _ in range(10):
        select.select([srv.fileno()], [], [], 0.02)
        srv.pump()
        for peer in srv.by_fd.values():
            assert len(peer.inbox) <= MAX_QUEUED
            assert len(peer.inbuf) <= MAX_MESSAGE + 256 * 1024 + 64 * 1024


def test_a_reply_larger_than_the_socket_buffer_arrives_whole(
    server: SandboxServer, zctx: Ctx
) -> None:
    a = dealer(zctx, server, b"t")
    a.send(b"hi")
    take(server, 1)
    body = os.urandom(8 * 1024 * 1024)
    assert server.send(b"t", body)
    assert server.send(b"t", b"after it")
    got: list[bytes] = []

    def reader() -> None:
        a.setsockopt(zmq.RCVTIMEO, 20_000)
        got.append(a.recv())
        got.append(a.recv())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while thread.is_alive() and time.monotonic() < deadline:
        tick(server, 0.02)  # writable peers get the rest of what waits for them
    thread.join(1)
    assert got == [body, b"after it"]


def test_what_a_peer_sent_before_it_closed_is_still_delivered(server: SandboxServer) -> None:
    sock = raw_client(server)
    sock.sendall(zmtp.greeting() + zmtp.ready(b"DEALER", b"gone") + zmtp.frame(b"last words"))
    sock.close()
    assert take(server, 1) == [(b"gone", [b"last words"])]
    assert not server.send(b"gone", b"too late")


def test_a_peer_without_a_routing_id_gets_one_no_token_can_match(
    server: SandboxServer, zctx: Ctx
) -> None:
    anon = zctx.socket(zmq.DEALER)
    anon.setsockopt(zmq.LINGER, 0)
    anon.connect(f"ipc://{server.path}")
    anon.send(b"who am i")
    [(rid, frames)] = take(server, 1)
    assert rid.startswith(b"\0") and frames == [b"who am i"]


def test_a_last_message_is_written_whole_and_then_the_connection_ends(
    server: SandboxServer,
) -> None:
    small, big = raw_dealer(server, b"small"), raw_dealer(server, b"big")
    small.sendall(zmtp.frame(b"hi"))
    big.sendall(zmtp.frame(b"hi"))
    take(server, 2)
    body = os.urandom(4 * 1024 * 1024)  # more than a socket buffer: written over several ticks
    assert server.send(b"small", b"bye", last=True)
    assert server.send(b"big", body, last=True)
    assert not server.send(b"small", b"after the last")  # nothing follows a last message
    for sock, want in ((small, b"bye"), (big, body)):
        sock.settimeout(0)
        data = bytearray()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            tick(server, 0.01)
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                break
            data += chunk
        handshake = len(zmtp.greeting() + zmtp.ready(b"ROUTER", b""))
        assert bytes(data[handshake:]) == zmtp.frame(want)  # then the end of the stream
    assert not server.by_fd  # both connections are gone from the server


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prefix=st.sampled_from([b"", zmtp.greeting(), zmtp.greeting() + zmtp.ready(b"DEALER", b"x")]),
    noise=st.binary(max_size=2048),
)
def test_any_bytes_from_a_peer_leave_the_server_serving_others(
    server: SandboxServer, prefix: bytes, noise: bytes
) -> None:
    """Whatever a peer writes, the server neither raises nor stops serving a good peer."""
    bad = raw_client(server)
    bad.sendall(prefix + noise)
    bad.close()
    good = raw_dealer(server, b"good")
    good.sendall(zmtp.frame(b"still here"))
    got = take(server, 1) + settle(server, 3)
    assert (b"good", [b"still here"]) in got
    assert all(rid in (b"good", b"x") or rid.startswith(b"\0") for rid, _ in got)
    good.close()
    settle(server, 2)  # the server notices both closes before the next example


def test_admit_refuses_a_routing_id_by_the_uid_the_kernel_reports(
    tmp_path: Path, log: Recorder
) -> None:
    """The supervisor passes `admit`: a token is good only from its activation's sandbox uid.
    The uid is the kernel's (SO_PEERCRED), whatever the peer claims."""
    asked: list[tuple[bytes, int]] = []

    def admit(identity: bytes, uid: int) -> str | None:
        asked.append((identity, uid))
        return "not from this uid" if identity == b"theirs" else None

    srv = SandboxServer(
        tmp_path / "s.sock", mode=0o600, max_message=MAX_MESSAGE, max_queued=4, log=log,
        admit=admit,
    )  # fmt: skip
    try:
        theirs, ours = raw_dealer(srv, b"theirs"), raw_dealer(srv, b"ours")
        theirs.sendall(zmtp.frame(b"forged"))
        ours.sendall(zmtp.frame(b"fine"))
        assert take(srv, 1) + settle(srv, 3) == [(b"ours", [b"fine"])]
        assert closed_by_server(theirs, srv)
        assert "not from this uid" in log.reasons()
        assert sorted(asked) == [(b"ours", os.geteuid()), (b"theirs", os.geteuid())]
    finally:
        srv.close()
