"""sandbox_host.runtime in-process: replay answers from the journal; one new command is sent."""

from __future__ import annotations

import datetime as dt
import io
import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import pytest

from protocol.codec import decode_from_activation, encode
from protocol.messages import (
    Activate,
    CompleteCmd,
    ErrorInfo,
    FailCmd,
    Inspected,
    JournalEntry,
    SleepCmd,
    StepResult,
    StepStarted,
    WaitEventCmd,
)
from sandbox_host.runtime import Runtime, _Stop

NOW = 1_700_000_000.0
CREATED = NOW - 3600


class RecordingChannel:
    """Stands in for the activation's socket: records what is sent, acks at once."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, msg: object) -> None:
        self.sent.append(msg)

    def wait_ack(self) -> None:
        return None


@dataclass
class Outcome:
    sent: list[Any]
    effects: list[str]

    @property
    def last(self) -> Any:
        return self.sent[-1]


HEADER = "from stepvisor import workflow, NonRetryableError, StepFailed, WaitTimeout\n"
EFFECTS_HELPER = """
def effect(name):
    # a visible side effect of running a step's callable
    with open(LOG, "a") as f:
        f.write(name + "\\n")
    return name
"""


@pytest.fixture
def activate(tmp_path: Path) -> Iterator[Callable[..., Outcome]]:
    log = tmp_path / "effects.log"
    runtimes: list[Runtime] = []

    def run(
        source: str,
        journal: list[JournalEntry] | None = None,
        *,
        mode: Literal["run", "inspect"] = "run",
        workflow: str = "w",
        params: bytes = b'{"x": 1}',
        now: float = NOW,
        max_timeout_s: float = 600.0,
    ) -> Outcome:
        code = HEADER + f"LOG = {str(log)!r}\n" + EFFECTS_HELPER + textwrap.dedent(source)
        act = Activate(
            mode=mode,
            tenant="acme",
            filename="wf.py",
            code_kind="source",
            code=code.encode(),
            instance="inst-1",
            workflow=workflow,
            params=params,
            created_at=CREATED,
            journal=journal or [],
            now=now,
            max_timeout_s=max_timeout_s,
        )
        channel = RecordingChannel()
        runtime = Runtime(act, channel, exit=stop)  # type: ignore[arg-type]
        runtimes.append(runtime)
        try:
            with pytest.raises(_Stop):
                if mode == "inspect":
                    runtime.inspect()
                else:
                    runtime.run()
        finally:
            runtime.output.unmute()
            sys.modules.pop("tenant_workflows", None)
        # everything the runtime sends must be accepted by the supervisor's decoder
        for msg in channel.sent:
            assert decode_from_activation(encode(msg)) == msg
        effects = log.read_text().split() if log.exists() else []
        log.unlink(missing_ok=True)
        return Outcome(channel.sent, effects)

    yield run
    for runtime in runtimes:  # never leave fds 1/2 pointing at /dev/null
        runtime.output.unmute()


def stop() -> NoReturn:
    """In place of the activation's os._exit: unwind back to the test."""
    raise _Stop


def ok(seq: int, name: str, value: object) -> JournalEntry:
    return JournalEntry(
        seq=seq, kind="step", name=name, status="ok", attempts=1, result=json.dumps(value).encode()
    )


def output_of(outcome: Outcome) -> object:
    assert isinstance(outcome.last, CompleteCmd), outcome.sent
    return json.loads(outcome.last.output)


def failure_of(outcome: Outcome) -> ErrorInfo:
    assert isinstance(outcome.last, FailCmd), outcome.sent
    return outcome.last.error


THREE_STEPS = """
@workflow("w")
def w(event, step):
    a = step.do("a", lambda: effect("a") and 1)
    b = step.do("b", lambda: effect("b") and a + 1)
    c = step.do("c", lambda: effect("c") and b + 1)
    return {"sum": a + b + c}
"""


# ---------------------------------------------------------------- steps


