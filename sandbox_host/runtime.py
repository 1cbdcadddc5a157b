"""Replay a workflow against its journal and execute exactly one new command.

Every `step.*` call is answered from the journal in order. The first call with no finished entry is
the new command: it is sent to the supervisor, acknowledged after commit, and the process exits.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import sys
import time
import types
from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn, Protocol

import msgspec

from protocol.codec import dump_json, load_json
from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import (
    INSTANCE_ID_RE,
    MAX_EPOCH_S,
    MAX_ERROR_CHARS,
    MAX_NAME_CHARS,
    MAX_RESULT_BYTES,
    MAX_TIMEOUT_S,
    MAX_WORKFLOWS,
    WORKFLOW_NAME_RE,
)
from protocol.messages import (
    Activate,
    Checked,
    CheckResult,
    CompleteCmd,
    ErrorInfo,
    FailCmd,
    Final,
    Inspected,
    InvokeCmd,
    JournalEntry,
    Marks,
    Replay,
    SleepCmd,
    StepResult,
    StepStarted,
    Verdict,
    WaitEventCmd,
)
from stepvisor.sdk import WORKFLOW_ATTR, NonRetryableError, StepFailed, WaitTimeout

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RETRIES = {"limit": 5, "delay": 10.0, "backoff": "exponential"}
DEFAULT_STEP_TIMEOUT_S = 600.0
DEFAULT_EVENT_TIMEOUT_S = 86_400.0
_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(second|minute|hour|day|week)s?\s*$")


class _Stop(BaseException):
    """Unwinds tenant code without being caught by `except Exception`."""


class _Nondeterminism(_Stop):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# NamedTuples, not dataclasses: importing dataclasses and inspect costs an activation ~10 ms.
class Event(NamedTuple):
    """What a workflow function receives as its first argument."""

    payload: Any
    instance_id: str
    timestamp: dt.datetime


class StepContext(NamedTuple):
    """Passed to a step callable that takes one argument."""

    attempt: int
    step: str


def duration_s(value: object, what: str) -> float:
    """Seconds from a number or a string such as "10 seconds" or "2 hours"."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number of seconds or a string like '5 minutes'")
    if isinstance(value, int | float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{what} must be a finite number of seconds")
        if value < 0:
            raise ValueError(f"{what} must not be negative")
        return float(value)
    if isinstance(value, str) and (m := _DURATION_RE.match(value)):
        return float(m.group(1)) * _UNITS[m.group(2)]
    raise TypeError(f"{what} must be a number of seconds or a string like '5 minutes'")


def _at_most_a_year(seconds: float, what: str) -> float:
    if seconds > MAX_TIMEOUT_S:
        raise ValueError(f"{what} must be at most {MAX_TIMEOUT_S:.0f} seconds (a year)")
    return seconds


def _sleep_end(until: float) -> float:
    """A sleep's end as the protocol carries it: finite, from the epoch to MAX_EPOCH_S."""
    if until != until or until > MAX_EPOCH_S:
        raise ValueError(f"a sleep must end by epoch second {MAX_EPOCH_S:.0f}")
    return max(until, 0.0)  # an end before 1970 is in the past: no sleep at all


def _retry_policy(retries: object) -> tuple[int, float, str]:
    policy = dict(DEFAULT_RETRIES)
    if retries is not None:
        if not isinstance(retries, dict) or set(retries) - {"limit", "delay", "backoff"}:
            raise TypeError("retries must be a dict with keys limit, delay, backoff")
        policy.update(retries)
    limit, backoff = policy["limit"], policy["backoff"]
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= 10_000:
        raise ValueError("retries['limit'] must be an integer from 0 to 10000")
    if backoff not in ("constant", "linear", "exponential"):
        raise ValueError("retries['backoff'] must be 'constant', 'linear' or 'exponential'")
    delay_s = _at_most_a_year(duration_s(policy["delay"], "retries['delay']"), "retries['delay']")
    return limit, delay_s, str(backoff)


_SOURCES: dict[str, str] = {}  # virtual filename → tenant source, for tracebacks


def tenant_traceback(exc: BaseException) -> str:
    """The exception's traceback with the runtime's own frames left out."""
    import linecache
    import traceback

    for filename, source in _SOURCES.items():
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    try:
        te = traceback.TracebackException.from_exception(exc)
        te.stack = traceback.StackSummary.from_list(
            [f for f in te.stack if not f.filename.startswith(_HERE)]
        )
        return "".join(te.format())
    except _Stop:
        raise
    except BaseException:  # tenant code in a chained exception's __str__ or __notes__ raised
        frames = traceback.extract_tb(exc.__traceback__)
        kept = [f for f in frames if not f.filename.startswith(_HERE)]
        head = "Traceback (most recent call last):\n"
        return head + "".join(traceback.format_list(kept)) + exception_type(exc) + "\n"


# Modules whose exception types users know by their bare name.
_BARE_MODULES = frozenset({"builtins", "tenant_workflows", "stepvisor.sdk", "__main__"})


def exception_type(exc: BaseException) -> str:
    """The exception's class as users name it: bare for builtins, the tenant's own module and
    the SDK; qualified by its module otherwise (two libraries may both have an `Error`)."""
    cls = type(exc)
    name = cls.__qualname__ if isinstance(cls.__qualname__, str) else cls.__name__
    module = getattr(cls, "__module__", None)
    if isinstance(module, str) and module not in _BARE_MODULES:
        name = f"{module}.{name}"
    return name[:MAX_NAME_CHARS]


def exception_message(exc: BaseException) -> str:
    """str(exc), never raising: a tenant's `__str__` may raise or return anything."""
    for render in (str, repr):
        try:
            text = render(exc)
        except _Stop:
            raise
        except BaseException:
            continue
        if isinstance(text, str):
            return text[:16_000]
    return f"<{exception_type(exc)} object: str() and repr() raised>"


def error_info(exc: BaseException, code: str | None = None) -> ErrorInfo:
    """What users see of a failure. Never raises: recording an error must not become another."""
    tb = tenant_traceback(exc)
    if isinstance(exc, StepFailed):
        try:  # a tenant subclass may make these properties that raise
            step, step_tb = exc.step, exc.step_traceback
        except Exception:
            step, step_tb = "", ""
        if isinstance(step, str) and isinstance(step_tb, str) and step_tb:
            tb += f"\nThe step {step!r} failed with:\n{step_tb}"
    return ErrorInfo(
        type=exception_type(exc),
        message=exception_message(exc),
        traceback=tb[-48_000:],
        code=code,
    )


class _Gate:
    """Stands in for sys.stdout or sys.stderr while an activation replays: drops what is
    written while shut, passes it on otherwise. Tenant code that keeps a reference made during
    replay (a logging handler made at import, say) keeps writing to the real stream after."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.shut = False

    def write(self, text: str) -> int:
        return len(text) if self.shut else int(self.stream.write(text))

    def flush(self) -> None:
        if not self.shut:
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty, buffer, ...
        return getattr(self.stream, name)


class Output:
    """Silence stdout/stderr while replaying, so each line is emitted once: at the fd level (C
    extensions, child processes) and at the level of `sys.stdout` (which, under the test harness
    and pytest's capture, need not write to fd 1)."""

    def __init__(self) -> None:
        self._saved: tuple[int, int] | None = None
        self._streams: tuple[Any, Any] | None = None
        self._gates: tuple[_Gate, _Gate] | None = None

    def mute(self) -> None:
        if self._saved is None:
            sys.stdout.flush()
            sys.stderr.flush()
            self._saved = (os.dup(1), os.dup(2))
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            os.close(null)
            self._streams = (sys.stdout, sys.stderr)
            self._gates = (_Gate(sys.stdout), _Gate(sys.stderr))
            for gate in self._gates:
                gate.shut = True
            sys.stdout, sys.stderr = self._gates

    def unmute(self) -> None:
        if self._saved is not None:
            if self._gates is not None:
                for gate in self._gates:
                    gate.shut = False  # a reference kept to one writes through from now on
            if self._streams is not None:
                sys.stdout, sys.stderr = self._streams
                self._streams = None
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            os.close(self._saved[0])
            os.close(self._saved[1])
            self._saved = None


def load_workflows(act: Activate) -> dict[str, Callable[..., Any]]:
    """Execute the tenant's code and return its `@workflow` functions by name."""
    if act.code_kind == "pickle":
        import cloudpickle  # only functions deployed by value need it

        fn = cloudpickle.loads(act.code)
        name = getattr(fn, WORKFLOW_ATTR, None)
        if not callable(fn) or not isinstance(name, str):
            raise TypeError("the deployed object is not a function decorated with @workflow")
        return {name: fn}
    filename = f"<{act.tenant}>/{act.filename}"
    source = act.code.decode("utf-8")
    _SOURCES[filename] = source
    module = types.ModuleType("tenant_workflows")
    module.__file__ = filename
    sys.modules[module.__name__] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    found: dict[str, Callable[..., Any]] = {}
    for value in list(module.__dict__.values()):
        name = getattr(value, WORKFLOW_ATTR, None)
        if callable(value) and isinstance(name, str):
            found[name] = value
    return found


class Step:
    """The `step` argument of a workflow: every durable operation goes through it."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    def do(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        retries: dict[str, Any] | None = None,
        timeout: float | str | None = None,
    ) -> Any:
        """Run `fn` once, durably: its JSON result is journaled and never recomputed."""
        if not callable(fn):
            raise TypeError("step.do needs a callable")
        entry = self._rt.claim("step", name)
        if entry is not None and entry.status == "ok":
            return load_json(entry.result or b"null")
        if entry is not None and entry.status == "error":
            err = entry.error or ErrorInfo(type="Error", message="")
            raise StepFailed(name, err.type, err.message, err.traceback)
        limit, delay_s, backoff = _retry_policy(retries)
        timeout_s = DEFAULT_STEP_TIMEOUT_S if timeout is None else duration_s(timeout, "timeout")
        timeout_s = max(0.001, min(timeout_s, self._rt.act.max_timeout_s, MAX_TIMEOUT_S))
        self._rt.run_step(
            name, fn, (entry.attempts if entry else 0) + 1, limit, delay_s, backoff, timeout_s
        )

    def sleep(self, name: str, seconds: float | str) -> None:
        """Sleep durably; no process exists while the instance sleeps."""
        entry = self._rt.claim("sleep", name)
        if entry is None:
            until = _sleep_end(self._rt.act.now + duration_s(seconds, "seconds"))
        else:
            until = entry.until or 0.0
        if until <= self._rt.act.now and entry is not None:
            return
        self._rt.finish(SleepCmd(seq=self._rt.cursor - 1, name=name, until=until))

    def sleep_until(self, name: str, when: dt.datetime | float) -> None:
        """Sleep durably until `when` (an aware datetime, a naive one taken as UTC, or epoch s)."""
        entry = self._rt.claim("sleep", name)
        if entry is None:
            if isinstance(when, dt.datetime):
                aware = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
                until = aware.timestamp()
            elif isinstance(when, int | float) and not isinstance(when, bool):
                until = float(when)
            else:
                raise TypeError("sleep_until needs a datetime or epoch seconds")
            until = _sleep_end(until)
        else:
            until = entry.until or 0.0
            if until <= self._rt.act.now:
                return
        self._rt.finish(SleepCmd(seq=self._rt.cursor - 1, name=name, until=until))

    def wait_for_event(
        self, name: str, *, type: str, timeout: float | str = DEFAULT_EVENT_TIMEOUT_S
    ) -> dict[str, Any]:
        """Wait durably for an event of `type`; returns {"type", "payload", "timestamp"}."""
        if not isinstance(type, str) or not 0 < len(type) <= 256:
            raise TypeError("type must be a non-empty string of at most 256 characters")
        entry = self._rt.claim("wait_event", name)
        if entry is not None and entry.status == "ok":
            # The event as journaled: the user's payload (up to the payload limit) wrapped.
            result: dict[str, Any] = load_json(
                entry.result or b"null", what="the event", limit=MAX_RESULT_BYTES
            )
            return result
        if entry is not None and entry.status == "timeout":
            raise WaitTimeout(name, type)
        timeout_s = max(0.001, _at_most_a_year(duration_s(timeout, "timeout"), "timeout"))
        self._rt.finish(
            WaitEventCmd(seq=self._rt.cursor - 1, name=name, type=type, timeout_s=timeout_s)
        )
        raise AssertionError("unreachable")

    def invoke(self, name: str, workflow: str, params: Any = None, *, id: str | None = None) -> Any:
        """Start an instance of the tenant's `workflow` with `params` and wait, durably, for its
        output. Its error (or its termination) is raised here as `StepFailed`."""
        if not isinstance(workflow, str) or not WORKFLOW_NAME_RE.match(workflow):
            raise TypeError("workflow must be a workflow name")
        if id is not None and (not isinstance(id, str) or not INSTANCE_ID_RE.match(id)):
            raise ValueError("id must match ^[A-Za-z0-9_][A-Za-z0-9_-]{0,99}$")
        entry = self._rt.claim("invoke", name)
        if entry is not None and entry.status == "ok":
            return load_json(entry.result or b"null", what="the child's output")
        if entry is not None and entry.status == "error":
            err = entry.error or ErrorInfo(type="Error", message="")
            raise StepFailed(name, err.type, err.message, err.traceback)
        data = dump_json(params, what="the child's params") if entry is None else b"null"
        self._rt.finish(
            InvokeCmd(seq=self._rt.cursor - 1, name=name, workflow=workflow, params=data, id=id)
        )


def exit_process() -> NoReturn:
    """Leave at once: no tenant `finally:` or `except:` may run after the one new command."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Channel(Protocol):
    """Where the runtime's messages go: the activation's socket (`sandbox_host.channel`), or,
    under `stepvisor.testing`, straight to the supervisor's engine."""

    def send(self, msg: object) -> None: ...
    def wait_ack(self) -> None: ...


class Runtime:
    """One activation's view of one instance."""

    def __init__(
        self,
        act: Activate,
        channel: Channel,
        exit: Callable[[], NoReturn] = exit_process,
        marks: tuple[float, float, float] | None = None,
        run_callable: StepRunner | None = None,
    ) -> None:
        self.act = act
        # How a step's callable is called: in an activation, directly; `stepvisor.testing`
        # passes one that injects failures and stand-ins by step name and attempt.
        self.run_callable = run_callable or call_step
        self.marks = marks  # started, hello, activated (CLOCK_MONOTONIC), when timed
        self.replayed: float | None = None
        self.channel = channel
        self.exit = exit
        self.finished = False
        self.journal: list[JournalEntry] = act.journal
        self.cursor = 0
        self.matched = 0  # journal entries replay asked for, in order, so far
        self.output = Output()

    # -- replay bookkeeping

    def claim(self, kind: str, name: str) -> JournalEntry | None:
        """Take the next sequence number; return its journal entry, checking it matches."""
        if self.finished:
            raise _Stop
        if not isinstance(name, str) or not 0 < len(name) <= 256:
            raise TypeError("step name must be a non-empty string of at most 256 characters")
        seq = self.cursor
        self.cursor += 1
        if seq >= len(self.journal):
            self.replayed = time.monotonic()
            self.output.unmute()
            return None
        entry = self.journal[seq]
        if entry.kind != kind or entry.name != name:
            raise _Nondeterminism(
                f"replay asked for {kind} {name!r} at seq {seq}, but the journal holds "
                f"{entry.kind} {entry.name!r}: the workflow's code outside steps is not "
                "deterministic"
            )
        self.matched = seq + 1
        if seq == len(self.journal) - 1:
            self.output.unmute()
        return entry

    # -- the one new command

    def finish(self, msg: Final) -> NoReturn:
        if self.finished:  # tenant code caught the exit (in-process use only): do nothing more
            raise _Stop
        self.finished = True
        self.output.unmute()
        sys.stdout.flush()
        sys.stderr.flush()
        if self.marks is not None and isinstance(msg, Final):
            done = time.monotonic()
            msg = msgspec.structs.replace(
                msg, marks=Marks(*self.marks, replayed=self.replayed or done, done=done)
            )
        self.channel.send(msg)
        self.channel.wait_ack()
        self.exit()

    def run_step(
        self,
        name: str,
        fn: Callable[..., Any],
        attempt: int,
        limit: int,
        delay_s: float,
        backoff: str,
        timeout_s: float,
    ) -> NoReturn:
        seq = self.cursor - 1
        sys.stdout.flush()  # output so far belongs before the step, in the supervisor's log too
        sys.stderr.flush()
        self.channel.send(
            StepStarted(
                seq=seq,
                name=name,
                attempt=attempt,
                retry_limit=limit,
                retry_delay_s=delay_s,
                backoff=backoff,  # type: ignore[arg-type]
                timeout_s=timeout_s,
            )
        )
        self.channel.wait_ack()  # the supervisor now attributes our output to this step
        t0 = time.perf_counter()
        try:
            value = self.run_callable(fn, StepContext(attempt=attempt, step=name))
            data = dump_json(value, what=f"the result of step {name!r}")
        except ProtocolError as exc:
            result = StepResult(
                seq=seq,
                ok=False,
                retryable=False,
                duration_ms=_ms(t0),
                error=ErrorInfo(type="StepResultError", message=exc.message),
            )
        except NonRetryableError as exc:
            result = StepResult(
                seq=seq, ok=False, retryable=False, duration_ms=_ms(t0), error=error_info(exc)
            )
        except _Stop:
            raise
        except BaseException as exc:
            result = StepResult(
                seq=seq, ok=False, retryable=True, duration_ms=_ms(t0), error=error_info(exc)
            )
        else:
            result = StepResult(seq=seq, ok=True, value=data, duration_ms=_ms(t0))
        self.finish(result)

    # -- entry points

    def inspect(self) -> NoReturn:
        names = sorted(self._load())
        self.finish(Inspected(workflows=names))

    def check(self) -> NoReturn:
        """Replay each of the activation's `replays` against its code, up to the first command
        that is not journaled yet, and report how far each got. No step runs."""
        workflows = self._load()
        results = [check_replay(self.act, workflows, r) for r in self.act.replays]
        self.finish(Checked(workflows=sorted(workflows), results=results))

    def _load(self) -> dict[str, Callable[..., Any]]:
        """The code's workflows, or the deploy's failure reported (and the process gone)."""
        try:
            workflows = load_workflows(self.act)
        except BaseException as exc:
            self.finish(FailCmd(error=error_info(exc, ErrorCode.DEPLOY_FAILED)))
        self.replayed = time.monotonic()
        names = list(workflows)
        if len(names) > MAX_WORKFLOWS:
            self.finish(
                FailCmd(
                    error=ErrorInfo(
                        type="TooManyWorkflows",
                        code=ErrorCode.DEPLOY_FAILED,
                        message=f"{self.act.filename} defines {len(names)} workflows; "
                        f"the limit is {MAX_WORKFLOWS}",
                    )
                )
            )
        if not names:
            self.finish(
                FailCmd(
                    error=ErrorInfo(
                        type="NoWorkflows",
                        code=ErrorCode.DEPLOY_FAILED,
                        message=f"{self.act.filename} defines no function decorated with @workflow",
                    )
                )
            )
        return workflows

    def run(self, workflows: dict[str, Callable[..., Any]] | None = None) -> NoReturn:
        """Replay the journal and send the one new command; `workflows`: the code, loaded."""
        if self.journal:
            self.output.mute()
        try:
            if workflows is None:
                workflows = load_workflows(self.act)
            fn = workflows.get(self.act.workflow)
            if fn is None:
                raise LookupError(f"workflow {self.act.workflow!r} is not in the pinned code")
            event = Event(
                payload=load_json(self.act.params),
                instance_id=self.act.instance,
                timestamp=dt.datetime.fromtimestamp(self.act.created_at, dt.UTC),
            )
            value = fn(event, Step(self))
        except _Nondeterminism as exc:
            self.finish(
                FailCmd(
                    error=ErrorInfo(
                        type="NondeterminismError",
                        message=exc.message,
                        code=ErrorCode.NONDETERMINISM,
                    )
                )
            )
        except _Stop:
            raise
        except BaseException as exc:
            self.finish(FailCmd(error=error_info(exc)))
        if self.cursor < len(self.journal):
            self.finish(
                FailCmd(
                    error=ErrorInfo(
                        type="NondeterminismError",
                        code=ErrorCode.NONDETERMINISM,
                        message=f"the workflow returned after {self.cursor} steps, "
                        f"but the journal holds "
                        f"{len(self.journal)}",
                    )
                )
            )
        try:
            output = dump_json(value, what="the workflow's return value")
        except ProtocolError as exc:
            self.finish(FailCmd(error=ErrorInfo(type="OutputError", message=exc.message)))
        self.finish(CompleteCmd(output=output))


StepRunner = Callable[[Callable[..., Any], StepContext], Any]


class _FirstCommand:
    """A check's channel: keeps the first command the replay would send, and stops it there."""

    def __init__(self) -> None:
        self.msg: object = None

    def send(self, msg: object) -> None:
        if self.msg is None:
            self.msg = msg
        raise _Stop

    def wait_ack(self) -> None:
        return None


def _never_exits() -> NoReturn:
    raise _Stop


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, msg: object) -> None:
        self.sent.append(msg)

    def wait_ack(self) -> None:
        return None


def in_this_process(act: Activate) -> Inspected | Checked | FailCmd:
    """Run an inspection or a check here, not in a sandbox (the test harness; `stepvisor replay
    --file`, on the user's own file): its final message. The tenant module is forgotten after."""
    channel = _Recorder()
    runtime = Runtime(act, channel, exit=_never_exits)
    try:
        runtime.check() if act.mode == "check" else runtime.inspect()
    except _Stop:
        pass
    finally:
        runtime.output.unmute()
        sys.modules.pop("tenant_workflows", None)
    last = channel.sent[-1]
    assert isinstance(last, Inspected | Checked | FailCmd)
    return last


def check_replay(
    act: Activate, workflows: dict[str, Callable[..., Any]], replay: Replay
) -> CheckResult:
    """Replay one instance's journal against `workflows` until the first command not journaled
    yet (which is not run), and say whether the journal held up."""
    if replay.workflow not in workflows:
        return CheckResult(
            instance=replay.instance,
            verdict="not_in_code",
            replayed=0,
            message=f"the code defines no workflow {replay.workflow!r}",
        )
    channel = _FirstCommand()
    runtime = Runtime(
        msgspec.structs.replace(
            act,
            mode="run",
            instance=replay.instance,
            workflow=replay.workflow,
            params=replay.params,
            created_at=replay.created_at,
            journal=replay.journal,
            replays=[],
        ),
        channel,
        exit=_never_exits,
    )
    try:
        runtime.run(workflows)
    except _Stop:
        pass
    finally:
        runtime.output.unmute()
    msg, journaled = channel.msg, len(replay.journal)
    if isinstance(msg, StepStarted | SleepCmd | WaitEventCmd | InvokeCmd):
        kinds = {StepStarted: "step", SleepCmd: "sleep", WaitEventCmd: "wait_event"}
        kind = kinds.get(type(msg), "invoke")
        return CheckResult(
            instance=replay.instance,
            verdict="compatible",
            replayed=min(msg.seq + 1, journaled),
            message=f"goes on with {kind} {msg.name!r} at seq {msg.seq}"[:MAX_ERROR_CHARS],
        )
    if isinstance(msg, CompleteCmd):
        return CheckResult(
            instance=replay.instance, verdict="compatible", replayed=journaled, message="returns"
        )
    if isinstance(msg, FailCmd):
        err = msg.error
        verdict: Verdict = "nondeterministic" if err.code == ErrorCode.NONDETERMINISM else "fails"
        text = err.message if verdict == "nondeterministic" else f"{err.type}: {err.message}"
        return CheckResult(
            instance=replay.instance,
            verdict=verdict,
            replayed=runtime.matched,
            message=text[:MAX_ERROR_CHARS],
        )
    return CheckResult(
        instance=replay.instance,
        verdict="fails",
        replayed=runtime.matched,
        message="the replay stopped without asking for a command",
    )


def call_step(fn: Callable[..., Any], ctx: StepContext) -> Any:
    """Call a step's callable, with the context when it takes an argument."""
    return fn(ctx) if _wants_ctx(fn) else fn()


def _wants_ctx(fn: Callable[..., Any]) -> bool:
    """True when `fn` takes a required positional argument (or *args): it gets the context.

    Read from the code object rather than `inspect.signature`: importing inspect costs every
    activation several milliseconds.
    """
    target: Any = fn
    bound = 0
    while isinstance(target, functools.partial):
        bound += len(target.args)
        target = target.func
    if isinstance(target, types.MethodType):
        target, bound = target.__func__, bound + 1
    elif not isinstance(target, types.FunctionType):
        target = getattr(type(target), "__call__", None)  # noqa: B004 - a callable object
        bound += 1
    code = getattr(target, "__code__", None)
    if code is None:
        return False
    if code.co_flags & 0x04:  # CO_VARARGS
        return True
    defaults = len(getattr(target, "__defaults__", None) or ())
    required: int = code.co_argcount - defaults - bound
    return required >= 1


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)
