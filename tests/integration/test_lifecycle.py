"""Instance operations, deployment, and tenants that cannot see each other."""

from __future__ import annotations

import pytest

from stepvisor import workflow
from stepvisor.client import StepVisorError
from tests.conftest import Daemon, deploy_source, wait_for, writable

SLEEPY = """
import time
from stepvisor import workflow

@workflow("w")
def w(event, step):
    for i in range(event.payload.get("rounds", 3)):
        step.do(f"work {i}", lambda: time.sleep(event.payload.get("step_s", 0)) or i)
        step.sleep(f"rest {i}", event.payload.get("rest_s", 0.5))
    return "finished"
"""

LONG_STEP = """
import time
from stepvisor import workflow

@workflow("w")
def w(event, step):
    step.do("long", lambda: time.sleep(60), timeout=120)
    return "finished"
"""


def code(exc: pytest.ExceptionInfo[StepVisorError]) -> str:
    return exc.value.code


def test_pause_while_sleeping_then_resume(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", SLEEPY)
    c.create("acme", "w", {"rest_s": 1.0}, id="i1")
    wait_for(lambda: c.status("acme", "i1")["status"] == "waiting", 30, "first sleep")
    paused = c.pause("acme", "i1")
    assert (paused["status"], paused["wake_at"]) == ("paused", None)  # nothing will wake it
    assert c.pause("acme", "i1")["status"] == "paused"  # pausing twice is harmless
    before = paused["activations"]
    assert c.resume("acme", "i1")["status"] == "running"
    with pytest.raises(StepVisorError) as exc:
        c.resume("acme", "i1")
    assert code(exc) == "INVALID_STATE"
    st = c.wait("acme", "i1", timeout_s=30)
    assert st["output"] == "finished"
    assert st["activations"] > before


def test_pause_during_a_step_takes_effect_after_it(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", SLEEPY)
    c.create("acme", "w", {"step_s": 1.0, "rest_s": 0}, id="i1")
    wait_for(lambda: c.history("acme", "i1")["entries"], 30, "first step to start")
    c.pause("acme", "i1")
    st = wait_for(
        lambda: (s := c.status("acme", "i1"))["status"] == "paused" and s,
        30,
        "pause to take effect",
    )
    entries = c.history("acme", "i1")["entries"]
    assert entries[0]["status"] == "ok"  # the running step finished and was kept
    assert c.status("acme", "i1")["activations"] == st["activations"]
    c.resume("acme", "i1")
    assert c.wait("acme", "i1", timeout_s=30)["output"] == "finished"


def test_terminate_kills_a_running_activation(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", LONG_STEP)
    c.create("acme", "w", id="i1")
    wait_for(lambda: c.history("acme", "i1")["entries"], 30, "the long step to start")
    assert c.terminate("acme", "i1")["status"] == "terminated"
    wait_for(
        lambda: c.history("acme", "i1")["activations"][-1]["outcome"] == "killed_by_operator",
        30,
        "the activation to be recorded as killed",
    )
    with pytest.raises(StepVisorError) as exc:
        c.terminate("acme", "i1")
    assert code(exc) == "INVALID_STATE"
    with pytest.raises(StepVisorError) as exc:
        c.send_event("acme", "i1", "x")
    assert code(exc) == "INVALID_STATE"


def test_restart_runs_again_from_scratch(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", SLEEPY)
    c.create("acme", "w", {"rounds": 1, "rest_s": 0}, id="i1")
    first = c.wait("acme", "i1", timeout_s=30)
    assert first["output"] == "finished"
    assert c.restart("acme", "i1")["status"] == "queued"
    second = c.wait("acme", "i1", timeout_s=30)
    assert second["output"] == "finished"
    assert second["activations"] == 2 * first["activations"]
    assert len(c.history("acme", "i1")["entries"]) == 2


def test_delete_removes_the_instance(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", LONG_STEP)
    c.create("acme", "w", id="i1")
    wait_for(lambda: c.history("acme", "i1")["entries"], 30, "the step to start")
    assert c.delete("acme", "i1")["deleted"] is True
    with pytest.raises(StepVisorError) as exc:
        c.status("acme", "i1")
    assert code(exc) == "NOT_FOUND"
    assert c.list("acme") == []


def test_deleting_a_running_instance_leaves_the_next_one_alone(make_daemon) -> None:
    # The deleted instance's activation is still exiting when the next one launches: it must
    # not get the same activation id (its scratch dir and cgroups are not gone yet).
    daemon = make_daemon("[tenants.acme]\nmax_concurrent = 1\n")
    c = daemon.client()
    deploy_source(c, "acme", LONG_STEP)
    deploy_source(c, "acme", SLEEPY.replace('"w"', '"quick"'))
    c.create("acme", "w", id="doomed")
    wait_for(lambda: c.history("acme", "doomed")["entries"], 30, "the long step to start")
    c.create("acme", "quick", {"rounds": 1, "rest_s": 0}, id="next")
    assert c.delete("acme", "doomed")["deleted"] is True
    assert c.wait("acme", "next", timeout_s=60)["output"] == "finished"
    assert daemon.alive()
    ids = [a["id"] for a in c.history("acme", "next")["activations"]]
    assert len(ids) == len(set(ids)) and all(
        e["activation"] in ids for e in daemon.events("activation.finished", instance="next")
    )


def test_list_filters_by_status(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", SLEEPY)
    c.create("acme", "w", {"rounds": 1, "rest_s": 0}, id="done")
    c.wait("acme", "done", timeout_s=30)
    c.create("acme", "w", {"rest_s": 30}, id="sleeper")
    wait_for(lambda: c.status("acme", "sleeper")["status"] == "waiting", 30, "sleeper")
    assert [r["id"] for r in c.list("acme", "complete")] == ["done"]
    assert [r["id"] for r in c.list("acme", "waiting")] == ["sleeper"]
    assert {r["id"] for r in c.list("acme")} == {"done", "sleeper"}


def test_tenants_cannot_see_or_touch_each_other(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", SLEEPY)
    deploy_source(c, "globex", SLEEPY)
    c.create("acme", "w", {"rest_s": 30}, id="secret")
    c.create("globex", "w", {"rounds": 1, "rest_s": 0}, id="secret")  # same id, other tenant
    assert c.wait("globex", "secret", timeout_s=30)["output"] == "finished"
    assert [r["tenant"] for r in c.list("globex")] == ["globex"]
    assert c.status("acme", "secret")["status"] in ("running", "waiting", "queued")
    c.create("globex", "w", id="g2")
    for call in (
        lambda: c.status("globex", "a-only"),
        lambda: c.pause("globex", "a-only"),
        lambda: c.send_event("globex", "a-only", "x"),
        lambda: c.history("globex", "a-only"),
    ):
        with pytest.raises(StepVisorError) as exc:
            call()
        assert code(exc) == "NOT_FOUND"
    c.create("acme", "w", id="a-only")
    with pytest.raises(StepVisorError) as exc:
        c.delete("globex", "a-only")
    assert code(exc) == "NOT_FOUND"
    assert c.status("acme", "a-only")["tenant"] == "acme"
    with pytest.raises(StepVisorError) as exc:
        c.list("initech")
    assert code(exc) == "UNKNOWN_TENANT"


def test_create_is_idempotent_per_id(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", SLEEPY)
    assert c.create("acme", "w", {"rounds": 1}, id="x")["created"] is True
    assert c.create("acme", "w", {"rounds": 1}, id="x")["created"] is False
    with pytest.raises(StepVisorError) as exc:
        c.create("acme", "w", {"rounds": 2}, id="x")
    assert code(exc) == "ALREADY_EXISTS"
    generated = c.create("acme", "w", {"rounds": 1})["id"]
    assert generated and generated != "x"
    batch = c.create_batch("acme", "w", [("b1", {"rounds": 1}), ("x", {"rounds": 1})])
    assert [(r["id"], r["created"]) for r in batch] == [("b1", True), ("x", False)]
    with pytest.raises(StepVisorError) as exc:  # one bad item: the whole batch is refused
        c.create_batch("acme", "w", [("b2", {"rounds": 1}), ("x", {"rounds": 9})])
    assert code(exc) == "ALREADY_EXISTS"
    with pytest.raises(StepVisorError):
        c.status("acme", "b2")


def test_deploy_failures_are_reported_with_the_tenant_error(daemon: Daemon) -> None:
    c = daemon.client()
    with pytest.raises(StepVisorError) as exc:
        deploy_source(c, "acme", "def broken(:\n    pass\n", filename="broken.py")
    assert code(exc) == "DEPLOY_FAILED"
    assert "SyntaxError" in exc.value.message and "broken.py" in exc.value.message
    with pytest.raises(StepVisorError) as exc:
        deploy_source(c, "acme", "import no_such_module_anywhere\n", filename="imp.py")
    assert code(exc) == "DEPLOY_FAILED" and "no_such_module_anywhere" in exc.value.message
    with pytest.raises(StepVisorError) as exc:
        deploy_source(c, "acme", "x = 1\n", filename="empty.py")
    assert code(exc) == "DEPLOY_FAILED" and "no function decorated" in exc.value.message
    with pytest.raises(StepVisorError) as exc:  # never deployed successfully: unknown tenant
        c.create("acme", "w")
    assert code(exc) == "UNKNOWN_TENANT"
    deploy_source(c, "acme", SLEEPY)
    with pytest.raises(StepVisorError) as exc:
        c.create("acme", "nope")
    assert code(exc) == "UNKNOWN_WORKFLOW"


@workflow("by-value")
def by_value(event, step):
    doubled = step.do("double", lambda: event.payload * 2)
    return {"doubled": doubled, "helper": _helper(doubled)}


def _helper(n: int) -> str:
    return f"n={n}"


def test_deploy_a_function_by_value(daemon: Daemon) -> None:
    c = daemon.client()
    r = c.deploy("acme", by_value)
    assert r["workflows"] == ["by-value"]
    c.create("acme", "by-value", 21, id="v")
    assert c.wait("acme", "v", timeout_s=30)["output"] == {"doubled": 42, "helper": "n=42"}
    with pytest.raises(TypeError):
        c.deploy("acme", _helper)


EFFECTS = """
from stepvisor import workflow

def effect(name):
    with open(LOG, "a") as f:
        f.write(name + "\\n")
    return name

@workflow("w")
def w(event, step):
    a = step.do("a", lambda: effect("a"))
    go = step.wait_for_event("go", type="go", timeout=60)
    b = step.do("b", lambda: effect("b"))
    c = step.do("c", lambda: effect("c"))
    return [a, go["payload"], b, c]
"""


def test_restart_from_a_step_keeps_the_journal_before_it(make_daemon, shared) -> None:

    daemon = make_daemon(writable(shared))
    log = shared / "effects.log"
    c = daemon.client()
    deploy_source(c, "acme", f"LOG = {str(log)!r}\n" + EFFECTS)
    c.create("acme", "w", id="i1")
    c.send_event("acme", "i1", "go", 1)
    assert c.wait("acme", "i1", timeout_s=30)["output"] == ["a", 1, "b", "c"]

    restarted = c.restart("acme", "i1", from_step="b")
    assert (restarted["status"], restarted["steps"]) == ("running", 2)
    assert c.wait("acme", "i1", timeout_s=30)["output"] == ["a", 1, "b", "c"]
    assert log.read_text().split() == ["a", "b", "c", "b", "c"]  # a and the wait were kept

    # From the wait: the event it consumed goes with it, so it waits for a new one.
    c.restart("acme", "i1", from_step="go")
    wait_for(lambda: c.status("acme", "i1")["status"] == "waiting", 30, "the wait again")
    assert [e["name"] for e in c.history("acme", "i1")["entries"]] == ["a", "go"]
    c.send_event("acme", "i1", "go", 2)
    assert c.wait("acme", "i1", timeout_s=30)["output"] == ["a", 2, "b", "c"]

    with pytest.raises(StepVisorError) as exc:
        c.restart("acme", "i1", from_step="nope")
    assert code(exc) == "NOT_FOUND"
    assert "no step named 'nope'" in str(exc.value)
    with pytest.raises(StepVisorError) as exc:
        c.control("acme", "i1", "pause", from_step="a")
    assert code(exc) == "BAD_REQUEST"