def test_first_activation_starts_and_runs_step_zero(activate: Callable[..., Outcome]) -> None:
    out = activate(THREE_STEPS)
    assert len(out.sent) == 2
    started, result = out.sent
    assert started == StepStarted(
        seq=0,
        name="a",
        attempt=1,
        retry_limit=5,
        retry_delay_s=10.0,
        backoff="exponential",
        timeout_s=600.0,
    )
    assert isinstance(result, StepResult)
    assert (result.seq, result.ok, result.value, result.error) == (0, True, b"1", None)
    assert result.duration_ms >= 0
    assert out.effects == ["a"]


def test_journaled_steps_are_not_rerun(activate: Callable[..., Outcome]) -> None:
    out = activate(THREE_STEPS, [ok(0, "a", 1)])
    assert out.effects == ["b"]  # "a" came from the journal
    started, result = out.sent
    assert isinstance(started, StepStarted) and (started.seq, started.name) == (1, "b")
    assert isinstance(result, StepResult) and (result.seq, result.value) == (1, b"2")


def test_journaled_result_value_is_what_the_workflow_sees(activate: Callable[..., Outcome]) -> None:
    out = activate(THREE_STEPS, [ok(0, "a", 10), ok(1, "b", 20), ok(2, "c", 30)])
    assert out.effects == []
    assert len(out.sent) == 1
    assert output_of(out) == {"sum": 60}


def test_workflow_return_sends_complete_with_json_output(activate: Callable[..., Outcome]) -> None:
    out = activate(
        """
        @workflow("w")
        def w(event, step):
            return {"payload": event.payload, "id": event.instance_id,
                    "ts": event.timestamp.isoformat(), "list": [1, 2.5, None, True, "é"]}
    """,
        params=b'{"email": "a@b.c"}',
    )
    assert out.sent == [out.last]
    assert output_of(out) == {
        "payload": {"email": "a@b.c"},
        "id": "inst-1",
        "ts": dt.datetime.fromtimestamp(CREATED, dt.UTC).isoformat(),
        "list": [1, 2.5, None, True, "é"],
    }


def test_non_json_return_value_fails_the_instance(activate: Callable[..., Outcome]) -> None:
    out = activate("""
        @workflow("w")
        def w(event, step):
            return {1, 2}
    """)
    err = failure_of(out)
    assert err.type == "OutputError"
    assert "return value" in err.message and "not JSON-compatible" in err.message


def test_step_options_reach_the_supervisor(activate: Callable[..., Outcome]) -> None:
    out = activate("""
        @workflow("w")
        def w(event, step):
            step.do("a", lambda: 1, retries={"limit": 2, "delay": "5 seconds",
                                             "backoff": "linear"}, timeout=30)
    """)
    assert out.sent[0] == StepStarted(
        seq=0,
        name="a",
        attempt=1,
        retry_limit=2,
        retry_delay_s=5.0,
        backoff="linear",
        timeout_s=30.0,
    )


def test_step_timeout_is_capped_by_the_tenant_limit(activate: Callable[..., Outcome]) -> None:
    out = activate(
        """
        @workflow("w")
        def w(event, step):
            step.do("a", lambda: 1, timeout="2 hours")
    """,
        max_timeout_s=60.0,
    )
    assert isinstance(out.sent[0], StepStarted) and out.sent[0].timeout_s == 60.0


def test_step_error_entry_raises_catchable_step_failed(activate: Callable[..., Outcome]) -> None:
    journal = [
        JournalEntry(
            seq=0,
            kind="step",
            name="charge",
            status="error",
            attempts=6,
            error=ErrorInfo(type="ValueError", message="card declined", traceback="Traceback: ..."),
        )
    ]
    out = activate(
        """
        @workflow("w")
        def w(event, step):
            try:
                step.do("charge", lambda: effect("charge"))
            except StepFailed as exc:
                return {"step": exc.step, "type": exc.error_type, "message": exc.error_message}
            return "not reached"
    """,
        journal,
    )
    assert out.effects == []
    assert output_of(out) == {"step": "charge", "type": "ValueError", "message": "card declined"}


