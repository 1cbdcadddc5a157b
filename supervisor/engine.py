"""The durable state machine: how each activation message, crash, timeout or operator request
changes the journal and the instance.

This module is the only writer of an instance's status (`protocol.messages.Status`): the API, the
loop and the journal's SQL ask it for a transition and never set a status themselves. Every
function runs inside the loop's open transaction and is idempotent where a replayed activation
may repeat a command (a re-sent sleep or wait keeps its original deadline).
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Callable
from typing import Any

from protocol.codec import load_json
from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import MAX_TIMEOUT_S
from protocol.messages import (
    TERMINAL_STATUSES,
    Activate,
    CompleteCmd,
    ErrorInfo,
    FailCmd,
    InvokeCmd,
    JournalEntry,
    SleepCmd,
    Status,
    StepResult,
    StepStarted,
    WaitEventCmd,
)
from supervisor import journal as j
from supervisor.config import Limits
from supervisor.journal.db import Db, Row

PENDING_STEP = frozenset({"retry", "running"})


def iso(ts: float | None) -> str | None:
    """An epoch time as ISO 8601; None when there is none, or it is no date (a journal written
    before numbers from activations were bounded may hold one): status must always answer."""
    if ts is None:
        return None
    try:
        return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):
        return None


def retry_delay_s(delay_s: float, backoff: str, attempt: int) -> float:
    """Delay before the retry that follows failed attempt number `attempt` (1-based), at most
    MAX_TIMEOUT_S: a backoff grows without bound, a wake time must stay a printable date."""
    if backoff == "constant":
        delay = delay_s
    elif backoff == "linear":
        delay = delay_s * attempt
    else:
        delay = delay_s * float(2 ** min(attempt - 1, 40))
    return min(delay, MAX_TIMEOUT_S)


def release(
    conn: Db,
    tenant: str,
    instance: str,
    now: float,
    *,
    status: Status,
    wake_at: float | None,
    **fields: Any,
) -> None:
    """End the instance's lease and set its next state, honouring a pause requested meanwhile."""
    row = j.get_instance(conn, tenant, instance)
    if row is None:
        return
    if row["pause_requested"] and status not in TERMINAL_STATUSES:
        status, wake_at = Status.PAUSED, None
    if wake_at is not None and wake_at <= now:
        # Due now: sort it by its creation time, so within a tenant the oldest instance goes
        # first and started workflows finish before new ones start (depth first, not lockstep).
        wake_at = min(wake_at, float(row["created_at"]))
    if status != row["status"]:
        fields["status"] = status
    j.update_instance(
        conn,
        tenant,
        instance,
        wake_at=wake_at,
        lease=None,
        pause_requested=0,
        steps=j.journal_length(conn, tenant, instance),
        updated_at=now,
        **fields,
    )
    if status in TERMINAL_STATUSES:
        _tell_parent(conn, row, status, fields.get("output"), fields.get("error"), now)


def _tell_parent(
    conn: Db, child: Row, status: str, output: bytes | None, error: str | None, now: float
) -> None:
    """A child instance ended: journal its outcome at the parent's `invoke` and wake the
    parent, in the same transaction (so a crash between the two cannot lose it)."""
    tenant, parent, seq = child["tenant"], child["parent"], child["parent_seq"]
    if parent is None:
        return
    entry = j.get_entry(conn, tenant, parent, int(seq))
    if entry is None or entry["status"] != "waiting" or entry["child"] != child["id"]:
        return  # the parent was restarted or deleted meanwhile: nobody waits for this child
    if status == Status.COMPLETE:
        j.upsert_entry(conn, tenant, parent, int(seq), status="ok", result=output, finished_at=now)
    else:
        err = j.decode_error(error) if status == Status.ERRORED else None
        failure = ErrorInfo(
            type=err.type if err else "ChildTerminated",
            message=f"child instance {child['id']!r} ({child['workflow']}) ended {status}"
            + (f": {err.message}" if err else ""),
            traceback=err.traceback if err else "",
            code=err.code if err else None,
        )
        j.upsert_entry(
            conn,
            tenant,
            parent,
            int(seq),
            status="error",
            error=j.encode_error(failure),
            finished_at=now,
        )
    row = j.get_instance(conn, tenant, parent)
    if row is not None and row["status"] == Status.WAITING and row["lease"] is None:
        j.update_instance(conn, tenant, parent, status=Status.RUNNING, wake_at=now, updated_at=now)


