"""Child workflows: `step.invoke` starts an instance of the same tenant and waits for it."""

from __future__ import annotations

from typing import Any

from stepvisor.client import StepVisorError
from tests.conftest import Daemon, deploy_source, wait_for

FAMILY = """
import time
from stepvisor import workflow, NonRetryableError, StepFailed

@workflow("child")
def child(event, step):
    if event.payload == "fail":
        step.do("refuse", lambda: (_ for _ in ()).throw(NonRetryableError("refused")))
    if event.payload == "slow":
        step.do("long", lambda: time.sleep(60), timeout=120)
    return step.do("double", lambda: event.payload * 2)

@workflow("parent")
def parent(event, step):
    out = []
    for i, params in enumerate(event.payload):
        try:
            out.append(step.invoke(f"call {i}", params.get("workflow", "child"), params["p"]))
        except StepFailed as exc:
            out.append([exc.error_type, exc.error_message])
    return out
"""


def step_running(c: Any, instance: str) -> bool:
    try:
        entries = c.history("acme", instance)["entries"]
    except StepVisorError:  # not created yet
        return False
    return any(e["status"] == "running" for e in entries)


def test_a_parent_gets_its_childrens_outputs_and_errors(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", FAMILY)
    params = [{"p": 21}, {"p": "fail"}, {"p": 1, "workflow": "missing"}]
    c.create("acme", "parent", params, id="p1")
    st = c.wait("acme", "p1", timeout_s=60)
    assert st["status"] == "complete"
    ok, failed, missing = st["output"]
    assert ok == 42
    assert failed[0] == "StepFailed" and "'p1-1' (child) ended errored" in failed[1]
    assert "NonRetryableError: refused" in failed[1]
    assert missing[0] == "ChildNotStarted" and "no workflow 'missing'" in missing[1]

    entries = c.history("acme", "p1")["entries"]
    assert [(e["kind"], e["status"], e["child"]) for e in entries] == [
        ("invoke", "ok", "p1-0"),
        ("invoke", "error", "p1-1"),
        ("invoke", "error", None),
    ]
    child = c.status("acme", "p1-0")
    assert (child["status"], child["parent"], child["output"]) == ("complete", "p1", 42)


def test_terminating_a_parent_terminates_its_children(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", FAMILY)
    c.create("acme", "parent", [{"p": "slow"}], id="p1")
    wait_for(lambda: step_running(c, "p1-0"), 30, "the child's long step to start")
    assert c.status("acme", "p1")["status"] == "waiting"
    c.terminate("acme", "p1")
    assert c.status("acme", "p1-0")["status"] == "terminated"
    wait_for(
        lambda: c.history("acme", "p1-0")["activations"][-1]["outcome"] == "killed_by_operator",
        30,
        "the child's activation to be killed",
    )


def test_restarting_a_parent_from_a_call_terminates_the_child_it_drops(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", FAMILY)
    c.create("acme", "parent", [{"p": 2}, {"p": "slow"}], id="p1")
    wait_for(lambda: c.status("acme", "p1")["steps"] == 2, 30, "the second call")
    c.restart("acme", "p1", from_step="call 1")
    assert c.status("acme", "p1-0")["status"] == "complete"  # before the restart point: kept
    assert c.status("acme", "p1-1")["status"] == "terminated"


WAITING_CHILD = """
from stepvisor import workflow

@workflow("child")
def child(event, step):
    return step.wait_for_event("go", type="go", timeout=60)["payload"]

@workflow("parent")
def parent(event, step):
    return step.invoke("call", "child", None, id=event.payload)
"""


def test_a_parent_paused_and_resumed_while_its_child_runs_waits_on(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", WAITING_CHILD)
    c.create("acme", "parent", "kid", id="p1")
    wait_for(lambda: c.status("acme", "p1")["status"] == "waiting", 30, "the parent to wait")
    c.pause("acme", "p1")
    c.resume("acme", "p1")  # due again: its replay asks for the child again and waits on
    wait_for(
        lambda: (
            c.status("acme", "p1")["status"] == "waiting"
            and c.status("acme", "p1")["activations"] == 2
        ),
        30,
        "the resumed parent to wait again",
    )
    wait_for(lambda: c.status("acme", "kid")["status"] == "waiting", 30, "the child's wait")
    c.send_event("acme", "kid", "go", "done")
    st = c.wait("acme", "p1", timeout_s=30)
    assert (st["status"], st["output"]) == ("complete", "done")
    assert [a["outcome"] for a in c.history("acme", "p1")["activations"]] == ["ok"] * 3


def test_deleting_a_child_fails_the_parent_call_instead_of_hanging(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(
        c,
        "acme",
        WAITING_CHILD.replace(
            'return step.invoke("call", "child", None, id=event.payload)',
            'try:\n        return step.invoke("call", "child", None, id=event.payload)\n'
            "    except StepFailed as exc:\n        return exc.error_type",
        ).replace("import workflow", "import workflow, StepFailed"),
    )
    c.create("acme", "parent", "kid", id="p1")
    wait_for(lambda: c.status("acme", "p1")["status"] == "waiting", 30, "the parent to wait")
    c.delete("acme", "kid")
    assert c.wait("acme", "p1", timeout_s=30)["output"] == "ChildTerminated"