def test_uncaught_step_failed_fails_the_instance(activate: Callable[..., Outcome]) -> None:
    journal = [
        JournalEntry(
            seq=0,
            kind="step",
            name="charge",
            status="error",
            attempts=1,
            error=ErrorInfo(type="ValueError", message="card declined"),
        )
    ]
    out = activate(
        """
        @workflow("w")
        def w(event, step):
            step.do("charge", lambda: 1)
    """,
        journal,
    )
    err = failure_of(out)
    assert err.type == "StepFailed"
    assert "charge" in err.message and "card declined" in err.message


def test_a_failing_step_is_reported_retryable(activate: Callable[..., Outcome]) -> None:
    out = activate("""
        @workflow("w")
        def w(event, step):
            step.do("a", lambda: 1 / 0)
    """)
    result = out.last
    assert isinstance(result, StepResult)
    assert (result.ok, result.retryable, result.value) == (False, True, None)
    assert result.error is not None and result.error.type == "ZeroDivisionError"
    assert "1 / 0" in result.error.traceback


def test_non_retryable_error_is_reported_so(activate: Callable[..., Outcome]) -> None:
    out = activate("""
        class Declined(NonRetryableError):
            pass

        def charge():
            raise Declined("card declined")

        @workflow("w")
        def w(event, step):
            step.do("charge", charge)
    """)
    result = out.last
    assert isinstance(result, StepResult)
    assert (result.ok, result.retryable) == (False, False)
    assert result.error is not None
    assert (result.error.type, result.error.message) == ("Declined", "card declined")


def test_non_json_step_result_is_a_non_retryable_error(activate: Callable[..., Outcome]) -> None:
    out = activate("""
        import datetime

        @workflow("w")
        def w(event, step):
            step.do("when", lambda: effect("when") and datetime.datetime.now())
    """)
    assert out.effects == ["when"]
    result = out.last
    assert isinstance(result, StepResult)
    assert (result.seq, result.ok, result.retryable, result.value) == (0, False, False, None)
    assert result.error is not None
    assert result.error.type == "StepResultError"
    assert "'when'" in result.error.message and "not JSON-compatible" in result.error.message


def test_ctx_attempt_counts_journaled_attempts(activate: Callable[..., Outcome]) -> None:
    journal = [
        JournalEntry(
            seq=0,
            kind="step",
            name="flaky",
            status="retry",
            attempts=2,
            error=ErrorInfo(type="E", message="try again"),
        )
    ]
    out = activate(
        """
        def flaky(ctx):
            return {"attempt": ctx.attempt, "step": ctx.step}

        @workflow("w")
        def w(event, step):
            step.do("flaky", flaky)
    """,
        journal,
    )
    started, result = out.sent
    assert isinstance(started, StepStarted) and (started.seq, started.attempt) == (0, 3)
    assert isinstance(result, StepResult)
    assert json.loads(result.value or b"") == {"attempt": 3, "step": "flaky"}


CALLABLES = """
import functools

class Obj:
    def __call__(self, ctx):
        return ctx.attempt

    def method(self, ctx):
        return ctx.attempt

    def plain(self):
        return "no ctx"

def with_ctx(ctx):
    return ctx.attempt

def without():
    return "no ctx"

def defaulted(ctx=None):
    return "no ctx" if ctx is None else "got ctx"

def two(ctx, extra):
    return [ctx.attempt, extra]

def star(*args):
    return [a.attempt for a in args]

@workflow("w")
def w(event, step):
    return step.do("a", %s)
"""


