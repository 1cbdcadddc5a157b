"""Concurrency limits per tenant and overall, and fairness between tenants."""

from __future__ import annotations

import datetime as dt

from tests.conftest import Daemon, deploy_source, reaped_activations

SRC = """
import time
from stepvisor import workflow

@workflow("w")
def w(event, step):
    for i in range(event.payload["steps"]):
        step.do(f"s{i}", lambda: time.sleep(event.payload["step_s"]))
    return "ok"
"""


def intervals(
    daemon: Daemon, tenant: str, ids: list[str], *, until: str = "result"
) -> list[tuple[float, float]]:
    """Each activation's span from its step's start to its result (`until="result"`: what
    concurrency limits count; a prepared activation's step starts when it is given to it) or
    from launch to reaping (`"reaped"`: the process's whole life)."""
    c = daemon.client()
    out = []
    for iid in ids:
        for a in reaped_activations(c, tenant, iid):
            launched = dt.datetime.fromisoformat(a["launched_at"]).timestamp()
            start, ms = launched, a["total_ms"]
            if until == "result":
                assert a["phases"], a
                ms -= a["phases"]["commit"] + a["phases"]["reap"]
                if a["bound_at"]:
                    start = dt.datetime.fromisoformat(a["bound_at"]).timestamp()
            out.append((start, launched + ms / 1000))
    return out


def max_overlap(spans: list[tuple[float, float]], slack_s: float = 0.005) -> int:
    points = sorted(
        [(s + slack_s, 1) for s, _ in spans] + [(e - slack_s, -1) for _, e in spans],
        key=lambda p: (p[0], p[1]),
    )
    best = cur = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


def test_tenant_concurrency_limit_holds(make_daemon) -> None:
    daemon = make_daemon("[tenants.acme]\nmax_concurrent = 1\n")
    c = daemon.client()
    deploy_source(c, "acme", SRC)
    ids = [f"i{n}" for n in range(3)]
    c.create_batch("acme", "w", [(i, {"steps": 2, "step_s": 0.2}) for i in ids])
    for i in ids:
        assert c.wait("acme", i, timeout_s=60)["status"] == "complete"
    assert max_overlap(intervals(daemon, "acme", ids)) == 1
    # An activation that has reported only exits: the next may start meanwhile, never more,
    # besides the one prepared for the tenant's next step (`prepared_per_tenant`).
    assert max_overlap(intervals(daemon, "acme", ids, until="reaped")) <= 2 + 1


def test_global_cap_holds_across_tenants(make_daemon) -> None:
    daemon = make_daemon(server="max_activations = 2\n")
    c = daemon.client()
    spans, lives = [], []
    for tenant in ("a", "b", "c"):
        deploy_source(c, tenant, SRC)
        c.create_batch(tenant, "w", [(f"i{n}", {"steps": 1, "step_s": 0.2}) for n in range(3)])
    for tenant in ("a", "b", "c"):
        for n in range(3):
            assert c.wait(tenant, f"i{n}", timeout_s=60)["status"] == "complete"
        spans += intervals(daemon, tenant, [f"i{n}" for n in range(3)])
        lives += intervals(daemon, tenant, [f"i{n}" for n in range(3)], until="reaped")
    assert max_overlap(spans) <= 2
    # Exiting activations: at most max_activations more; and as many prepared ahead.
    assert max_overlap(lives) <= 2 + 2 + 2
    assert max_overlap(spans) == 2  # and the cap is actually used


def test_a_busy_tenant_does_not_starve_another(make_daemon) -> None:
    daemon = make_daemon(server="max_activations = 1\n")
    c = daemon.client()
    deploy_source(c, "busy", SRC)
    deploy_source(c, "quiet", SRC)
    busy = [f"b{n}" for n in range(8)]
    c.create_batch("busy", "w", [(i, {"steps": 2, "step_s": 0}) for i in busy])
    c.create("quiet", "w", {"steps": 2, "step_s": 0}, id="q")
    quiet_done = c.wait("quiet", "q", timeout_s=120)["updated_at"]
    last_busy = max(c.wait("busy", i, timeout_s=120)["updated_at"] for i in busy)
    assert quiet_done < last_busy  # round robin: it did not wait behind the whole backlog
