from tests.conftest import Daemon, deploy_source

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
    logged = {e["pid"] for e in daemon.events("activation.finished", instance="i1")}
    assert logged == pids
