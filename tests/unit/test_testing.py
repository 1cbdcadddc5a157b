"""stepvisor.testing: the in-process harness tenants test their workflows with."""

from __future__ import annotations

import datetime as dt

import pytest

from stepvisor import NonRetryableError, workflow
from stepvisor.testing import START, Crash, WorkflowEnv, WorkflowFailed
from supervisor.config import Limits

HEADER = "from stepvisor import workflow, NonRetryableError, StepFailed, WaitTimeout\n"


def env_of(body: str, **options: object) -> WorkflowEnv:
    return WorkflowEnv.from_source(HEADER + body, **options)  # type: ignore[arg-type]


def test_sleeps_pass_at_once_and_move_the_simulated_clock() -> None:
    env = env_of("""
@workflow("w")
def w(event, step):
    step.sleep("a year", "52 weeks")
    step.sleep_until("new year", 2_000_000_000)
    return step.do("done", lambda: "ok")
""")
    run = env.start("w")
    assert run.result() == "ok"
    assert env.clock == 2_000_000_000
    sleep = run.entry("a year")
    assert (sleep.kind, sleep.status) == ("sleep", "ok")
    assert sleep.until == START + dt.timedelta(weeks=52)


def test_retries_back_off_on_the_simulated_clock_and_keep_each_failed_attempt() -> None:
    env = env_of("""
@workflow("w")
def w(event, step):
    return step.do("flaky", lambda: "fine",
                   retries={"limit": 3, "delay": 10, "backoff": "exponential"})
""")
    run = env.start("w")
    run.fail_step("flaky", attempts=[1, 2, 3], error=ConnectionError("down"))
    assert run.result() == "fine"
    entry = run.entry("flaky")
    assert (entry.status, entry.attempts) == ("ok", 4)
    assert [e.type for e in entry.failed_attempts] == ["ConnectionError"] * 3
    assert entry.failed_attempts[0].message == "down"
    assert env.clock - START.timestamp() == 10 + 20 + 40  # the backoff, skipped
    assert run.activations == 5  # four attempts and the return


def test_exhausted_retries_fail_the_instance_with_the_step_error() -> None:
    env = env_of("""
@workflow("w")
def w(event, step):
    step.do("charge", lambda: 1, retries={"limit": 1, "delay": 1})
""")
    run = env.start("w")
    run.fail_step("charge", attempts=[1, 2], error=ValueError("card declined"))
    with pytest.raises(WorkflowFailed) as failed:
        run.result()
    assert failed.value.status == "errored"
    assert failed.value.error is not None and failed.value.error.type == "StepFailed"
    assert "card declined" in failed.value.error.message
    assert run.entry("charge").status == "error"


def test_a_caught_step_failure_lets_the_workflow_compensate() -> None:
    env = env_of("""
@workflow("w")
def w(event, step):
    try:
        step.do("charge", lambda: 1, retries={"limit": 0})
    except StepFailed as exc:
        return step.do("refund", lambda: "refunded " + exc.step)
""")
    run = env.start("w")
    run.fail_step("charge", error=NonRetryableError("no"))
    assert run.result() == "refunded charge"


def test_an_event_sent_while_waiting_is_delivered() -> None:
    env = env_of("""
@workflow("w")
def w(event, step):
    got = step.wait_for_event("confirm", type="confirmed", timeout="1 day")
    return got["payload"]
""")
    run = env.start("w")
    assert run.run_until_waiting() == "confirm"
    assert run.status == "waiting"
    run.send_event("confirmed", {"by": "ann"})
    assert run.result() == {"by": "ann"}
    assert run.entry("confirm").result["type"] == "confirmed"


def test_an_event_scheduled_later_arrives_at_its_simulated_time() -> None:
    env = env_of("""
@workflow("w")
def w(event, step):
    got = step.wait_for_event("confirm", type="confirmed", timeout="1 hour")
    return got["timestamp"]
""")
    run = env.start("w")
    run.send_event("confirmed", after=600)
    assert run.result() == (START + dt.timedelta(minutes=10)).isoformat(timespec="milliseconds")


def test_a_wait_with_no_event_times_out_at_its_deadline() -> None:
    env = env_of("""
@workflow("w")
def w(event, step):
    try:
        step.wait_for_event("confirm", type="confirmed", timeout="2 hours")
    except WaitTimeout:
        return "timed out"
""")
    run = env.start("w")
    run.send_event("confirmed", after=3 * 3600)  # too late
    assert run.result() == "timed out"
    assert env.clock == START.timestamp() + 2 * 3600
    assert run.entry("confirm").status == "timeout"


def test_an_injected_crash_is_recorded_as_the_server_records_it_and_retried() -> None:
    env = env_of("""
@workflow("w")
def w(event, step):
    return step.do("big", lambda: "done", retries={"limit": 2, "delay": 1})
""")
    run = env.start("w")
    run.fail_step("big", attempts=[1], error=Crash("oom"))
    run.fail_step("big", attempts=[2], error=Crash("wall_timeout"))
    assert run.result() == "done"
    types = [e.type for e in run.entry("big").failed_attempts]
    assert types == ["OutOfMemory", "StepTimeout"]