@pytest.mark.parametrize(
    "expr,expected",
    [
        ("with_ctx", 1),
        ("lambda ctx: ctx.attempt", 1),
        ("without", "no ctx"),
        ("lambda: 'no ctx'", "no ctx"),
        ("defaulted", "no ctx"),
        ("Obj()", 1),
        ("Obj().method", 1),
        ("Obj().plain", "no ctx"),
        ("star", [1]),
        ("functools.partial(without)", "no ctx"),
        ("dict", {}),
    ],
)
def test_step_callable_gets_ctx_only_when_it_takes_an_argument(
    activate: Callable[..., Outcome], expr: str, expected: object
) -> None:
    result = activate(CALLABLES % expr).last
    assert isinstance(result, StepResult)
    assert result.ok, result.error
    assert json.loads(result.value or b"") == expected


def test_partial_step_callable_gets_ctx(activate: Callable[..., Outcome]) -> None:
    result = activate(CALLABLES % "functools.partial(two, extra=5)").last
    assert isinstance(result, StepResult)
    assert result.ok, result.error
    assert json.loads(result.value or b"") == [1, 5]


def test_uncaught_exception_fails_with_the_tenant_traceback(
    activate: Callable[..., Outcome],
) -> None:
    out = activate("""
        def helper(n):
            raise ValueError(f"bad thing {n}")

        @workflow("w")
        def w(event, step):
            total = 41
            helper(total + 1)
    """)
    err = failure_of(out)
    assert (err.type, err.message, err.code) == ("ValueError", "bad thing 42", None)
    assert '<acme>/wf.py", line' in err.traceback
    assert "helper(total + 1)" in err.traceback  # the tenant's source lines are shown
    assert 'raise ValueError(f"bad thing {n}")' in err.traceback
    assert "sandbox_host" not in err.traceback  # the runtime's own frames are left out


def test_unknown_workflow_fails(activate: Callable[..., Outcome]) -> None:
    out = activate(THREE_STEPS, workflow="missing")
    err = failure_of(out)
    assert "missing" in err.message


# ---------------------------------------------------------------- determinism


def test_step_name_mismatch_is_nondeterminism(activate: Callable[..., Outcome]) -> None:
    out = activate(
        """
        @workflow("w")
        def w(event, step):
            step.do("second", lambda: effect("second"))
    """,
        [ok(0, "first", 1)],
    )
    assert out.effects == []
    assert out.sent == [out.last]
    err = failure_of(out)
    assert err.code == "NONDETERMINISM"
    assert "'first'" in err.message and "'second'" in err.message


def test_step_kind_mismatch_is_nondeterminism(activate: Callable[..., Outcome]) -> None:
    journal = [JournalEntry(seq=0, kind="sleep", name="a", status="ok", until=NOW - 1)]
    out = activate(
        """
        @workflow("w")
        def w(event, step):
            step.do("a", lambda: 1)
    """,
        journal,
    )
    err = failure_of(out)
    assert err.code == "NONDETERMINISM"
    assert "sleep" in err.message and "step" in err.message


def test_nondeterminism_cannot_be_caught_by_tenant_code(activate: Callable[..., Outcome]) -> None:
    out = activate(
        """
        @workflow("w")
        def w(event, step):
            try:
                step.do("second", lambda: 1)
            except Exception:
                return "swallowed"
    """,
        [ok(0, "first", 1)],
    )
    assert failure_of(out).code == "NONDETERMINISM"


def test_returning_before_the_journal_ends_is_nondeterminism(
    activate: Callable[..., Outcome],
) -> None:
    out = activate(
        """
        @workflow("w")
        def w(event, step):
            return step.do("a", lambda: 1)
    """,
        [ok(0, "a", 1), ok(1, "b", 2)],
    )
    assert failure_of(out).code == "NONDETERMINISM"


# ---------------------------------------------------------------- sleeps and events


def test_sleep_sends_until_now_plus_seconds(activate: Callable[..., Outcome]) -> None:
    out = activate("""
        @workflow("w")
        def w(event, step):
            step.sleep("grace", 3600)
            step.do("after", lambda: effect("after"))
    """)
    assert out.sent == [SleepCmd(seq=0, name="grace", until=NOW + 3600)]
    assert out.effects == []


