"""Garbage on every socket gets a typed error or is dropped; the daemon never goes down."""

from __future__ import annotations

import msgspec
import pytest
import zmq

from protocol.codec import decode_reply, encode
from protocol.messages import Create, Hello, Ping
from stepvisor.client import StepVisorError
from tests.conftest import Daemon, deploy_source, wait_for

SRC = """
from stepvisor import workflow

@workflow("w")
def w(event, step):
    return step.do("one", lambda: event.payload)
"""


@pytest.fixture
def raw(daemon: Daemon):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    yield sock
    sock.close()
    ctx.term()


def ask(sock: zmq.Socket, *frames: bytes) -> dict:
    sock.send_multipart(list(frames))
    assert sock.poll(10_000), "no reply"
    reply = decode_reply(sock.recv())
    assert not reply.ok and reply.error is not None
    return {"code": reply.error.code, "message": reply.error.message}


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        ([b"\xc1 garbage"], "MALFORMED"),
        ([b""], "MALFORMED"),
        ([msgspec.msgpack.encode({"t": "launch_missiles", "rid": 1})], "BAD_REQUEST"),
        (
            [msgspec.msgpack.encode({"t": "status", "rid": "one", "tenant": "a", "id": "x"})],
            "BAD_REQUEST",
        ),
        (
            [msgspec.msgpack.encode({"t": "status", "rid": 1, "tenant": "../etc", "id": "x"})],
            "BAD_REQUEST",
        ),
        (
            [msgspec.msgpack.encode({"t": "status", "rid": 1, "tenant": "a", "id": "a/b"})],
            "BAD_REQUEST",
        ),
        ([msgspec.msgpack.encode([1, 2, 3])], "BAD_REQUEST"),
        ([encode(Ping(rid=1)), b"extra frame"], "MALFORMED"),
        ([b"\x00" * (17 << 20)], "TOO_LARGE"),
    ],
    ids=[
        "garbage",
        "empty",
        "unknown-tag",
        "wrong-type",
        "bad-tenant",
        "bad-id",
        "not-a-map",
        "two-frames",
        "oversize",
    ],
)
def test_malformed_requests_get_typed_errors(daemon: Daemon, raw, frames, expected) -> None:
    assert ask(raw, *frames)["code"] == expected
    assert daemon.client().ping()


def test_bad_payloads_are_refused_with_reasons(daemon: Daemon, raw) -> None:
    c = daemon.client()
    deploy_source(c, "acme", SRC)
    big = b'"' + b"x" * (1 << 20) + b'"'
    r = ask(raw, encode(Create(rid=2, tenant="acme", workflow="w", params=big)))
    assert r["code"] == "TOO_LARGE" and "params" in r["message"]
    r = ask(raw, encode(Create(rid=3, tenant="acme", workflow="w", params=b"{not json")))
    assert r["code"] == "BAD_REQUEST" and "JSON" in r["message"]
    r = ask(raw, encode(Create(rid=4, tenant="acme", workflow="w", params=b"NaN")))
    assert r["code"] == "BAD_REQUEST"
    with pytest.raises(StepVisorError) as exc:
        c.create("acme", "w", {"n": float("nan")})
    assert exc.value.code == "BAD_REQUEST"
    assert c.list("acme") == []
    c.create("acme", "w", [1, 2], id="fine")
    assert c.wait("acme", "fine", timeout_s=30)["output"] == [1, 2]


def test_a_flooding_peer_is_ignored_after_repeated_garbage(daemon: Daemon, raw) -> None:
    for _ in range(10):
        ask(raw, b"junk")
    raw.send(b"junk")
    assert not raw.poll(500)  # now ignored, not answered
    assert daemon.client().ping()


def test_forged_tokens_on_the_sandbox_socket_are_dropped(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", SRC)
    ctx = zmq.Context()
    try:
        for ident, frame in [
            (b"f" * 32, encode(Hello(token="f" * 32, pid=1, protocol_version=1))),
            (b"g" * 32, b"\x00garbage"),
        ]:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.ROUTING_ID, ident)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"ipc://{daemon.run_dir / 'sandbox.sock'}")
            s.send(frame)
            assert not s.poll(300)  # no Activate for a token the supervisor never issued
            s.close()
    finally:
        ctx.term()
    wait_for(lambda: len(daemon.events("sandbox.unknown_token")) >= 2, 10, "drop to be logged")
    c.create("acme", "w", 5, id="ok")
    assert c.wait("acme", "ok", timeout_s=30)["output"] == 5


def test_hostile_step_results_do_not_hurt_the_daemon(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(
        c,
        "acme",
        """
        from stepvisor import workflow

        @workflow("w")
        def w(event, step):
            big = step.do("too big", lambda: "x" * (2 << 20), retries={"limit": 0})
    """,
    )
    c.create("acme", "w", id="big")
    st = c.wait("acme", "big", timeout_s=30)
    assert st["status"] == "errored"
    (entry,) = c.history("acme", "big")["entries"]
    assert entry["error"]["type"] == "StepResultError"
    assert "limit" in entry["error"]["message"]
    assert daemon.alive()


def test_a_request_that_fails_validation_is_answered_under_its_own_id(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", SRC)
    # The client library lets the server validate: an out-of-range limit comes back as a typed
    # error for this very call, not as a timeout.
    with pytest.raises(StepVisorError) as exc:
        c.list("acme", limit=100_001)
    assert exc.value.code == "BAD_REQUEST" and "limit" in exc.value.message
    assert c.list("acme") == []