def prepare_replay(conn: Db, tenant: str, instance: str, now: float) -> int:
    """Settle elapsed sleeps and expired waits; return the seq the next command must carry."""
    last = j.last_entry(conn, tenant, instance)
    if last is None:
        return 0
    seq = int(last["seq"])
    if last["kind"] == "sleep" and last["status"] == "sleeping":
        if last["until"] <= now:
            j.upsert_entry(conn, tenant, instance, seq, status="ok", finished_at=now)
            return seq + 1
        return seq
    if last["kind"] == "wait_event" and last["status"] == "waiting":
        if last["until"] > now:
            return seq
        # Past the deadline: an event that arrived in time (say, while paused) still wins.
        event = j.consume_event(
            conn, tenant, instance, last["event_type"], seq, before=float(last["until"])
        )
        if event is not None:
            j.upsert_entry(
                conn,
                tenant,
                instance,
                seq,
                status="ok",
                finished_at=now,
                result=event_result(event),
            )
        else:
            err = ErrorInfo(type="WaitTimeout", message=f"no {last['event_type']!r} event arrived")
            j.upsert_entry(
                conn,
                tenant,
                instance,
                seq,
                status="timeout",
                finished_at=now,
                error=j.encode_error(err),
            )
        return seq + 1
    if last["kind"] == "step" and last["status"] in PENDING_STEP:
        return seq
    if last["kind"] == "invoke" and last["status"] == "waiting":
        return seq  # resumed while its child runs: the replay asks again, and waits on
    return seq + 1


def build_activate(
    inst: Row, code: Row, journal: list[JournalEntry], limits: Limits, now: float
) -> Activate:
    return Activate(
        mode="run",
        tenant=inst["tenant"],
        filename=code["filename"],
        code_kind=code["kind"],
        code=code["code"],
        instance=inst["id"],
        workflow=inst["workflow"],
        params=inst["params"],
        created_at=inst["created_at"],
        journal=journal,
        now=now,
        max_timeout_s=limits.timeout_s,
    )


def over_step_limit(seq: int, limits: Limits) -> ErrorInfo | None:
    """The error that ends an instance asking for one command more than `max_steps`."""
    if seq < limits.max_steps:
        return None
    return ErrorInfo(
        type="StepLimitExceeded",
        code="LIMIT_EXCEEDED",
        message=f"the workflow asked for command {seq + 1}; the tenant's max_steps is "
        f"{limits.max_steps} (every activation replays them all)",
    )


def carried_bytes(e: JournalEntry) -> int:
    """What one journal entry's result and error add to every later activation of its
    instance: what `max_state_mib` limits."""
    size = len(e.result or b"")
    if e.error is not None:
        size += len(e.error.type) + len(e.error.message) + len(e.error.traceback)
    return size


def over_state_limit(state_bytes: int, adding: int, limits: Limits) -> ErrorInfo | None:
    """The error a step result gets instead of being journaled when the instance's journal
    (weighing `state_bytes`, see `carried_bytes`) would exceed `max_state_mib`: every
    activation of the instance carries it all."""
    cap = limits.max_state_mib * 1024 * 1024
    total = state_bytes + adding
    if total <= cap:
        return None
    return ErrorInfo(
        type="StateLimitExceeded",
        code="LIMIT_EXCEEDED",
        message=f"journaling this result ({adding} bytes) would bring the instance's state to "
        f"{total} bytes; the tenant's max_state_mib is {limits.max_state_mib}",
    )