def test_sleep_accepts_duration_strings(activate: Callable[..., Outcome]) -> None:
    out = activate("""
        @workflow("w")
        def w(event, step):
            step.sleep("grace", "2 hours")
    """)
    assert out.sent == [SleepCmd(seq=0, name="grace", until=NOW + 7200)]


def test_elapsed_sleep_is_passed_through(activate: Callable[..., Outcome]) -> None:
    journal = [JournalEntry(seq=0, kind="sleep", name="grace", status="ok", until=NOW - 5)]
    out = activate(
        """
        @workflow("w")
        def w(event, step):
            step.sleep("grace", 3600)
            return step.do("after", lambda: effect("after"))
    """,
        journal,
    )
    assert out.effects == ["after"]
    assert isinstance(out.sent[0], StepStarted) and out.sent[0].seq == 1


def test_unelapsed_sleep_is_resent_with_its_original_deadline(
    activate: Callable[..., Outcome],
) -> None:
    journal = [JournalEntry(seq=0, kind="sleep", name="grace", status="sleeping", until=NOW + 100)]
    out = activate(
        """
        @workflow("w")
        def w(event, step):
            step.sleep("grace", 3600)
    """,
        journal,
    )
    assert out.sent == [SleepCmd(seq=0, name="grace", until=NOW + 100)]


def test_sleep_until(activate: Callable[..., Outcome]) -> None:
    out = activate("""
        import datetime

        @workflow("w")
        def w(event, step):
            step.sleep_until("new year", datetime.datetime(2030, 1, 1))
    """)
    expected = dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()
    assert out.sent == [SleepCmd(seq=0, name="new year", until=expected)]


def test_wait_for_event_sends_the_wait(activate: Callable[..., Outcome]) -> None:
    out = activate("""
        @workflow("w")
        def w(event, step):
            step.wait_for_event("confirm", type="email-confirmed", timeout="1 day")
    """)
    assert out.sent == [
        WaitEventCmd(seq=0, name="confirm", type="email-confirmed", timeout_s=86400.0)
    ]


def test_wait_for_event_returns_the_journaled_event(activate: Callable[..., Outcome]) -> None:
    event = {"type": "email-confirmed", "payload": {"ok": True}, "timestamp": "2024-01-01"}
    journal = [
        JournalEntry(
            seq=0,
            kind="wait_event",
            name="confirm",
            status="ok",
            result=json.dumps(event).encode(),
            until=NOW + 10,
        )
    ]
    out = activate(
        """
        @workflow("w")
        def w(event, step):
            return step.wait_for_event("confirm", type="email-confirmed")
    """,
        journal,
    )
    assert output_of(out) == event


def test_wait_timeout_entry_raises_wait_timeout(activate: Callable[..., Outcome]) -> None:
    journal = [
        JournalEntry(
            seq=0,
            kind="wait_event",
            name="confirm",
            status="timeout",
            until=NOW - 1,
            error=ErrorInfo(type="WaitTimeout", message="no event"),
        )
    ]
    caught = activate(
        """
        @workflow("w")
        def w(event, step):
            try:
                step.wait_for_event("confirm", type="email-confirmed", timeout=60)
            except WaitTimeout as exc:
                return {"timed_out": exc.step, "type": exc.event_type}
    """,
        journal,
    )
    assert output_of(caught) == {"timed_out": "confirm", "type": "email-confirmed"}
    uncaught = activate(
        """
        @workflow("w")
        def w(event, step):
            step.wait_for_event("confirm", type="email-confirmed", timeout=60)
    """,
        journal,
    )
    assert failure_of(uncaught).type == "WaitTimeout"


# ---------------------------------------------------------------- deploy inspection


def test_inspect_lists_workflow_names(activate: Callable[..., Outcome]) -> None:
    out = activate(
        """
        @workflow("zeta")
        def z(event, step):
            pass

        @workflow("alpha")
        def a(event, step):
            pass

        def not_a_workflow(event, step):
            pass
    """,
        mode="inspect",
    )
    assert out.sent == [Inspected(workflows=["alpha", "zeta"])]