def test_a_replaced_step_runs_instead_and_gets_the_context() -> None:
    env = env_of("""
@workflow("w")
def w(event, step):
    return step.do("call api", lambda: 1 / 0)
""")
    run = env.start("w")
    run.replace_step("call api", lambda ctx: f"stand-in {ctx.step} #{ctx.attempt}")
    assert run.result() == "stand-in call api #1"


def test_journaled_steps_never_rerun_and_print_once(capsys: pytest.CaptureFixture[str]) -> None:
    env = env_of("""
@workflow("w")
def w(event, step):
    print("replayed code")
    a = step.do("a", lambda: print("running a") or 1)
    step.sleep("nap", 5)
    b = step.do("b", lambda: print("running b") or a + 1)
    return a + b
""")
    assert env.run("w") == 3
    out = capsys.readouterr().out.splitlines()
    assert out.count("running a") == 1
    assert out.count("running b") == 1
    assert out.count("replayed code") == 1  # muted while replaying, as in an activation


def test_params_instance_id_and_timestamp_reach_the_workflow() -> None:
    env = env_of("""
@workflow("w")
def w(event, step):
    return [event.payload, event.instance_id, event.timestamp.isoformat()]
""")
    run = env.start("w", {"n": 1}, id="order-7")
    assert run.result() == [{"n": 1}, "order-7", START.isoformat()]


def test_tenant_limits_apply_as_on_a_server() -> None:
    env = env_of(
        """
@workflow("w")
def w(event, step):
    for i in range(10):
        step.do(f"s{i}", lambda: i)
""",
        limits=Limits(max_steps=3),
    )
    with pytest.raises(WorkflowFailed) as failed:
        env.run("w")
    assert failed.value.error is not None and failed.value.error.type == "StepLimitExceeded"


def test_an_uncaught_error_carries_the_tenant_traceback_with_source_lines() -> None:
    env = env_of("""
@workflow("w")
def w(event, step):
    x = step.do("a", lambda: 1)
    raise KeyError("missing-thing")
""")
    run = env.start("w")
    with pytest.raises(WorkflowFailed):
        run.result()
    assert run.error is not None
    assert run.error.type == "KeyError"
    assert 'raise KeyError("missing-thing")' in run.error.traceback


def test_code_that_fails_to_load_is_refused_like_a_deploy() -> None:
    with pytest.raises(ImportError, match="ZeroDivisionError"):
        env_of("1 / 0\n")
    with pytest.raises(ImportError, match="no function decorated with @workflow"):
        env_of("x = 1\n")


@workflow("by-value")
def by_value(event, step):  # type: ignore[no-untyped-def]
    return step.do("double", lambda: event.payload * 2)


def test_a_function_deployed_by_value() -> None:
    env = WorkflowEnv.from_function(by_value)
    assert env.workflows == ["by-value"]
    assert env.run("by-value", 21) == 42


def test_unknown_workflows_and_taken_ids_are_clear_errors() -> None:
    env = env_of('@workflow("w")\ndef w(event, step):\n    return 1\n')
    with pytest.raises(LookupError, match="no workflow 'nope'"):
        env.start("nope")
    env.start("w", id="x")
    with pytest.raises(ValueError, match="exists"):
        env.start("w", id="x")


FAMILY = """
def double(n):
    if not isinstance(n, int):
        raise NonRetryableError("no strings")
    return n * 2

@workflow("child")
def child(event, step):
    step.sleep("think", 30)
    return step.do("double", lambda: double(event.payload))

@workflow("parent")
def parent(event, step):
    a = step.invoke("first", "child", 2)
    try:
        step.invoke("second", "child", "x", id="named-child")
    except StepFailed as exc:
        b = [exc.error_type, exc.error_message]
    return [a, b]
"""


def test_a_child_workflow_runs_and_its_output_or_error_reaches_the_parent() -> None:
    env = env_of(FAMILY)
    env.fail_step("double", attempts=[1], error=ConnectionError("flaky"))  # in every child
    run = env.start("parent", id="p")
    four, (error_type, message) = run.result()
    assert (four, error_type) == (4, "StepFailed")  # the child's own uncaught error
    assert "'named-child' (child) ended errored" in message
    assert "NonRetryableError: no strings" in message
    first, second = run.journal
    assert (first.kind, first.status, first.child) == ("invoke", "ok", "p-0")
    assert (second.status, second.child) == ("error", "named-child")
    assert second.error is not None and "ended errored" in second.error.message
    assert env.instance("p-0").status == "complete"
    assert env.instance("named-child").status == "errored"
    assert env.instance("p-0").entry("double").attempts == 2
    # each child's sleep and retry delay, one after the other, on the simulated clock
    assert env.clock - START.timestamp() == 2 * (30 + 10)


def test_a_log_handler_made_at_import_logs_each_step_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = env_of("""
import logging, sys
log = logging.getLogger("tenant-under-test")
log.addHandler(logging.StreamHandler(sys.stderr))
log.setLevel(logging.INFO)
log.propagate = False

@workflow("w")
def w(event, step):
    for i in range(3):
        step.do(f"s{i}", lambda i=i: log.info("logged by step %d", i) or i)
""")
    env.run("w")
    err = capsys.readouterr().err.splitlines()
    assert sorted(line for line in err if line.startswith("logged")) == [
        "logged by step 0",
        "logged by step 1",
        "logged by step 2",
    ]