def divergence(
    conn: Db,
    tenant: str,
    instance: str,
    msg: StepStarted | SleepCmd | WaitEventCmd | InvokeCmd,
) -> str | None:
    """Why a command at an already journaled seq is not the one journaled there, or None."""
    entry = j.get_entry(conn, tenant, instance, msg.seq)
    if entry is None:
        return None
    kinds = {StepStarted: "step", SleepCmd: "sleep", WaitEventCmd: "wait_event"}
    kind = kinds.get(type(msg), "invoke")
    if entry["kind"] != kind or entry["name"] != msg.name:
        return (
            f"the workflow asked for {kind} {msg.name!r} at seq {msg.seq}, but the journal "
            f"holds {entry['kind']} {entry['name']!r}: the workflow's code outside steps is "
            "not deterministic"
        )
    if isinstance(msg, WaitEventCmd) and entry["event_type"] != msg.type:
        return (
            f"the workflow waits for event type {msg.type!r} at seq {msg.seq}, but the journal "
            f"holds a wait for {entry['event_type']!r}"
        )
    return None


def command(
    conn: Db,
    tenant: str,
    instance: str,
    msg: StepStarted | SleepCmd | WaitEventCmd | InvokeCmd,
    limits: Limits,
    now: float,
) -> ErrorInfo | None:
    """An activation's new command: a step starting, a sleep, a wait or a child instance.
    Checked against the tenant's `max_steps` and against the journal (a command at a journaled
    seq must be the one journaled there), then journaled. On a violation nothing is journaled,
    the instance ends `errored`, and the error is returned (its code says which:
    LIMIT_EXCEEDED or NONDETERMINISM)."""
    error = over_step_limit(msg.seq, limits)
    if error is None and (why := divergence(conn, tenant, instance, msg)) is not None:
        error = ErrorInfo(type="NondeterminismError", code=ErrorCode.NONDETERMINISM, message=why)
    if error is not None:
        fail(conn, tenant, instance, error, now)
        return error
    if isinstance(msg, StepStarted):
        step_started(conn, tenant, instance, msg, now)
    elif isinstance(msg, SleepCmd):
        sleep(conn, tenant, instance, msg, now)
    elif isinstance(msg, WaitEventCmd):
        wait_event(conn, tenant, instance, msg, now)
    else:
        invoke(conn, tenant, instance, msg, limits, now)
    return None


def step_finished(
    conn: Db,
    tenant: str,
    instance: str,
    msg: StepResult,
    limits: Limits,
    now: float,
    *,
    state_bytes: int,
) -> StepResult:
    """A step's result, journaled; returns it as journaled. A value that is not JSON, or that
    would bring the instance past `max_state_mib` (its journal weighs `state_bytes` already),
    is journaled as a failed step instead, not retried (the workflow may catch it)."""
    if msg.ok:
        value = msg.value or b""
        try:
            load_json(value, what="step result")
            error = over_state_limit(state_bytes, len(value), limits)
        except ProtocolError as exc:
            error = ErrorInfo(type="StepResultError", message=exc.message)
        if error is not None:
            msg = StepResult(
                seq=msg.seq, ok=False, retryable=False, duration_ms=msg.duration_ms, error=error
            )
    step_result(conn, tenant, instance, msg, now)
    return msg


def workflow_finished(
    conn: Db, tenant: str, instance: str, msg: CompleteCmd | FailCmd, now: float
) -> None:
    """The workflow returned (its output must be JSON) or raised."""
    if isinstance(msg, FailCmd):
        fail(conn, tenant, instance, msg.error, now)
        return
    try:
        load_json(msg.output, what="workflow output")
    except ProtocolError as exc:
        fail(conn, tenant, instance, ErrorInfo(type="OutputError", message=exc.message), now)
    else:
        complete(conn, tenant, instance, msg.output, now)


def step_started(conn: Db, tenant: str, instance: str, msg: StepStarted, now: float) -> None:
    j.upsert_entry(
        conn,
        tenant,
        instance,
        msg.seq,
        kind="step",
        name=msg.name,
        status="running",
        attempts=msg.attempt,
        retry_limit=msg.retry_limit,
        retry_delay_s=msg.retry_delay_s,
        backoff=msg.backoff,
        timeout_s=msg.timeout_s,
        started_at=now,
    )
    j.ensure_status(conn, tenant, instance, Status.RUNNING, now)


