"""Test workflows with plain pytest: in-process, no daemon, simulated time.

The harness runs the code an activation runs to replay a workflow (`sandbox_host.runtime`) and the
state machine the supervisor runs to journal what it says (`supervisor.engine`, on an in-memory
SQLite journal), so a workflow journals here what it journals on a server, entry for entry. Only
the process around each activation is missing: there is no isolation, and step callables run in
the test's own process.

Time is simulated. Sleeps, retry backoff and event timeouts pass at once; the clock starts at
`START` (or the `start` you give) and moves only when nothing is due::

    from stepvisor.testing import WorkflowEnv

    def test_onboarding():
        env = WorkflowEnv.from_file("workflows/onboarding.py")
        run = env.start("onboard", {"email": "a@example.com"})
        run.fail_step("create account", attempts=[1, 2], error=ConnectionError("down"))
        assert run.run_until_waiting() == "confirm"
        run.send_event("email-confirmed", {"ok": True})
        assert run.result() == {"user": ..., "confirmed": {"ok": True}}
        assert run.entry("create account").attempts == 3
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from protocol.codec import decode_from_activation, dump_json, encode, load_json
from protocol.errors import ProtocolError
from protocol.limits import MAX_RESULT_BYTES
from protocol.messages import (
    TERMINAL_STATUSES,
    Activate,
    CompleteCmd,
    ErrorInfo,
    FailCmd,
    Inspected,
    InvokeCmd,
    SleepCmd,
    Status,
    StepResult,
    StepStarted,
    WaitEventCmd,
)
from sandbox_host.runtime import Runtime, StepContext, _Stop, call_step, in_this_process
from stepvisor.sdk import WORKFLOW_ATTR
from supervisor import engine, outcome
from supervisor import journal as j
from supervisor.config import Limits
from supervisor.journal import sqlite_schema

__all__ = ["START", "Crash", "Entry", "Run", "WorkflowEnv", "WorkflowFailed"]

START = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)  # where the simulated clock starts by default
_CRASHES = {
    "oom": outcome.OOM,
    "cpu_limit": outcome.CPU_LIMIT,
    "wall_timeout": outcome.WALL_TIMEOUT,
    "crashed": outcome.CRASHED,
}
_CRASH_DETAILS = {
    "oom": "killed by the kernel: the tenant's cgroup ran out of memory (injected)",
    "cpu_limit": "SIGXCPU (injected)",
    "wall_timeout": "the step ran past its timeout (injected)",
    "crashed": "exited with code 1 (injected)",
}


class Crash(Exception):
    """Inject this to have the activation die during the step, as it would on a server when the
    step runs out of memory (`"oom"`), CPU time, its timeout, or the process exits. The attempt
    fails with the error the supervisor records for that (`OutOfMemory`, `CpuLimitExceeded`,
    `StepTimeout`, `ActivationCrashed`) and is retried per the step's policy."""

    def __init__(self, how: Literal["oom", "cpu_limit", "wall_timeout", "crashed"] = "crashed"):
        if how not in _CRASHES:
            raise ValueError(f"how must be one of {sorted(_CRASHES)}")
        super().__init__(how)
        self.how = how


