"""Per-instance limits that keep one tenant's workflow from making every activation of it, and
so the supervisor's loop, ever more expensive: steps per instance and journaled state."""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import Daemon, deploy_source

ENDLESS = """
from stepvisor import workflow

@workflow("endless")
def endless(event, step):
    n = 0
    while True:
        step.do(f"step {n}", lambda: n)
        n += 1
"""

HOARD = """
from stepvisor import StepFailed, workflow

@workflow("hoard")
def hoard(event, step):
    kept = 0
    for n in range(10):
        try:
            step.do(f"keep {n}", lambda: "x" * 400_000)
        except StepFailed as exc:
            return {"kept": kept, "error": str(exc)}
        kept += 1
"""


def test_a_workflow_stops_at_its_tenants_max_steps(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon("[tenants.acme]\nmax_steps = 5\n")
    c = daemon.client()
    deploy_source(c, "acme", ENDLESS)
    c.create("acme", "endless", id="e")
    st = c.wait("acme", "e", timeout_s=60)
    assert st["status"] == "errored"
    assert st["error"]["type"] == "StepLimitExceeded"
    assert "max_steps is 5" in st["error"]["message"]
    assert [e["name"] for e in c.history("acme", "e")["entries"]] == [f"step {n}" for n in range(5)]


def test_a_result_over_the_state_limit_is_a_failed_step(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon("[tenants.acme]\nmax_state_mib = 1\n")
    c = daemon.client()
    deploy_source(c, "acme", HOARD)
    c.create("acme", "hoard", id="h")
    st = c.wait("acme", "h", timeout_s=60)
    assert st["status"] == "complete", st
    assert st["output"]["kept"] == 2  # 800 kB kept; the third result would pass 1 MiB
    assert "max_state_mib is 1" in st["output"]["error"]
    entries = c.history("acme", "h")["entries"]
    assert entries[2]["status"] == "error" and entries[2]["attempts"] == 1  # not retried


def test_a_listing_leaves_out_large_outputs(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon()
    c = daemon.client()
    deploy_source(
        c,
        "acme",
        """
        from stepvisor import workflow

        @workflow("sized")
        def sized(event, step):
            return "x" * event.payload
        """,
    )
    for iid, size in (("small", 10), ("large", 200_000)):
        c.create("acme", "sized", size, id=iid)
        c.wait("acme", iid, timeout_s=60)
    listed = {r["id"]: r for r in c.list("acme")}
    assert listed["small"]["output"] == "x" * 10 and "output_omitted_bytes" not in listed["small"]
    assert listed["large"]["output"] is None
    assert listed["large"]["output_omitted_bytes"] == 200_002  # the JSON string's quotes too
    assert listed["large"]["status"] == "complete"
    assert c.status("acme", "large")["output"] == "x" * 200_000