def test_inspect_reports_a_syntax_error_as_deploy_failed(activate: Callable[..., Outcome]) -> None:
    out = activate(
        """
        @workflow("w")
        def w(event, step)
            return 1
    """,
        mode="inspect",
    )
    err = failure_of(out)
    assert (err.type, err.code) == ("SyntaxError", "DEPLOY_FAILED")
    assert "def w(event, step)" in err.traceback


@pytest.mark.parametrize(
    "source,kind",
    [
        ("import no_such_module_xyz\n", "ModuleNotFoundError"),
        ("x = 1\n", "NoWorkflows"),
        ("raise RuntimeError('at import')\n", "RuntimeError"),
    ],
)
def test_inspect_reports_load_failures_as_deploy_failed(
    activate: Callable[..., Outcome], source: str, kind: str
) -> None:
    err = failure_of(activate(source, mode="inspect"))
    assert (err.type, err.code) == (kind, "DEPLOY_FAILED")


# ---------------------------------------------------------------- output during replay


@contextmanager
def fd_streams() -> Iterator[None]:
    """Point sys.stdout/sys.stderr at fds 1/2, as in a real activation.

    capfd points sys.stdout at its capture file directly, bypassing fd 1, and installs that only
    once the test body starts, so this is entered inside the test.
    """
    saved = sys.stdout, sys.stderr
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


PRINTS = """
import sys

@workflow("w")
def w(event, step):
    print("before a")
    print("err before a", file=sys.stderr)
    step.do("a", lambda: 1)
    print("after a")
    print("err after a", file=sys.stderr)
    step.do("b", lambda: 2)
    print("after b")
"""


def test_output_is_shown_on_the_first_run(
    activate: Callable[..., Outcome], capfd: pytest.CaptureFixture[str]
) -> None:
    with fd_streams():
        activate(PRINTS)
    out, err = capfd.readouterr()
    assert "before a" in out and "err before a" in err
    assert "after a" not in out  # the activation ended with step "a"


def test_output_of_replayed_code_is_suppressed(
    activate: Callable[..., Outcome], capfd: pytest.CaptureFixture[str]
) -> None:
    with fd_streams():
        activate(PRINTS, [ok(0, "a", 1)])
        out, err = capfd.readouterr()
        assert "before a" not in out and "err before a" not in err  # printed by the first run
        assert "after a" in out and "err after a" in err  # new in this activation
        assert "after b" not in out
        # the runtime gave fds 1 and 2 back
        print("still visible")
        print("still visible on stderr", file=sys.stderr)
    out, err = capfd.readouterr()
    assert "still visible" in out and "still visible on stderr" in err


def test_output_is_restored_when_replay_fails(
    activate: Callable[..., Outcome], capfd: pytest.CaptureFixture[str]
) -> None:
    with fd_streams():
        out = activate(
            """
            @workflow("w")
            def w(event, step):
                print("replaying")
                raise ValueError("mid-replay")
        """,
            [ok(0, "a", 1)],
        )
        print("after the failure")
    assert failure_of(out).type == "ValueError"
    captured = capfd.readouterr().out
    assert "replaying" not in captured
    assert "after the failure" in captured


# ---------------------------------------------------------------- bugs


def test_nothing_runs_after_the_one_new_command(activate: Callable[..., Outcome]) -> None:
    out = activate("""
        @workflow("w")
        def w(event, step):
            try:
                step.do("a", lambda: effect("a"))
            finally:
                step.do("cleanup", lambda: effect("cleanup"))
    """)
    assert out.effects == ["a"]
    assert [type(m).__name__ for m in out.sent] == ["StepStarted", "StepResult"]


def test_failure_with_a_long_exception_name_reaches_the_supervisor(
    activate: Callable[..., Outcome],
) -> None:
    name = "E" + "x" * 300
    out = activate(f"""
        class {name}(Exception):
            pass

        @workflow("w")
        def w(event, step):
            raise {name}("boom")
    """)
    assert failure_of(out).message == "boom"
