"""supervisor.engine on a real SQLite file: retries, sleeps, events, pause, activation failures."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.limits import MAX_TIMEOUT_S
from protocol.messages import ErrorInfo, SleepCmd, StepResult, StepStarted, WaitEventCmd
from supervisor import engine
from supervisor import journal as j
from supervisor.config import Limits

T0 = 1_700_000_000.0
TENANT, IID = "acme", "i1"
ERR = ErrorInfo(type="ValueError", message="nope", traceback="Traceback ...")


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = j.connect(tmp_path / "stepvisor.db")
    with j.transaction(c):
        assert engine.create(c, TENANT, IID, "wf", "v1", b"null", T0)
        j.update_instance(c, TENANT, IID, lease=1)  # an activation is running for it
    yield c
    c.close()


def inst(conn: sqlite3.Connection, iid: str = IID) -> sqlite3.Row:
    row = j.get_instance(conn, TENANT, iid)
    assert row is not None
    return row


def entry(conn: sqlite3.Connection, seq: int) -> sqlite3.Row:
    row = j.get_entry(conn, TENANT, IID, seq)
    assert row is not None
    return row


def lease(conn: sqlite3.Connection, activation: int = 1) -> None:
    j.update_instance(conn, TENANT, IID, lease=activation)


def start(
    conn: sqlite3.Connection,
    seq: int = 0,
    *,
    attempt: int = 1,
    limit: int = 3,
    delay: float = 10.0,
    backoff: Any = "exponential",
    now: float = T0,
    name: str = "charge",
) -> None:
    lease(conn)
    engine.step_started(
        conn,
        TENANT,
        IID,
        StepStarted(
            seq=seq,
            name=name,
            attempt=attempt,
            retry_limit=limit,
            retry_delay_s=delay,
            backoff=backoff,
            timeout_s=30.0,
        ),
        now,
    )


def assert_due_now(conn: sqlite3.Connection, now: float) -> None:
    """The instance is runnable at `now` (its wake time may sort it earlier, never later)."""
    row = inst(conn)
    assert row["lease"] is None
    assert row["wake_at"] is not None and row["wake_at"] <= now
    assert IID in j.due_instances(conn, TENANT, now, 100)


def finish_ok(conn: sqlite3.Connection, seq: int, value: bytes = b"1", now: float = T0) -> None:
    engine.step_result(conn, TENANT, IID, StepResult(seq=seq, ok=True, value=value), now)


# ---------------------------------------------------------------- retry policy


@pytest.mark.parametrize(
    "backoff,expected",
    [
        ("constant", [10, 10, 10, 10]),
        ("linear", [10, 20, 30, 40]),
        ("exponential", [10, 20, 40, 80]),
    ],
)
def test_retry_delay(backoff: str, expected: list[float]) -> None:
    assert [engine.retry_delay_s(10.0, backoff, n) for n in (1, 2, 3, 4)] == expected


def test_retry_delay_zero_and_huge_attempts() -> None:
    assert engine.retry_delay_s(0.0, "exponential", 5) == 0.0
    # the delay is capped at a year, so the wake time stays a printable date
    assert engine.retry_delay_s(1.0, "exponential", 10_000) == MAX_TIMEOUT_S


# ---------------------------------------------------------------- steps


def test_step_started_journals_a_running_entry(conn: sqlite3.Connection) -> None:
    start(conn, attempt=1, limit=4, delay=2.5, backoff="linear")
    e = entry(conn, 0)
    assert (
        e["kind"],
        e["name"],
        e["status"],
        e["attempts"],
        e["retry_limit"],
        e["retry_delay_s"],
        e["backoff"],
        e["timeout_s"],
        e["started_at"],
    ) == ("step", "charge", "running", 1, 4, 2.5, "linear", 30.0, T0)
    assert inst(conn)["status"] == "running"
    assert inst(conn)["lease"] == 1  # still leased until the result


def test_step_ok_journals_result_and_releases(conn: sqlite3.Connection) -> None:
    start(conn)
    finish_ok(conn, 0, b'{"id":7}', now=T0 + 2)
    e = entry(conn, 0)
    assert (e["status"], bytes(e["result"]), e["error"], e["finished_at"]) == (
        "ok",
        b'{"id":7}',
        None,
        T0 + 2,
    )
    row = inst(conn)
    assert (row["status"], row["steps"]) == ("running", 1)
    assert_due_now(conn, T0 + 2)


def test_step_failed_retries_while_attempt_within_limit_then_errors(
    conn: sqlite3.Connection,
) -> None:
    now = T0
    for attempt, delay in [(1, 10.0), (2, 20.0), (3, 40.0)]:
        start(conn, attempt=attempt, limit=3, delay=10.0, now=now)
        assert engine.step_failed(conn, TENANT, IID, 0, ERR, now, retryable=True) == "retry"
        e, row = entry(conn, 0), inst(conn)
        assert (e["status"], e["attempts"], e["finished_at"]) == ("retry", attempt, None)
        assert j.decode_error(e["error"]) == ERR
        assert (row["status"], row["wake_at"], row["lease"]) == ("running", now + delay, None)
        now += delay
    start(conn, attempt=4, limit=3, now=now)  # the third retry, i.e. the last allowed attempt
    assert engine.step_failed(conn, TENANT, IID, 0, ERR, now, retryable=True) == "error"
    e, row = entry(conn, 0), inst(conn)
    assert (e["status"], e["attempts"], e["finished_at"]) == ("error", 4, now)
    assert j.decode_error(e["error"]) == ERR
    # the workflow is woken at once to see StepFailed; the instance itself is not errored yet
    assert row["status"] == "running"
    assert_due_now(conn, now)


def test_retry_limit_zero_means_one_attempt(conn: sqlite3.Connection) -> None:
    start(conn, attempt=1, limit=0)
    assert engine.step_failed(conn, TENANT, IID, 0, ERR, T0, retryable=True) == "error"
    assert entry(conn, 0)["status"] == "error"


def test_non_retryable_error_is_final_at_once(conn: sqlite3.Connection) -> None:
    start(conn, attempt=1, limit=5)
    engine.step_result(
        conn,
        TENANT,
        IID,
        StepResult(seq=0, ok=False, error=ERR, retryable=False, duration_ms=3.0),
        T0 + 1,
    )
    e = entry(conn, 0)
    assert (e["status"], e["attempts"], e["duration_ms"]) == ("error", 1, 3.0)
    assert j.decode_error(e["error"]) == ERR
    assert_due_now(conn, T0 + 1)


def test_retryable_step_result_goes_through_the_policy(conn: sqlite3.Connection) -> None:
    start(conn, attempt=1, limit=5, delay=3.0, backoff="constant")
    engine.step_result(conn, TENANT, IID, StepResult(seq=0, ok=False, error=ERR), T0)
    assert entry(conn, 0)["status"] == "retry"
    assert inst(conn)["wake_at"] == T0 + 3.0


def test_a_later_success_clears_the_retry_error(conn: sqlite3.Connection) -> None:
    start(conn, attempt=1)
    engine.step_failed(conn, TENANT, IID, 0, ERR, T0, retryable=True)
    start(conn, attempt=2, now=T0 + 10)
    finish_ok(conn, 0, b"5", now=T0 + 11)
    e = entry(conn, 0)
    assert (e["status"], e["attempts"], e["error"], bytes(e["result"])) == ("ok", 2, None, b"5")


# ---------------------------------------------------------------- sleeps


def test_sleep_parks_the_instance_until_its_deadline(conn: sqlite3.Connection) -> None:
    engine.sleep(conn, TENANT, IID, SleepCmd(seq=0, name="nap", until=T0 + 100), T0)
    e, row = entry(conn, 0), inst(conn)
    assert (e["kind"], e["name"], e["status"], e["until"], e["started_at"]) == (
        "sleep",
        "nap",
        "sleeping",
        T0 + 100,
        T0,
    )
    assert (row["status"], row["wake_at"], row["lease"]) == ("waiting", T0 + 100, None)
    assert j.due_instances(conn, TENANT, T0 + 99, 10) == []
    assert j.due_instances(conn, TENANT, T0 + 100, 10) == [IID]


def test_resent_sleep_keeps_the_original_deadline(conn: sqlite3.Connection) -> None:
    engine.sleep(conn, TENANT, IID, SleepCmd(seq=0, name="nap", until=T0 + 100), T0)
    lease(conn)
    # a replay re-sends the same sleep, computing a later `until` from its own clock
    engine.sleep(conn, TENANT, IID, SleepCmd(seq=0, name="nap", until=T0 + 150), T0 + 50)
    e = entry(conn, 0)
    assert (e["until"], e["started_at"], e["status"]) == (T0 + 100, T0, "sleeping")
    assert inst(conn)["wake_at"] == T0 + 100


def test_sleep_in_the_past_wakes_now(conn: sqlite3.Connection) -> None:
    engine.sleep(conn, TENANT, IID, SleepCmd(seq=0, name="nap", until=T0 - 100), T0 + 5)
    assert_due_now(conn, T0 + 5)


# ---------------------------------------------------------------- events


def wait(
    conn: sqlite3.Connection,
    *,
    type_: str = "confirm",
    timeout: float = 100.0,
    now: float = T0,
    seq: int = 0,
) -> None:
    lease(conn)
    engine.wait_event(
        conn, TENANT, IID, WaitEventCmd(seq=seq, name="w", type=type_, timeout_s=timeout), now
    )


def test_wait_event_parks_until_the_deadline(conn: sqlite3.Connection) -> None:
    wait(conn, timeout=100)
    e, row = entry(conn, 0), inst(conn)
    assert (e["kind"], e["status"], e["event_type"], e["until"]) == (
        "wait_event",
        "waiting",
        "confirm",
        T0 + 100,
    )
    assert (row["status"], row["wake_at"], row["lease"]) == ("waiting", T0 + 100, None)


def test_resent_wait_keeps_the_original_deadline(conn: sqlite3.Connection) -> None:
    wait(conn, timeout=100, now=T0)
    wait(conn, timeout=100, now=T0 + 60)
    e = entry(conn, 0)
    assert (e["until"], e["started_at"], e["status"]) == (T0 + 100, T0, "waiting")
    assert inst(conn)["wake_at"] == T0 + 100


def test_wait_event_consumes_a_buffered_event_at_once(conn: sqlite3.Connection) -> None:
    j.add_event(conn, TENANT, IID, "other", b'"not me"', T0 - 20)
    ev = j.add_event(conn, TENANT, IID, "confirm", b'{"ok":true}', T0 - 10)
    j.add_event(conn, TENANT, IID, "confirm", b'"second"', T0 - 5)
    wait(conn, type_="confirm", now=T0, seq=0)
    e, row = entry(conn, 0), inst(conn)
    assert e["status"] == "ok"
    assert json.loads(bytes(e["result"])) == {
        "type": "confirm",
        "payload": {"ok": True},
        "timestamp": engine.iso(T0 - 10),
    }
    assert row["status"] == "running"
    assert_due_now(conn, T0)
    consumed = dict(conn.execute("SELECT id, consumed_seq FROM events").fetchall())
    assert consumed[ev] == 0
    assert list(consumed.values()).count(None) == 2  # the other type and the newer one are left


def test_event_result_is_valid_json_for_any_payload() -> None:
    row = {"type": 'quo"te', "created_at": T0, "payload": b'[1, {"a": null}]'}
    assert json.loads(engine.event_result(row)) == {  # type: ignore[arg-type]
        "type": 'quo"te',
        "timestamp": "2023-11-14T22:13:20.000+00:00",
        "payload": [1, {"a": None}],
    }


def test_deliver_event_wakes_a_waiting_instance_only_for_its_type(conn: sqlite3.Connection) -> None:
    wait(conn, type_="confirm", timeout=100, now=T0)
    j.add_event(conn, TENANT, IID, "other", b"1", T0 + 1)
    assert engine.deliver_event(conn, inst(conn), "other", T0 + 1) is False
    assert entry(conn, 0)["status"] == "waiting"
    assert inst(conn)["wake_at"] == T0 + 100

    j.add_event(conn, TENANT, IID, "confirm", b'"yes"', T0 + 2)
    assert engine.deliver_event(conn, inst(conn), "confirm", T0 + 2) is True
    e, row = entry(conn, 0), inst(conn)
    assert e["status"] == "ok"
    assert json.loads(bytes(e["result"]))["payload"] == "yes"
    assert row["status"] == "running"
    assert_due_now(conn, T0 + 2)
    # the unrelated event stays buffered for a later wait
    pending = conn.execute("SELECT type FROM events WHERE consumed_seq IS NULL").fetchall()
    assert [tuple(r) for r in pending] == [("other",)]


def test_deliver_event_does_nothing_while_leased_or_not_waiting(conn: sqlite3.Connection) -> None:
    # leased: the running activation will pick the event up when it sends its wait
    j.add_event(conn, TENANT, IID, "confirm", b"1", T0)
    assert engine.deliver_event(conn, inst(conn), "confirm", T0) is False
    # sleeping, not waiting for an event
    engine.sleep(conn, TENANT, IID, SleepCmd(seq=0, name="nap", until=T0 + 100), T0)
    assert engine.deliver_event(conn, inst(conn), "confirm", T0) is False
    assert entry(conn, 0)["status"] == "sleeping"
    assert conn.execute("SELECT count(*) FROM events WHERE consumed_seq IS NULL").fetchone()[0] == 1


# ---------------------------------------------------------------- replay preparation


def test_prepare_replay_of_an_empty_journal(conn: sqlite3.Connection) -> None:
    assert engine.prepare_replay(conn, TENANT, IID, T0) == 0


def test_prepare_replay_next_seq_after_steps(conn: sqlite3.Connection) -> None:
    start(conn, 0)
    finish_ok(conn, 0)
    assert engine.prepare_replay(conn, TENANT, IID, T0) == 1
    start(conn, 1)
    engine.step_failed(conn, TENANT, IID, 1, ERR, T0, retryable=True)
    assert engine.prepare_replay(conn, TENANT, IID, T0 + 100) == 1  # retry the same seq
    start(conn, 1, attempt=2, limit=1)
    engine.step_failed(conn, TENANT, IID, 1, ERR, T0, retryable=True)
    assert engine.prepare_replay(conn, TENANT, IID, T0 + 100) == 2  # error is final


def test_prepare_replay_turns_an_elapsed_sleep_into_ok(conn: sqlite3.Connection) -> None:
    engine.sleep(conn, TENANT, IID, SleepCmd(seq=0, name="nap", until=T0 + 100), T0)
    assert engine.prepare_replay(conn, TENANT, IID, T0 + 99) == 0
    assert entry(conn, 0)["status"] == "sleeping"
    assert engine.prepare_replay(conn, TENANT, IID, T0 + 100) == 1
    e = entry(conn, 0)
    assert (e["status"], e["finished_at"]) == ("ok", T0 + 100)
    assert j.journal_entries(conn, TENANT, IID)[0].status == "ok"


def test_prepare_replay_turns_an_expired_wait_into_timeout(conn: sqlite3.Connection) -> None:
    wait(conn, type_="confirm", timeout=100, now=T0)
    assert engine.prepare_replay(conn, TENANT, IID, T0 + 50) == 0
    assert entry(conn, 0)["status"] == "waiting"
    assert engine.prepare_replay(conn, TENANT, IID, T0 + 100) == 1
    e = entry(conn, 0)
    assert (e["status"], e["finished_at"]) == ("timeout", T0 + 100)
    err = j.decode_error(e["error"])
    assert err is not None and err.type == "WaitTimeout" and "confirm" in err.message


def test_event_sent_before_the_deadline_while_paused_is_not_lost(conn: sqlite3.Connection) -> None:
    wait(conn, type_="confirm", timeout=100, now=T0)
    # pause (as api.control does for an unleased instance), then the event arrives in time
    j.update_instance(conn, TENANT, IID, status="paused", wake_at=None)
    j.add_event(conn, TENANT, IID, "confirm", b'"in time"', T0 + 50)
    assert engine.deliver_event(conn, inst(conn), "confirm", T0 + 50) is False
    # resumed after the deadline; the next activation prepares its replay
    j.update_instance(conn, TENANT, IID, status="running", wake_at=T0 + 200)
    engine.prepare_replay(conn, TENANT, IID, T0 + 200)
    e = entry(conn, 0)
    assert e["status"] == "ok"
    assert json.loads(bytes(e["result"]))["payload"] == "in time"


# ---------------------------------------------------------------- release, pause, completion


def test_release_honours_pause_requested(conn: sqlite3.Connection) -> None:
    start(conn)
    j.update_instance(conn, TENANT, IID, pause_requested=1)
    finish_ok(conn, 0, now=T0 + 1)
    row = inst(conn)
    assert (row["status"], row["wake_at"], row["lease"], row["pause_requested"]) == (
        "paused",
        None,
        None,
        0,
    )
    assert entry(conn, 0)["status"] == "ok"  # the result itself is kept
    assert j.due_instances(conn, TENANT, T0 + 1000, 10) == []


def test_pause_requested_before_a_sleep_parks_paused(conn: sqlite3.Connection) -> None:
    j.update_instance(conn, TENANT, IID, pause_requested=1)
    engine.sleep(conn, TENANT, IID, SleepCmd(seq=0, name="nap", until=T0 + 100), T0)
    assert (inst(conn)["status"], inst(conn)["wake_at"]) == ("paused", None)


@pytest.mark.parametrize("final", ["complete", "errored"])
def test_terminal_status_wins_over_pause_requested(conn: sqlite3.Connection, final: str) -> None:
    j.update_instance(conn, TENANT, IID, pause_requested=1)
    if final == "complete":
        engine.complete(conn, TENANT, IID, b'{"done":1}', T0)
    else:
        engine.fail(conn, TENANT, IID, ERR, T0)
    row = inst(conn)
    assert (row["status"], row["wake_at"], row["lease"], row["pause_requested"]) == (
        final,
        None,
        None,
        0,
    )


def test_complete_and_fail_store_output_and_error(conn: sqlite3.Connection) -> None:
    engine.complete(conn, TENANT, IID, b'{"sum":6}', T0)
    row = inst(conn)
    assert (row["status"], bytes(row["output"]), row["error"]) == ("complete", b'{"sum":6}', None)
    lease(conn)
    engine.fail(conn, TENANT, IID, ERR, T0)
    assert j.decode_error(inst(conn)["error"]) == ERR


def test_release_of_a_deleted_instance_is_a_no_op(conn: sqlite3.Connection) -> None:
    j.delete_instance(conn, TENANT, IID)
    engine.release(conn, TENANT, IID, T0, status="running", wake_at=T0)
    assert j.get_instance(conn, TENANT, IID) is None
    assert engine.activation_failed(conn, TENANT, IID, Limits(), ERR, T0) == "gone"


# ---------------------------------------------------------------- activation failures


def test_activation_failed_backs_off_then_errors(conn: sqlite3.Connection) -> None:
    limits = Limits(max_activation_failures=4)
    crash = ErrorInfo(
        type="ActivationCrashed", message="killed by SIGKILL", traceback="tail", code="X"
    )
    now = T0
    for failures, backoff in [(1, 0.5), (2, 1.0), (3, 2.0)]:
        lease(conn)
        assert engine.activation_failed(conn, TENANT, IID, limits, crash, now) == "backoff"
        row = inst(conn)
        assert (row["status"], row["failures"], row["wake_at"], row["lease"]) == (
            "queued",
            failures,
            now + backoff,
            None,
        )
        now += 100
    lease(conn)
    assert engine.activation_failed(conn, TENANT, IID, limits, crash, now) == "errored"
    row = inst(conn)
    assert (row["status"], row["failures"], row["wake_at"], row["lease"]) == (
        "errored",
        4,
        None,
        None,
    )
    err = j.decode_error(row["error"])
    assert err is not None
    assert err.type == "ActivationFailed"
    assert "4 activations in a row failed" in err.message and "killed by SIGKILL" in err.message
    assert (err.code, err.traceback) == ("X", "tail")


def test_activation_backoff_is_capped_and_keeps_running_status(conn: sqlite3.Connection) -> None:
    limits = Limits(max_activation_failures=100)
    j.update_instance(conn, TENANT, IID, status="running", failures=20)
    assert engine.activation_failed(conn, TENANT, IID, limits, ERR, T0) == "backoff"
    row = inst(conn)
    assert (row["status"], row["wake_at"], row["failures"]) == ("running", T0 + 60.0, 21)


def test_a_committed_result_resets_activation_failures(conn: sqlite3.Connection) -> None:
    j.update_instance(conn, TENANT, IID, failures=3)
    start(conn)
    finish_ok(conn, 0)
    assert inst(conn)["failures"] == 0


# ---------------------------------------------------------------- recovery


def test_interrupted_step_is_rerun_without_counting_the_attempt(conn: sqlite3.Connection) -> None:
    start(conn, attempt=2)
    engine.interrupted(conn, TENANT, IID, T0 + 5)
    e, row = entry(conn, 0), inst(conn)
    assert (e["status"], e["attempts"]) == ("retry", 1)
    assert (row["lease"], row["wake_at"]) == (None, T0 + 5)
    assert engine.prepare_replay(conn, TENANT, IID, T0 + 5) == 0


def test_interrupted_keeps_a_paused_instance_paused(conn: sqlite3.Connection) -> None:
    j.update_instance(conn, TENANT, IID, status="paused", wake_at=None)
    engine.interrupted(conn, TENANT, IID, T0)
    row = inst(conn)
    assert (row["status"], row["lease"], row["wake_at"]) == ("paused", None, None)


def test_iso() -> None:
    assert engine.iso(None) is None
    assert engine.iso(T0 + 0.25) == "2023-11-14T22:13:20.250+00:00"