class _Crashed(_Stop):
    """Unwinds the runtime the way the process's death would: nothing more is sent."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class WorkflowFailed(AssertionError):
    """`Run.result()` of an instance that ended `errored` (or `terminated`)."""

    def __init__(self, instance: str, status: str, error: ErrorInfo | None) -> None:
        what = f"{error.type}: {error.message}" if error else status
        super().__init__(f"instance {instance!r} ended {status}: {what}")
        self.status = status
        self.error = error


@dataclass(frozen=True)
class Entry:
    """One journaled command, as `stepvisor history` shows it."""

    seq: int
    kind: str  # step | sleep | wait_event | invoke
    name: str
    # step: ok|error|retry|running; sleep: sleeping|ok; wait_event: ok|waiting|timeout;
    # invoke: waiting|ok|error
    status: str
    attempts: int
    result: Any  # the step's value; a wait's {"type", "payload", "timestamp"}; else None
    error: ErrorInfo | None
    until: dt.datetime | None  # a sleep's end, a wait's deadline
    event_type: str | None
    failed_attempts: tuple[ErrorInfo, ...]  # every failed attempt's error, oldest first
    child: str | None  # an invoke's child instance (`env.instance(entry.child)`)


def _injected(
    step: str, attempts: Iterable[int], error: BaseException | type[BaseException]
) -> dict[tuple[str, int], BaseException]:
    exc = error(f"injected failure of {step!r}") if isinstance(error, type) else error
    return {(step, attempt): exc for attempt in attempts}


def _epoch(when: dt.datetime | float) -> float:
    if isinstance(when, dt.datetime):
        return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()
    return float(when)


def _date(ts: float | None) -> dt.datetime | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC)


class WorkflowEnv:
    """One tenant's deployed code on a private in-memory journal, with a simulated clock.

    Build it with `from_file`, `from_source` or `from_function`; `limits` are the tenant's
    (`max_steps`, `max_state_mib` and `timeout_s` apply as on a server)."""

    def __init__(
        self,
        kind: Literal["source", "pickle"],
        filename: str,
        code: bytes,
        *,
        tenant: str = "tests",
        start: dt.datetime | float = START,
        limits: Limits | None = None,
    ) -> None:
        self.tenant = tenant
        self.limits = limits or Limits()
        self.clock = _epoch(start)
        self.db = sqlite_schema.memory()
        self._ids = itertools.count(1)
        self._runs: dict[str, Run] = {}
        self.failures: dict[tuple[str, int], BaseException] = {}
        self._kind, self._filename, self._code = kind, filename, code
        self.version = hashlib.sha256(kind.encode() + b"\0" + code).hexdigest()[:16]
        self.workflows = self._deploy()

    @classmethod
    def from_file(cls, path: str | Path, **options: Any) -> WorkflowEnv:
        """The workflows of a Python file, as `stepvisor deploy TENANT FILE` deploys them."""
        path = Path(path)
        return cls("source", path.name, path.read_bytes(), **options)

    @classmethod
    def from_source(
        cls, source: str, filename: str = "workflows.py", **options: Any
    ) -> WorkflowEnv:
        return cls("source", filename, source.encode(), **options)

    @classmethod
    def from_function(cls, fn: Callable[..., Any], **options: Any) -> WorkflowEnv:
        """One `@workflow` function, as `Client.deploy(tenant, fn)` deploys it (by value)."""
        import cloudpickle

        name = getattr(fn, WORKFLOW_ATTR, None)
        if not isinstance(name, str):
            raise TypeError("from_function needs a function decorated with @workflow")
        return cls("pickle", f"{name}.pkl", cloudpickle.dumps(fn), **options)

    def fail_step(
        self,
        step: str,
        *,
        attempts: Iterable[int] = (1,),
        error: BaseException | type[BaseException] = RuntimeError,
    ) -> None:
        """`Run.fail_step` for every instance of the environment (children included)."""
        self.failures.update(_injected(step, attempts, error))

    @property
    def now(self) -> dt.datetime:
        """The simulated clock."""
        return dt.datetime.fromtimestamp(self.clock, dt.UTC)

    def advance(self, seconds: float) -> None:
        """Move the simulated clock forward; whatever falls due runs on the next drive."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self.clock += seconds

    def start(self, workflow: str, params: Any = None, *, id: str | None = None) -> Run:
        """Create an instance, as `Client.create` does; nothing runs until you drive it."""
        if workflow not in self.workflows:
            raise LookupError(f"no workflow {workflow!r} in the code; it defines {self.workflows}")
        instance = id or f"test-{next(self._ids)}"
        with self.db.transaction():
            if not engine.create(
                self.db,
                self.tenant,
                instance,
                workflow,
                self.version,
                dump_json(params, what="params"),
                self.clock,
            ):
                raise ValueError(f"instance {instance!r} exists")
        return self.instance(instance)

    def instance(self, id: str) -> Run:
        """The instance `id` of this environment (a child a workflow started, say)."""
        if id not in self._runs:
            if j.get_instance(self.db, self.tenant, id) is None:
                raise LookupError(f"no instance {id!r}")
            self._runs[id] = Run(self, id)
        return self._runs[id]

    def run(self, workflow: str, params: Any = None) -> Any:
        """Start an instance and drive it to its end: its output, or `WorkflowFailed`."""
        return self.start(workflow, params).result()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> WorkflowEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _deploy(self) -> list[str]:
        act = Activate(
            mode="inspect",
            tenant=self.tenant,
            filename=self._filename,
            code_kind=self._kind,
            code=self._code,
            now=self.clock,
        )
        handlers = _log_handlers()
        try:
            last = in_this_process(act)
        finally:
            _restore_log_handlers(handlers)
        if isinstance(last, FailCmd):
            raise ImportError(f"{self._filename}: {last.error.message}\n{last.error.traceback}")
        assert isinstance(last, Inspected)
        with self.db.transaction():
            j.ensure_tenant(self.db, self.tenant, self.clock)
            j.put_code(
                self.db,
                self.tenant,
                self.version,
                self._kind,
                self._filename,
                self._code,
                last.workflows,
                self.clock,
            )
            for name in last.workflows:
                j.set_deployment(self.db, self.tenant, name, self.version, self.clock)
        return list(last.workflows)


