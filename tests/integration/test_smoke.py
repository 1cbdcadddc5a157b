from tests.conftest import Daemon, deploy_source, wait_for

SRC = """
from stepvisor import workflow

@workflow("three")
def three(event, step):
    a = step.do("a", lambda: 1)
    b = step.do("b", lambda: a + 1)
    c = step.do("c", lambda: b + 1)
    return {"sum": a + b + c}
"""


def test_plain_workflow_runs_one_process_per_step(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", SRC)
    c.create("acme", "three", id="i1")
    st = c.wait("acme", "i1", timeout_s=60)
    assert st["status"] == "complete"
    assert st["output"] == {"sum": 6}
    assert st["steps"] == 3
    assert st["activations"] == 4  # N steps + 1 to return
    pids = {a["pid"] for a in c.history("acme", "i1")["activations"]}
    assert len(pids) == 4  # a fresh process each time
    # The last activation's line is logged when it is reaped, a moment after the result.
    logged = wait_for(
        lambda: {e["pid"] for e in daemon.events("activation.finished", instance="i1")} == pids,
        10,
        "every activation to be reaped and logged",
    )
    assert logged
