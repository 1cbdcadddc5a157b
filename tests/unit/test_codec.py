"""protocol.codec: every message round-trips; a peer can only ever cause a ProtocolError."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import messages as m
from protocol.codec import (
    decode_from_activation,
    decode_reply,
    decode_request,
    decode_to_activation,
    dump_json,
    encode,
    load_json,
)
from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import (
    MAX_CLIENT_FRAME_BYTES,
    MAX_EPOCH_S,
    MAX_PAYLOAD_BYTES,
    MAX_SANDBOX_FRAME_BYTES,
    MAX_TIMEOUT_S,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- strategies for valid messages

tenants = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")
instance_ids = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_-]{0,99}\Z")
names = st.text(min_size=1, max_size=256)
short_text = st.text(max_size=200)
rids = st.integers(min_value=-(2**63), max_value=2**64 - 1)
seqs = st.integers(min_value=0, max_value=1_000_000)
json_bytes = st.binary(max_size=200)  # the codec carries JSON as opaque bytes
finite = st.floats(allow_nan=False)
positive = st.floats(min_value=0, exclude_min=True, allow_nan=False)
non_negative = st.floats(min_value=0, allow_nan=False)
# What an activation may send: finite and bounded (see protocol.messages).
timeouts = st.floats(min_value=0, max_value=MAX_TIMEOUT_S, exclude_min=True)
delays = st.floats(min_value=0, max_value=MAX_TIMEOUT_S)
epochs = st.floats(min_value=0, max_value=MAX_EPOCH_S)
statuses = st.sampled_from(
    ["queued", "running", "paused", "waiting", "errored", "terminated", "complete"]
)
backoffs = st.sampled_from(["constant", "linear", "exponential"])

error_infos = st.builds(
    m.ErrorInfo,
    type=st.text(max_size=256),
    message=short_text,
    traceback=short_text,
    code=st.none() | st.sampled_from([c.value for c in ErrorCode]),
)

requests = st.one_of(
    st.builds(
        m.Deploy,
        rid=rids,
        tenant=tenants,
        filename=names,
        source=st.none() | st.binary(max_size=300),
        pickled=st.none() | st.binary(max_size=300),
    ),
    st.builds(
        m.Create,
        rid=rids,
        tenant=tenants,
        workflow=names,
        id=st.none() | instance_ids,
        params=json_bytes,
    ),
    st.builds(
        m.CreateBatch,
        rid=rids,
        tenant=tenants,
        workflow=names,
        items=st.lists(st.builds(m.BatchItem, id=instance_ids, params=json_bytes), max_size=5),
    ),
    st.builds(m.GetStatus, rid=rids, tenant=tenants, id=instance_ids),
    st.builds(
        m.ListInstances,
        rid=rids,
        tenant=tenants,
        status=st.none() | statuses,
        limit=st.integers(min_value=1, max_value=100_000),
    ),
    st.builds(
        m.SendEvent, rid=rids, tenant=tenants, id=instance_ids, type=names, payload=json_bytes
    ),
    st.builds(
        m.Control,
        rid=rids,
        tenant=tenants,
        id=instance_ids,
        op=st.sampled_from(["pause", "resume", "terminate", "restart", "delete"]),
    ),
    st.builds(m.GetHistory, rid=rids, tenant=tenants, id=instance_ids),
    st.builds(m.Ping, rid=rids),
)

from_activation = st.one_of(
    st.builds(
        m.Hello,
        token=st.text(max_size=128),
        pid=st.integers(1, 2**22),
        protocol_version=st.integers(0, 99),
    ),
    st.builds(
        m.StepStarted,
        seq=seqs,
        name=names,
        attempt=st.integers(1, 10**6),
        retry_limit=st.integers(0, 10_000),
        retry_delay_s=delays,
        backoff=backoffs,
        timeout_s=timeouts,
    ),
    st.builds(
        m.StepResult,
        seq=seqs,
        ok=st.booleans(),
        value=st.none() | json_bytes,
        error=st.none() | error_infos,
        retryable=st.booleans(),
        duration_ms=delays,
    ),
    st.builds(m.SleepCmd, seq=seqs, name=names, until=epochs),
    st.builds(m.WaitEventCmd, seq=seqs, name=names, type=names, timeout_s=timeouts),
    st.builds(m.CompleteCmd, output=json_bytes),
    st.builds(m.FailCmd, error=error_infos),
    st.builds(m.Inspected, workflows=st.lists(names, max_size=5)),
)

journal_entries = st.builds(
    m.JournalEntry,
    seq=seqs,
    kind=st.sampled_from(["step", "sleep", "wait_event"]),
    name=names,
    status=st.sampled_from(["ok", "error", "retry", "running", "sleeping", "waiting", "timeout"]),
    attempts=st.integers(0, 100),
    result=st.none() | json_bytes,
    error=st.none() | error_infos,
    until=st.none() | finite,
)

to_activation = st.one_of(
    st.builds(
        m.Activate,
        mode=st.sampled_from(["run", "inspect"]),
        tenant=short_text,
        filename=short_text,
        code_kind=st.sampled_from(["source", "pickle"]),
        code=st.binary(max_size=300),
        instance=short_text,
        workflow=short_text,
        params=json_bytes,
        created_at=finite,
        journal=st.lists(journal_entries, max_size=4),
        now=finite,
        max_timeout_s=finite,
    ),
    st.builds(m.Ack, ok=st.booleans(), error=st.none() | error_infos),
)

# Plain data a Reply's `result` may carry (no NaN: it never equals itself).
plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | finite
    | short_text
    | st.binary(max_size=50),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(short_text, kids, max_size=4),
    max_leaves=20,
)

replies = st.builds(
    m.Reply, rid=rids, ok=st.booleans(), result=plain, error=st.none() | error_infos
)


@FAST
@given(requests)
def test_every_request_round_trips(msg: Any) -> None:
    assert decode_request(encode(msg)) == msg


@FAST
@given(from_activation)
def test_every_activation_message_round_trips(msg: Any) -> None:
    assert decode_from_activation(encode(msg)) == msg


@FAST
@given(to_activation)
def test_every_supervisor_to_activation_message_round_trips(msg: Any) -> None:
    assert decode_to_activation(encode(msg)) == msg


@FAST
@given(replies)
def test_every_reply_round_trips(msg: m.Reply) -> None:
    assert decode_reply(encode(msg)) == msg


def test_requests_and_activation_messages_do_not_cross_decoders() -> None:
    # A client frame is not a valid activation message and vice versa: the tag decides.
    with pytest.raises(ProtocolError) as exc:
        decode_from_activation(encode(m.Ping(rid=1)))
    assert exc.value.code is ErrorCode.BAD_REQUEST
    with pytest.raises(ProtocolError) as exc:
        decode_request(encode(m.Hello(token="t", pid=1, protocol_version=1)))
    assert exc.value.code is ErrorCode.BAD_REQUEST


# ---------------------------------------------------------------- hostile input


def _only_protocol_errors(decode: Any, frame: bytes) -> None:
    try:
        decode(frame)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.MALFORMED, ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)
        assert str(exc).startswith(exc.code.value + ": ")
    # anything else propagates and fails the test


@FAST
@given(st.binary(max_size=512))
def test_garbage_bytes_only_raise_protocol_error(frame: bytes) -> None:
    _only_protocol_errors(decode_request, frame)
    _only_protocol_errors(decode_from_activation, frame)


TAGS = [
    "deploy",
    "create",
    "create_batch",
    "status",
    "list",
    "event",
    "control",
    "history",
    "ping",
    "hello",
    "step_started",
    "step_result",
    "sleep",
    "wait_event",
    "complete",
    "fail",
    "inspected",
    "activate",
    "ack",
    "nope",
    "",
]
FIELDS = [
    "rid",
    "tenant",
    "id",
    "workflow",
    "params",
    "items",
    "status",
    "limit",
    "type",
    "payload",
    "op",
    "filename",
    "source",
    "pickled",
    "token",
    "pid",
    "protocol_version",
    "seq",
    "name",
    "attempt",
    "retry_limit",
    "retry_delay_s",
    "backoff",
    "timeout_s",
    "ok",
    "value",
    "error",
    "retryable",
    "duration_ms",
    "until",
    "output",
    "workflows",
    "extra",
]

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(st.text(max_size=10) | st.integers(-5, 5), kids, max_size=4)
    ),
    max_leaves=25,
)
# Maps that look like messages (a known tag, known field names) reach the field validators.
message_like = st.builds(
    lambda tag, fields: {"t": tag, **fields},
    st.sampled_from(TAGS),
    st.dictionaries(st.sampled_from(FIELDS), msgpack_values, max_size=6),
)


@FAST
@given(msgpack_values | message_like)
def test_arbitrary_msgpack_values_only_raise_protocol_error(value: object) -> None:
    frame = msgspec.msgpack.encode(value)
    _only_protocol_errors(decode_request, frame)
    _only_protocol_errors(decode_from_activation, frame)


def test_deeply_nested_msgpack_is_a_protocol_error() -> None:
    frame = b"\x91" * 100_000 + b"\xc0"  # [[[[...nil...]]]]
    for decode in (decode_request, decode_from_activation):
        with pytest.raises(ProtocolError):
            decode(frame)


def test_oversize_client_frame_is_too_large_before_decoding() -> None:
    frame = b"\xc1" * (MAX_CLIENT_FRAME_BYTES + 1)  # 0xc1 is never valid msgpack
    with pytest.raises(ProtocolError) as exc:
        decode_request(frame)
    assert exc.value.code is ErrorCode.TOO_LARGE
    assert str(MAX_CLIENT_FRAME_BYTES) in exc.value.message


def test_oversize_activation_frame_is_too_large_even_if_valid() -> None:
    msg = m.StepResult(seq=0, ok=True, value=b'"' + b"x" * MAX_SANDBOX_FRAME_BYTES + b'"')
    frame = encode(msg)
    assert len(frame) > MAX_SANDBOX_FRAME_BYTES
    with pytest.raises(ProtocolError) as exc:
        decode_from_activation(frame)
    assert exc.value.code is ErrorCode.TOO_LARGE
    # under the frame limit, a value over the payload limit is refused too: the runtime never
    # sends one; a value at the payload limit decodes
    big = m.StepResult(seq=0, ok=True, value=b'"' + b"x" * MAX_PAYLOAD_BYTES + b'"')
    with pytest.raises(ProtocolError) as exc:
        decode_from_activation(encode(big))
    assert exc.value.code is ErrorCode.BAD_REQUEST
    small = m.StepResult(seq=0, ok=True, value=b'"' + b"x" * (MAX_PAYLOAD_BYTES - 2) + b'"')
    assert decode_from_activation(encode(small)) == small


def _code_of(decode: Any, value: object) -> ErrorCode:
    with pytest.raises(ProtocolError) as exc:
        decode(msgspec.msgpack.encode(value))
    return exc.value.code


REJECTED = (ErrorCode.MALFORMED, ErrorCode.BAD_REQUEST)


@pytest.mark.parametrize(
    "value",
    [
        {"t": "nope", "rid": 1},
        {"rid": 1},  # no tag
        {"t": "ping"},  # missing field
        {"t": "ping", "rid": "1"},  # wrong type
        {"t": "ping", "rid": 1.5},
        {"t": "ping", "rid": 1, "extra": 2},  # unknown field
        {"t": "status", "rid": 1, "tenant": "acme", "id": 7},
        {"t": "list", "rid": 1, "tenant": "acme", "limit": 0},
        {"t": "list", "rid": 1, "tenant": "acme", "status": "sleeping"},
        {"t": "control", "rid": 1, "tenant": "acme", "id": "i", "op": "explode"},
        {"t": "create", "rid": 1, "tenant": "acme", "workflow": "", "params": b"null"},
        {"t": "create", "rid": 1, "tenant": "acme", "workflow": "w", "params": "null"},
        [1, 2, 3],
        "ping",
        None,
    ],
    ids=repr,
)
def test_malformed_requests_are_rejected(value: object) -> None:
    assert _code_of(decode_request, value) in REJECTED


@pytest.mark.parametrize(
    "tenant", ["", "Acme", "-acme", "_acme", "ac me", "acme/x", "é", "a" * 64, "acme\x00"]
)
def test_invalid_tenant_names_are_rejected(tenant: str) -> None:
    req = {"t": "status", "rid": 1, "tenant": tenant, "id": "i1"}
    assert _code_of(decode_request, req) in REJECTED


@pytest.mark.parametrize("field,value", [("tenant", "acme\n"), ("id", "i1\n")])
def test_names_with_trailing_newline_are_rejected(field: str, value: str) -> None:
    req = {"t": "status", "rid": 1, "tenant": "acme", "id": "i1", field: value}
    assert _code_of(decode_request, req) in REJECTED


def test_valid_tenant_name_edges_are_accepted() -> None:
    for tenant in ("a", "0", "a" * 63, "acme_co-1"):
        assert decode_request(encode(m.GetStatus(rid=1, tenant=tenant, id="i"))).tenant == tenant


@pytest.mark.parametrize("iid", ["", "-x", "a b", "a" * 101, "a.b", "ü", "x/y"])
def test_invalid_instance_ids_are_rejected(iid: str) -> None:
    req = {"t": "status", "rid": 1, "tenant": "acme", "id": iid}
    assert _code_of(decode_request, req) in REJECTED
    assert (
        _code_of(
            decode_request, {"t": "create", "rid": 1, "tenant": "acme", "workflow": "w", "id": iid}
        )
        in REJECTED
    )


def test_instance_id_edges_are_accepted() -> None:
    for iid in ("_", "A", "a" * 100, "Z9_-x"):
        assert decode_request(encode(m.GetStatus(rid=1, tenant="t", id=iid))).id == iid


def test_step_names_are_limited_to_256_characters() -> None:
    ok = {
        "t": "step_started",
        "seq": 0,
        "name": "é" * 256,
        "attempt": 1,
        "retry_limit": 0,
        "retry_delay_s": 0.0,
        "backoff": "constant",
        "timeout_s": 1.0,
    }
    assert decode_from_activation(msgspec.msgpack.encode(ok)).name == "é" * 256
    for bad_name in ("x" * 257, ""):
        assert _code_of(decode_from_activation, ok | {"name": bad_name}) in REJECTED
    for tag in ("sleep", "wait_event"):
        msg = {"t": tag, "seq": 0, "name": "x" * 257, "until": 1.0, "type": "e", "timeout_s": 1.0}
        if tag == "sleep":
            del msg["type"], msg["timeout_s"]
        else:
            del msg["until"]
        assert _code_of(decode_from_activation, msg) in REJECTED


@pytest.mark.parametrize(
    "value",
    [
        {
            "t": "step_started",
            "seq": -1,
            "name": "a",
            "attempt": 1,
            "retry_limit": 0,
            "retry_delay_s": 0.0,
            "backoff": "constant",
            "timeout_s": 1.0,
        },
        {
            "t": "step_started",
            "seq": 0,
            "name": "a",
            "attempt": 0,
            "retry_limit": 0,
            "retry_delay_s": 0.0,
            "backoff": "constant",
            "timeout_s": 1.0,
        },
        {
            "t": "step_started",
            "seq": 0,
            "name": "a",
            "attempt": 1,
            "retry_limit": 0,
            "retry_delay_s": 0.0,
            "backoff": "fibonacci",
            "timeout_s": 1.0,
        },
        {
            "t": "step_started",
            "seq": 0,
            "name": "a",
            "attempt": 1,
            "retry_limit": 0,
            "retry_delay_s": 0.0,
            "backoff": "constant",
            "timeout_s": 0.0,
        },
        {"t": "wait_event", "seq": 0, "name": "a", "type": "", "timeout_s": 1.0},
        {"t": "step_result", "seq": 0, "ok": "yes"},
        {"t": "fail", "error": {"type": "x" * 257, "message": "m"}},
        {"t": "fail", "error": {"message": "m"}},
        {"t": "complete"},
        {"t": "inspected", "workflows": [""]},
        {"t": "hello", "token": "t", "pid": "1", "protocol_version": 1},
    ],
    ids=lambda v: v["t"],
)
def test_malformed_activation_messages_are_rejected(value: object) -> None:
    assert _code_of(decode_from_activation, value) in REJECTED


def test_truncated_and_trailing_frames_are_malformed() -> None:
    frame = encode(m.Ping(rid=7))
    with pytest.raises(ProtocolError) as exc:
        decode_request(frame[:-1])
    assert exc.value.code is ErrorCode.MALFORMED
    with pytest.raises(ProtocolError) as exc:
        decode_request(frame + b"\x00")
    assert exc.value.code is ErrorCode.MALFORMED


# ---------------------------------------------------------------- user JSON


@pytest.mark.parametrize(
    "value",
    [
        b"bytes",
        bytearray(b"x"),
        math.nan,
        math.inf,
        -math.inf,
        {1, 2},
        frozenset(),
        dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        dt.date(2024, 1, 1),
        object(),
        {"nested": [1, {"deep": b"x"}]},
        {(1, 2): "tuple key"},
    ],
    ids=lambda v: type(v).__name__,
)
def test_dump_json_refuses_non_json_values(value: object) -> None:
    with pytest.raises(ProtocolError) as exc:
        dump_json(value, what="the result of step 'a'")
    assert exc.value.code is ErrorCode.BAD_REQUEST
    assert "the result of step 'a' is not JSON-compatible" in exc.value.message


def test_dump_json_refuses_circular_values() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(ProtocolError) as exc:
        dump_json(loop)
    assert exc.value.code is ErrorCode.BAD_REQUEST


def test_dump_json_size_limit_is_exactly_one_mib() -> None:
    at_limit = "x" * (MAX_PAYLOAD_BYTES - 2)  # plus two quotes
    assert len(dump_json(at_limit)) == MAX_PAYLOAD_BYTES
    with pytest.raises(ProtocolError) as exc:
        dump_json(at_limit + "x", what="params")
    assert exc.value.code is ErrorCode.TOO_LARGE
    assert "params" in exc.value.message and str(MAX_PAYLOAD_BYTES) in exc.value.message


def test_dump_json_is_compact() -> None:
    assert dump_json({"a": [1, 2.5, None, True, "é"]}) == b'{"a":[1,2.5,null,true,"\\u00e9"]}'


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4)
    ),
    max_leaves=20,
)


@FAST
@given(json_values)
def test_json_values_round_trip_through_dump_and_load(value: object) -> None:
    assert load_json(dump_json(value)) == value


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"[1,]", b"NaN", b"Infinity", b"{'a': 1}", b"\xff\xfe", b"nul", b"1 2", b'{"a" 1}'],
    ids=repr,
)
def test_load_json_refuses_invalid_json(data: bytes) -> None:
    with pytest.raises(ProtocolError) as exc:
        load_json(data, what="event payload")
    assert exc.value.code is ErrorCode.BAD_REQUEST
    assert "event payload is not valid JSON" in exc.value.message


def test_load_json_refuses_oversize_payloads() -> None:
    with pytest.raises(ProtocolError) as exc:
        load_json(b'"' + b"x" * MAX_PAYLOAD_BYTES + b'"')
    assert exc.value.code is ErrorCode.TOO_LARGE


@FAST
@given(st.binary(max_size=200))
def test_load_json_on_garbage_only_raises_protocol_error(data: bytes) -> None:
    try:
        load_json(data)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST
