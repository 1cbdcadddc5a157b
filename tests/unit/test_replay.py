"""sandbox_host.runtime in-process: replay answers from the journal; one new command is sent."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable

import pytest

from protocol.messages import ErrorInfo, JournalEntry, StepResult, StepStarted
from tests.unit.runtime_harness import CREATED, NOW, THREE_STEPS, Outcome, failure_of, ok, output_of

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