def step_result(conn: Db, tenant: str, instance: str, msg: StepResult, now: float) -> None:
    if msg.ok:
        j.upsert_entry(
            conn,
            tenant,
            instance,
            msg.seq,
            status="ok",
            result=msg.value,
            error=None,
            finished_at=now,
            duration_ms=msg.duration_ms,
        )
        release(conn, tenant, instance, now, status=Status.RUNNING, wake_at=now, failures=0)
        return
    err = msg.error or ErrorInfo(type="Error", message="step failed")
    step_failed(
        conn,
        tenant,
        instance,
        msg.seq,
        err,
        now,
        retryable=msg.retryable,
        duration_ms=msg.duration_ms,
    )


def step_failed(
    conn: Db,
    tenant: str,
    instance: str,
    seq: int,
    err: ErrorInfo,
    now: float,
    *,
    retryable: bool,
    duration_ms: float | None = None,
) -> str:
    """A failed attempt: schedule the retry its policy allows, or journal the final error."""
    row = j.get_entry(conn, tenant, instance, seq)
    if row is None:  # cannot happen after StepStarted; be safe rather than crash the loop
        release(conn, tenant, instance, now, status=Status.RUNNING, wake_at=now)
        return "error"
    attempt = int(row["attempts"])
    j.add_attempt_error(conn, tenant, instance, seq, attempt, err, now)
    if retryable and attempt <= int(row["retry_limit"] or 0):
        wake = now + retry_delay_s(float(row["retry_delay_s"] or 0), row["backoff"], attempt)
        j.upsert_entry(
            conn,
            tenant,
            instance,
            seq,
            status="retry",
            error=j.encode_error(err),
            duration_ms=duration_ms,
        )
        release(conn, tenant, instance, now, status=Status.RUNNING, wake_at=wake, failures=0)
        return "retry"
    j.upsert_entry(
        conn,
        tenant,
        instance,
        seq,
        status="error",
        error=j.encode_error(err),
        finished_at=now,
        duration_ms=duration_ms,
    )
    release(conn, tenant, instance, now, status=Status.RUNNING, wake_at=now, failures=0)
    return "error"


def sleep(conn: Db, tenant: str, instance: str, msg: SleepCmd, now: float) -> None:
    existing = j.get_entry(conn, tenant, instance, msg.seq)
    until = float(existing["until"]) if existing is not None else msg.until
    j.upsert_entry(
        conn,
        tenant,
        instance,
        msg.seq,
        kind="sleep",
        name=msg.name,
        status="sleeping",
        until=until,
        started_at=now if existing is None else existing["started_at"],
    )
    release(conn, tenant, instance, now, status=Status.WAITING, wake_at=max(until, now), failures=0)


def event_result(row: Row) -> bytes:
    head = json.dumps({"type": row["type"], "timestamp": iso(row["created_at"])})
    return f'{head[:-1]}, "payload": '.encode() + bytes(row["payload"]) + b"}"


def wait_event(conn: Db, tenant: str, instance: str, msg: WaitEventCmd, now: float) -> None:
    existing = j.get_entry(conn, tenant, instance, msg.seq)
    deadline = float(existing["until"]) if existing is not None else now + msg.timeout_s
    started = existing["started_at"] if existing is not None else now
    entry = {
        "kind": "wait_event",
        "name": msg.name,
        "event_type": msg.type,
        "until": deadline,
        "started_at": started,
    }
    event = j.consume_event(conn, tenant, instance, msg.type, msg.seq)
    if event is not None:
        j.upsert_entry(
            conn,
            tenant,
            instance,
            msg.seq,
            status="ok",
            finished_at=now,
            result=event_result(event),
            **entry,
        )
        release(conn, tenant, instance, now, status=Status.RUNNING, wake_at=now, failures=0)
        return
    j.upsert_entry(conn, tenant, instance, msg.seq, status="waiting", **entry)
    release(conn, tenant, instance, now, status=Status.WAITING, wake_at=deadline, failures=0)


