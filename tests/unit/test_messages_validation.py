"""What the protocol layer and the supervisor refuse from an activation: non-finite and absurd
numbers, commands that contradict the journal, inspections that do not match the code; and how
the runtime records an error that resists being printed."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol import messages as m
from protocol.codec import decode_from_activation, decode_request, encode
from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import MAX_EPOCH_S, MAX_TIMEOUT_S, MAX_WORKFLOWS
from sandbox_host.runtime import duration_s, error_info
from supervisor import engine
from supervisor import journal as j
from supervisor.activation import DeployRequest
from supervisor.activation_messages import deployed_workflows

T0 = 1_700_000_000.0
NAN, INF = float("nan"), float("inf")

STEP = {
    "seq": 0,
    "name": "s",
    "attempt": 1,
    "retry_limit": 0,
    "retry_delay_s": 0.0,
    "backoff": "constant",
    "timeout_s": 1.0,
}
MARKS = [1.0, 2.0, 3.0, 4.0, 5.0]


def frame(tag: str, **fields: Any) -> bytes:
    """An activation message as raw msgpack, so no struct constructor is in the way."""
    return encode({"t": tag, **fields})


@pytest.mark.parametrize(
    ("tag", "fields"),
    [
        ("sleep", {"seq": 0, "name": "s", "until": NAN}),
        ("sleep", {"seq": 0, "name": "s", "until": INF}),
        ("sleep", {"seq": 0, "name": "s", "until": -INF}),
        ("sleep", {"seq": 0, "name": "s", "until": MAX_EPOCH_S * 2}),
        ("wait_event", {"seq": 0, "name": "w", "type": "go", "timeout_s": 1e300}),
        ("wait_event", {"seq": 0, "name": "w", "type": "go", "timeout_s": INF}),
        ("step_started", {**STEP, "timeout_s": NAN}),
        ("step_started", {**STEP, "timeout_s": MAX_TIMEOUT_S * 2}),
        ("step_started", {**STEP, "retry_delay_s": INF}),
        ("step_started", {**STEP, "retry_delay_s": NAN}),
        ("step_started", {**STEP, "attempt": 2**62}),
        ("step_result", {"seq": 0, "ok": True, "value": b"1", "duration_ms": NAN}),
        ("step_result", {"seq": 0, "ok": True, "value": b"1", "duration_ms": INF}),
        ("complete", {"output": b"1", "marks": [1.0, 2.0, NAN, 4.0, 5.0]}),
        ("complete", {"output": b"1", "marks": [1.0, 2.0, 3.0, INF, 5.0]}),
        ("hello", {"token": "t", "pid": -1, "protocol_version": 1}),
        ("hello", {"token": "t", "pid": 2**40, "protocol_version": 1}),
        ("hello", {"token": "t" * 1000, "pid": 5, "protocol_version": 1}),
        ("fail", {"error": {"type": "E", "message": "m", "code": "x" * 1000}}),
        ("inspected", {"workflows": ["w"] * (MAX_WORKFLOWS + 1)}),
    ],
)
def test_absurd_activation_fields_are_refused(tag: str, fields: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_from_activation(frame(tag, **fields))
    assert exc.value.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    ("tag", "fields"),
    [
        ("sleep", {"seq": 0, "name": "s", "until": T0, "marks": MARKS}),
        ("sleep", {"seq": 0, "name": "s", "until": 0.0}),
        ("wait_event", {"seq": 0, "name": "w", "type": "go", "timeout_s": MAX_TIMEOUT_S}),
        ("step_started", {**STEP, "retry_delay_s": MAX_TIMEOUT_S}),
        ("step_result", {"seq": 0, "ok": True, "value": b"1", "duration_ms": 12.5}),
        ("hello", {"token": "t", "pid": 4_194_304, "protocol_version": 1}),
    ],
)
def test_sane_activation_fields_decode(tag: str, fields: dict[str, Any]) -> None:
    decode_from_activation(frame(tag, **fields))


@pytest.mark.parametrize("since", [NAN, INF, -1.0, 1e300])
def test_usage_since_must_be_a_date(since: float) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_request(encode({"t": "usage", "rid": 1, "since": since}))
    assert exc.value.code is ErrorCode.BAD_REQUEST


# ---------------------------------------------------------------- inspections against the code


def deploy(code: bytes, kind: str = "source") -> DeployRequest:
    return DeployRequest(b"peer", 1, kind, "wf.py", code, "v1")


SOURCE = b'@workflow("alpha")\ndef a(e, s): ...\n@workflow("beta")\ndef b(e, s): ...\n'


def test_reported_workflows_named_in_the_code_are_deployed_once_each() -> None:
    assert deployed_workflows(deploy(SOURCE), ["beta", "alpha", "beta"]) == ["alpha", "beta"]


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (b"@workflow('single')\n", "single"),
        (b'@stepvisor.workflow( name = "kw" )\n', "kw"),
        ('@workflow("caf\u00e9 \u2713")\n'.encode(), "caf\u00e9 \u2713"),
        (b"@workflow(\n    'wrapped'\n)\n", "wrapped"),
    ],
)
def test_workflow_names_written_as_literals_are_found(code: bytes, name: str) -> None:
    assert deployed_workflows(deploy(code), [name]) == [name]


def test_a_pickle_deploys_the_one_name_it_holds() -> None:
    assert deployed_workflows(deploy(b"\x80\x05\x8c\x05alpha", "pickle"), ["alpha"]) == ["alpha"]


@pytest.mark.parametrize(
    ("code", "kind", "reported", "why"),
    [
        (SOURCE, "source", ["ghost"], "does not name"),
        (SOURCE + b"# ghost\n", "source", ["ghost"], "does not name"),  # not in workflow(...)
        (b"NAME = 'ghost'\n@workflow(NAME)\n", "source", ["ghost"], "as a literal"),
        (b"\x80\x05\x8c\x05alpha", "pickle", ["ghost"], "does not name"),
        (SOURCE + b"# a,b\n", "source", ["a,b"], "comma"),
        (SOURCE + b"# a\x1bb\n", "source", ["a\x1bb"], "control character"),
        (SOURCE, "source", [], "0 workflows"),
        (SOURCE, "pickle", ["alpha", "beta"], "one workflow"),
    ],
)
def test_an_inspection_that_does_not_match_the_code_fails_the_deploy(
    code: bytes, kind: str, reported: list[str], why: str
) -> None:
    with pytest.raises(ProtocolError) as exc:
        deployed_workflows(deploy(code, kind), reported)
    assert exc.value.code is ErrorCode.DEPLOY_FAILED
    assert why in exc.value.message


# ---------------------------------------------------------------- the supervisor's journal check


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = j.connect(tmp_path / "stepvisor.db")
    j.insert_instance(c, "acme", "i", "wf", "v1", b"null", T0, "queued")
    j.upsert_entry(c, "acme", "i", 0, kind="step", name="a", status="retry", started_at=T0)
    j.upsert_entry(
        c, "acme", "i", 1, kind="wait_event", name="w", event_type="go", status="waiting",
        until=T0 + 60, started_at=T0,
    )  # fmt: skip
    yield c
    c.close()


def started(seq: int, name: str) -> m.StepStarted:
    return m.StepStarted(
        seq=seq, name=name, attempt=2, retry_limit=3, retry_delay_s=0.0,
        backoff="constant", timeout_s=1.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("msg", "diverges"),
    [
        (started(0, "a"), False),
        (started(0, "b"), True),
        (m.SleepCmd(seq=0, name="a", until=T0), True),
        (m.WaitEventCmd(seq=0, name="a", type="go", timeout_s=1.0), True),
        (m.WaitEventCmd(seq=1, name="w", type="go", timeout_s=1.0), False),
        (m.WaitEventCmd(seq=1, name="w", type="other", timeout_s=1.0), True),
        (started(2, "anything"), False),  # a new seq: nothing to contradict
    ],
)
def test_a_command_at_a_journaled_seq_must_match_the_journal(
    conn: sqlite3.Connection, msg: Any, diverges: bool
) -> None:
    why = engine.divergence(conn, "acme", "i", msg)
    assert (why is not None) == diverges


def test_attempt_errors_keep_the_newest_per_step(conn: sqlite3.Connection) -> None:
    for attempt in range(1, j.KEPT_ATTEMPT_ERRORS + 6):
        err = m.ErrorInfo(type="E", message=f"attempt {attempt}")
        j.add_attempt_error(conn, "acme", "i", 0, attempt, err, T0 + attempt)
    kept = [r["attempt"] for r in j.attempt_errors(conn, "acme", "i")]
    assert kept == list(range(6, j.KEPT_ATTEMPT_ERRORS + 6))
    j.delete_instance(conn, "acme", "i")
    assert j.attempt_errors(conn, "acme", "i") == []


@pytest.mark.parametrize("ts", [NAN, INF, -INF, 1e300, -1e300])
def test_a_time_that_is_no_date_prints_as_none(ts: float) -> None:
    assert engine.iso(ts) is None


def test_backoff_is_capped_so_a_wake_time_stays_a_date() -> None:
    delay = engine.retry_delay_s(MAX_TIMEOUT_S, "exponential", 10_000)
    assert delay == MAX_TIMEOUT_S
    assert engine.iso(T0 + delay) is not None


# ---------------------------------------------------------------- the runtime's side


@pytest.mark.parametrize("value", [NAN, INF, -1.0])
def test_durations_are_finite_and_not_negative(value: float) -> None:
    with pytest.raises(ValueError):
        duration_s(value, "seconds")


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


class Unrepresentable(Unprintable):
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


@pytest.mark.parametrize("cls", [Unprintable, Unrepresentable])
def test_an_error_that_will_not_print_is_still_recorded(cls: type[Exception]) -> None:
    try:
        raise cls("details")
    except cls as exc:
        info = error_info(exc)
    assert info.type.endswith(cls.__qualname__)
    assert info.message  # repr(), or a sentence saying neither str nor repr worked
    assert "test_an_error_that_will_not_print_is_still_recorded" in info.traceback


def test_library_exception_types_are_qualified_by_module() -> None:
    import json

    try:
        json.loads("{")
    except ValueError as exc:
        assert error_info(exc).type == "json.decoder.JSONDecodeError"
    try:
        raise KeyError("k")
    except KeyError as exc:
        assert error_info(exc).type == "KeyError"