class Run:
    """One instance in a `WorkflowEnv`: drive it, feed it events and failures, look at it."""

    def __init__(self, env: WorkflowEnv, instance: str) -> None:
        self.env = env
        self.id = instance
        self._failures: dict[tuple[str, int], BaseException] = {}
        self._stand_ins: dict[str, Callable[..., Any]] = {}
        self._scheduled: list[tuple[float, str, bytes]] = []
        self._step: int | None = None  # the seq of the step the current activation runs
        self._state_bytes = 0  # what the journal weighed when the current activation began
        self.activations = 0

    # -- what the test injects

    def fail_step(
        self,
        step: str,
        *,
        attempts: Iterable[int] = (1,),
        error: BaseException | type[BaseException] = RuntimeError,
    ) -> None:
        """Make the given attempts (from 1) of `step` raise `error` instead of running; a
        `Crash` makes the activation die instead, as a server would record it."""
        self._failures.update(_injected(step, attempts, error))

    def replace_step(self, step: str, fn: Callable[..., Any]) -> None:
        """Run `fn` (taking no argument, or the step's context) in place of `step`'s callable."""
        self._stand_ins[step] = fn

    def send_event(self, type: str, payload: Any = None, *, after: float | None = None) -> None:
        """Send an event now, or `after` simulated seconds (delivered when the clock gets there)."""
        data = dump_json(payload, what="event payload")
        if after is None:
            self._deliver(type, data)
        else:
            self._scheduled.append((self.env.clock + after, type, data))
            self._scheduled.sort(key=lambda e: e[0])

    # -- driving

    def result(self, *, max_activations: int = 10_000) -> Any:
        """Drive the instance to its end, skipping time; its output, or `WorkflowFailed`. A wait
        for an event that was not sent (or scheduled) times out."""
        self._drive(stop_at_wait=False, max_activations=max_activations)
        if self.status != Status.COMPLETE:
            raise WorkflowFailed(self.id, self.status, self.error)
        return self.output

    def run_until_waiting(self, *, max_activations: int = 10_000) -> str | None:
        """Drive the instance until it waits for an event that has not arrived (returns the
        wait's step name), or until it ends (returns None)."""
        self._drive(stop_at_wait=True, max_activations=max_activations)
        last = j.last_entry(self.env.db, self.env.tenant, self.id)
        if last is not None and last["kind"] == "wait_event" and last["status"] == "waiting":
            return str(last["name"])
        return None

    def step_once(self) -> None:
        """Run exactly one activation now (the instance must be due)."""
        self._activate()

    # -- what the test looks at

    @property
    def status(self) -> str:
        return str(self._row()["status"])

    @property
    def output(self) -> Any:
        data = self._row()["output"]
        return None if data is None else load_json(data, what="output")

    @property
    def error(self) -> ErrorInfo | None:
        return j.decode_error(self._row()["error"])

    @property
    def journal(self) -> list[Entry]:
        db, tenant = self.env.db, self.env.tenant
        failed: dict[int, list[ErrorInfo]] = {}
        for a in j.attempt_errors(db, tenant, self.id):
            err = j.decode_error(a["error"])
            if err is not None:
                failed.setdefault(int(a["seq"]), []).append(err)
        return [
            Entry(
                seq=r["seq"],
                kind=r["kind"],
                name=r["name"],
                status=r["status"],
                attempts=r["attempts"],
                result=None
                if r["result"] is None
                else load_json(r["result"], what="result", limit=MAX_RESULT_BYTES),
                error=j.decode_error(r["error"]),
                until=_date(r["until"]),
                event_type=r["event_type"],
                failed_attempts=tuple(failed.get(int(r["seq"]), ())),
                child=r["child"],
            )
            for r in j.journal_rows(db, tenant, self.id)
        ]

    def entry(self, name: str) -> Entry:
        """The journal entry of the step, sleep or wait called `name` (the first, if several)."""
        for e in self.journal:
            if e.name == name:
                return e
        raise LookupError(f"no journal entry named {name!r}")

    # -- inside

    def _row(self) -> Any:
        row = j.get_instance(self.env.db, self.env.tenant, self.id)
        assert row is not None
        return row

    def _deliver(self, type_: str, payload: bytes) -> None:
        db = self.env.db
        with db.transaction():
            inst = self._row()
            if inst["status"] in TERMINAL_STATUSES:
                raise ValueError(f"instance {self.id!r} is {inst['status']}; it takes no events")
            j.add_event(db, self.env.tenant, self.id, type_, payload, self.env.clock)
            engine.deliver_event(db, inst, type_, self.env.clock)

    def _drive(self, *, stop_at_wait: bool, max_activations: int) -> None:
        """Run whatever is due in the environment (this instance, its children, any other)
        until this instance ends, skipping the clock ahead whenever nothing is due."""
        env, db = self.env, self.env.db
        for _ in range(max_activations):
            while self._scheduled and self._scheduled[0][0] <= env.clock:
                _, type_, payload = self._scheduled.pop(0)
                if self.status not in TERMINAL_STATUSES:
                    self._deliver(type_, payload)
            row = self._row()
            if row["status"] in TERMINAL_STATUSES or row["status"] == Status.PAUSED:
                return
            due = j.due_instances(db, env.tenant, env.clock, 1)
            if due:
                env.instance(due[0])._activate()
                continue
            if stop_at_wait and self._parked():
                return
            wake = j.next_wake(db)
            later = [t for t in (wake, self._scheduled[0][0] if self._scheduled else None) if t]
            if not later:
                return
            env.clock = max(env.clock, min(later))  # nothing to do before then: skip ahead
        raise RuntimeError(f"instance {self.id!r} took more than {max_activations} activations")

    def _parked(self) -> bool:
        last = j.last_entry(self.env.db, self.env.tenant, self.id)
        return (
            last is not None
            and last["kind"] == "wait_event"
            and last["status"] == "waiting"
            and not self._scheduled
        )

    def _activate(self) -> None:
        env, db, tenant = self.env, self.env.db, self.env.tenant
        now = env.clock
        with db.transaction():
            aid = j.insert_activation(db, tenant, self.id, "run", now, "testing")
            engine.launched(db, tenant, self.id, aid, now)
            engine.prepare_replay(db, tenant, self.id, now)
            inst = self._row()
            code = j.get_code(db, tenant, inst["version"])
            assert code is not None
            journal = j.journal_entries(db, tenant, self.id)
            act = engine.build_activate(inst, code, journal, env.limits, now)
        self.activations += 1
        self._step = None
        self._state_bytes = sum(engine.carried_bytes(e) for e in journal)
        runtime = Runtime(act, _EngineChannel(self), exit=_stop, run_callable=self._call)
        handlers = _log_handlers()
        try:
            runtime.run()
        except _Crashed as crash:
            self._died(_CRASHES[crash.how], _CRASH_DETAILS[crash.how])
        except _Stop:
            pass
        finally:
            runtime.output.unmute()
            sys.modules.pop("tenant_workflows", None)
            _restore_log_handlers(handlers)
        if self._row()["lease"] is not None:  # it stopped without a final message
            self._died(outcome.PROTOCOL_ERROR, "exited without reporting a result")

    def _call(self, fn: Callable[..., Any], ctx: StepContext) -> Any:
        injected = self._failures.get((ctx.step, ctx.attempt))
        if injected is None:
            injected = self.env.failures.get((ctx.step, ctx.attempt))
        if isinstance(injected, Crash):
            raise _Crashed(injected.how)
        if injected is not None:
            raise injected
        return call_step(self._stand_ins.get(ctx.step, fn), ctx)

    def _died(self, how: str, detail: str) -> None:
        """What the supervisor journals when an activation dies without a final message."""
        db, tenant, now = self.env.db, self.env.tenant, self.env.clock
        err = outcome.crash_error(how, detail)
        with db.transaction():
            if self._step is not None:
                engine.step_failed(db, tenant, self.id, self._step, err, now, retryable=True)
            else:
                engine.activation_failed(db, tenant, self.id, self.env.limits, err, now)

    def apply(self, msg: object) -> bool:
        """Journal one message of the running activation, as the supervisor does; False when
        the supervisor would refuse it and stop the activation."""
        db, tenant, now, limits = self.env.db, self.env.tenant, self.env.clock, self.env.limits
        try:  # through the wire codec: the bounds every message is held to
            msg = decode_from_activation(encode(msg))
        except ProtocolError as exc:
            self._died(outcome.PROTOCOL_ERROR, exc.message)
            return False
        with db.transaction():
            if isinstance(msg, StepStarted | SleepCmd | WaitEventCmd | InvokeCmd):
                if engine.command(db, tenant, self.id, msg, limits, now) is not None:
                    return False
                if isinstance(msg, StepStarted):
                    self._step = msg.seq
            elif isinstance(msg, StepResult):
                engine.step_finished(
                    db, tenant, self.id, msg, limits, now, state_bytes=self._state_bytes
                )
            elif isinstance(msg, CompleteCmd | FailCmd):
                engine.workflow_finished(db, tenant, self.id, msg, now)
        return True


class _EngineChannel:
    """The runtime's channel in the harness: each message goes straight to the engine."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def send(self, msg: object) -> None:
        if not self.run.apply(msg):
            raise _Stop  # the supervisor would kill the activation here

    def wait_ack(self) -> None:
        return None


def _log_handlers() -> dict[str, list[logging.Handler]]:
    """Every logger's handlers. An activation is a fresh process: handlers its module adds at
    import (loaded again on every activation) must not pile up across activations here."""
    loggers = [("", logging.getLogger())] + [
        (name, logger)
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    ]
    return {name: list(logger.handlers) for name, logger in loggers}


def _restore_log_handlers(saved: dict[str, list[logging.Handler]]) -> None:
    for name, logger in [("", logging.getLogger()), *logging.Logger.manager.loggerDict.items()]:
        if isinstance(logger, logging.Logger):
            logger.handlers[:] = saved.get(name, [])


def _stop() -> NoReturn:
    """In place of the activation's `os._exit`: unwind back to the harness."""
    raise _Stop