def invoke(
    conn: Db, tenant: str, instance: str, msg: InvokeCmd, limits: Limits, now: float
) -> None:
    """Start a child instance and park the parent until it ends (`_tell_parent` wakes it). A
    child that cannot start (workflow not deployed, id taken, too many instances, params not
    JSON) is a failed command: the parent's replay raises `StepFailed` there."""
    existing = j.get_entry(conn, tenant, instance, msg.seq)
    if existing is not None:
        # Re-sent by a replay (after a resume): wait on, or go on if the child ended meanwhile.
        waiting = existing["status"] == "waiting"
        status = Status.WAITING if waiting else Status.RUNNING
        release(conn, tenant, instance, now, status=status, wake_at=None if waiting else now)
        return
    entry: dict[str, Any] = {"kind": "invoke", "name": msg.name, "started_at": now}
    child = msg.id or f"{instance[:80]}-{msg.seq}"
    error = _child_refusal(conn, tenant, msg, limits)
    if error is None:
        version = j.get_deployment(conn, tenant, msg.workflow)
        assert version is not None
        parent = (instance, msg.seq)
        created = j.insert_instance(
            conn, tenant, child, msg.workflow, version, msg.params, now, Status.QUEUED, parent
        )
        if not created and msg.id is None:  # the default id is taken: make another one
            child = f"{child}-{secrets.token_hex(4)}"
            created = j.insert_instance(
                conn, tenant, child, msg.workflow, version, msg.params, now, Status.QUEUED, parent
            )
        if not created:
            error = ErrorInfo(
                type="ChildNotStarted",
                code=ErrorCode.ALREADY_EXISTS,
                message=f"an instance {child!r} exists already",
            )
    if error is not None:
        j.upsert_entry(
            conn,
            tenant,
            instance,
            msg.seq,
            status="error",
            error=j.encode_error(error),
            finished_at=now,
            **entry,
        )
        release(conn, tenant, instance, now, status=Status.RUNNING, wake_at=now, failures=0)
        return
    j.upsert_entry(conn, tenant, instance, msg.seq, status="waiting", child=child, **entry)
    release(conn, tenant, instance, now, status=Status.WAITING, wake_at=None, failures=0)


def _child_refusal(conn: Db, tenant: str, msg: InvokeCmd, limits: Limits) -> ErrorInfo | None:
    def refused(code: ErrorCode, message: str) -> ErrorInfo:
        return ErrorInfo(type="ChildNotStarted", code=code, message=message)

    try:
        load_json(msg.params, what="the child's params")
    except ProtocolError as exc:
        return refused(exc.code, exc.message)
    if j.get_deployment(conn, tenant, msg.workflow) is None:
        return refused(ErrorCode.UNKNOWN_WORKFLOW, f"no workflow {msg.workflow!r} is deployed")
    j.lock_tenant(conn, tenant)  # the instance cap is cluster-wide, as for a create
    if j.count_live_instances(conn, tenant) >= limits.max_instances:
        return refused(
            ErrorCode.LIMIT_EXCEEDED,
            f"tenant {tenant!r} may have at most {limits.max_instances} live instances",
        )
    return None


def deliver_event(conn: Db, inst: Row, type_: str, now: float) -> bool:
    """After storing an event: if the instance is parked waiting for this type, wake it now."""
    if inst["status"] != Status.WAITING or inst["lease"] is not None:
        return False
    last = j.last_entry(conn, inst["tenant"], inst["id"])
    if last is None:
        return False
    if last["kind"] != "wait_event" or last["status"] != "waiting" or last["event_type"] != type_:
        return False
    event = j.consume_event(conn, inst["tenant"], inst["id"], type_, int(last["seq"]))
    if event is None:
        return False
    j.upsert_entry(
        conn,
        inst["tenant"],
        inst["id"],
        int(last["seq"]),
        status="ok",
        finished_at=now,
        result=event_result(event),
    )
    j.update_instance(
        conn, inst["tenant"], inst["id"], status=Status.RUNNING, wake_at=now, updated_at=now
    )
    return True


def complete(conn: Db, tenant: str, instance: str, output: bytes, now: float) -> None:
    release(
        conn,
        tenant,
        instance,
        now,
        status=Status.COMPLETE,
        wake_at=None,
        output=output,
        error=None,
        failures=0,
    )


def fail(conn: Db, tenant: str, instance: str, err: ErrorInfo, now: float) -> None:
    error = j.encode_error(err)
    release(conn, tenant, instance, now, status=Status.ERRORED, wake_at=None, error=error)


def activation_failed(
    conn: Db, tenant: str, instance: str, limits: Limits, err: ErrorInfo, now: float
) -> str:
    """An activation died before its step started: back off, and give up after a bound."""
    row = j.get_instance(conn, tenant, instance)
    if row is None:
        return "gone"
    failures = int(row["failures"]) + 1
    if failures >= limits.max_activation_failures:
        final = ErrorInfo(
            type="ActivationFailed",
            code=err.code,
            traceback=err.traceback,
            message=f"{failures} activations in a row failed; last: {err.message}",
        )
        release(
            conn,
            tenant,
            instance,
            now,
            status=Status.ERRORED,
            wake_at=None,
            failures=failures,
            error=j.encode_error(final),
        )
        return "errored"
    status = Status.QUEUED if row["status"] == Status.QUEUED else Status.RUNNING
    release(
        conn,
        tenant,
        instance,
        now,
        status=status,
        wake_at=now + min(60.0, 0.5 * 2 ** (failures - 1)),
        failures=failures,
    )
    return "backoff"


def interrupted(conn: Db, tenant: str, instance: str, now: float) -> None:
    """The supervisor stopped mid-activation: the running attempt does not count; re-run it."""
    last = j.last_entry(conn, tenant, instance)
    if last is not None and last["kind"] == "step" and last["status"] == "running":
        j.upsert_entry(
            conn,
            tenant,
            instance,
            int(last["seq"]),
            status="retry",
            attempts=max(0, int(last["attempts"]) - 1),
        )
    row = j.get_instance(conn, tenant, instance)
    if row is not None and row["status"] not in TERMINAL_STATUSES | {Status.PAUSED}:
        j.update_instance(conn, tenant, instance, lease=None, wake_at=now, updated_at=now)
    elif row is not None:
        j.update_instance(conn, tenant, instance, lease=None, updated_at=now)


# ------------------------------------------------------------------ lifecycle: create, launch,
# operator requests


def create(
    conn: Db,
    tenant: str,
    instance: str,
    workflow: str,
    version: str,
    params: bytes,
    now: float,
) -> bool:
    """A new instance, queued and due now; False when the id is taken (nothing changes)."""
    return j.insert_instance(conn, tenant, instance, workflow, version, params, now, Status.QUEUED)


def launched(conn: Db, tenant: str, instance: str, aid: int, now: float) -> None:
    """Activation `aid` holds the instance now (its lease) and drives it."""
    row = j.get_instance(conn, tenant, instance)
    assert row is not None
    fields: dict[str, Any] = {"lease": aid, "activations": row["activations"] + 1}
    if row["status"] != Status.RUNNING:
        fields["status"] = Status.RUNNING
    j.update_instance(conn, tenant, instance, updated_at=now, **fields)


def _refuse(inst: Row, op: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_STATE, f"cannot {op} a {inst['status']} instance")


def pause(conn: Db, inst: Row, now: float) -> None:
    """Pause now, or, while an activation holds it, once that activation is done (`release`)."""
    if inst["status"] in TERMINAL_STATUSES:
        raise _refuse(inst, "pause")
    tenant, iid = inst["tenant"], inst["id"]
    if inst["lease"] is not None:
        j.update_instance(conn, tenant, iid, pause_requested=1, updated_at=now)
    elif inst["status"] != Status.PAUSED:
        j.update_instance(conn, tenant, iid, status=Status.PAUSED, wake_at=None, updated_at=now)


def resume(conn: Db, inst: Row, now: float) -> None:
    """Take back a pending pause, or make a paused instance due again."""
    tenant, iid = inst["tenant"], inst["id"]
    if inst["lease"] is not None and inst["pause_requested"]:
        j.update_instance(conn, tenant, iid, pause_requested=0, updated_at=now)
    elif inst["status"] != Status.PAUSED:
        raise _refuse(inst, "resume")
    else:
        resumed = Status.RUNNING if inst["steps"] or inst["activations"] else Status.QUEUED
        j.update_instance(conn, tenant, iid, status=resumed, wake_at=now, updated_at=now)


def terminate(conn: Db, inst: Row, now: float, stop: Callable[[str], None]) -> None:
    """End it for good, and its children with it; `stop(id)` kills the activation that holds
    an instance, if one does."""
    if inst["status"] in TERMINAL_STATUSES:
        raise _refuse(inst, "terminate")
    _end(conn, inst, now, stop)
    _tell_parent(conn, inst, Status.TERMINATED, None, None, now)


def _end(conn: Db, inst: Row, now: float, stop: Callable[[str], None]) -> None:
    """Terminate the instance and, first, the live children it started (and theirs)."""
    _terminate_children(conn, inst, 0, now, stop)
    if inst["lease"] is not None:
        stop(inst["id"])
    j.update_instance(
        conn,
        inst["tenant"],
        inst["id"],
        status=Status.TERMINATED,
        wake_at=None,
        lease=None,
        pause_requested=0,
        updated_at=now,
    )


def delete(conn: Db, inst: Row, now: float, stop: Callable[[str], None]) -> None:
    """Delete it with its journal; a parent waiting for it hears it was terminated, and the
    children it started, whom nobody would wait for any more, are terminated."""
    _terminate_children(conn, inst, 0, now, stop)
    if inst["lease"] is not None:
        stop(inst["id"])
    if inst["status"] not in TERMINAL_STATUSES:
        _tell_parent(conn, inst, Status.TERMINATED, None, None, now)
    j.delete_instance(conn, inst["tenant"], inst["id"])


def _terminate_children(
    conn: Db, inst: Row, from_seq: int, now: float, stop: Callable[[str], None]
) -> None:
    """Terminate the live children the instance started at `from_seq` or later (and theirs):
    nobody will wait for them any more."""
    for child in j.live_children(conn, inst["tenant"], inst["id"], from_seq):
        _end(conn, child, now, stop)


def upgrade(
    conn: Db, tenant: str, instance: str, was: str, version: str, checked_steps: int, now: float
) -> str:
    """Pin an in-flight instance to `version`, whose check replayed its `checked_steps` journal
    entries. Only if it is as checked: still on `was`, no further entry, and no activation of
    the old code holding it (its command is not journaled yet, so it was not checked)."""
    row = j.get_instance(conn, tenant, instance)
    if row is None:
        return "deleted"
    if row["status"] in TERMINAL_STATUSES:
        return "ended"
    if row["version"] != was:
        return "changed"  # another upgrade got there first
    if row["lease"] is not None or j.journal_length(conn, tenant, instance) != checked_steps:
        return "busy"  # it moved on during the check: check again
    j.update_instance(conn, tenant, instance, version=version, updated_at=now)
    return "upgraded"


def restart(
    conn: Db, inst: Row, now: float, stop: Callable[[str], None], from_step: str | None = None
) -> None:
    """From the start, or from the first command called `from_step`: the journal from there on,
    the events its waits consumed and the children it started (terminated) are dropped; what
    came before, the params and the pinned code are kept. Any status may restart."""
    tenant, iid = inst["tenant"], inst["id"]
    seq = 0
    if from_step is not None:
        found = j.first_entry_named(conn, tenant, iid, from_step)
        if found is None:
            raise ProtocolError(
                ErrorCode.NOT_FOUND, f"instance {iid!r} has journaled no step named {from_step!r}"
            )
        seq = found
    _terminate_children(conn, inst, seq, now, stop)
    if inst["lease"] is not None:
        stop(iid)
    j.reset_instance(conn, tenant, iid, now, Status.RUNNING if seq else Status.QUEUED, seq)
