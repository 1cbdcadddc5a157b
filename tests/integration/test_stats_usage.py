"""`stepvisor stats` and `stepvisor usage` against what actually ran: every figure is checked
against the supervisor's own `activation.finished` log lines."""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from stepvisor.client import StepVisorError
from tests.conftest import Daemon, deploy_source, reaped_activations, wait_for

SRC = """
import os
from stepvisor import workflow, NonRetryableError

@workflow("w")
def w(event, step):
    return [step.do(f"s{i}", lambda i=i: i * 2) for i in range(event.payload["steps"])]

@workflow("crash")
def crash(event, step):
    return step.do("die", lambda: os._exit(3), retries={"limit": 0})

@workflow("refuse")
def refuse(event, step):
    def no():
        raise NonRetryableError("no")
    return step.do("no", no)
"""


def nearest_rank(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[max(0, math.ceil(q * len(values)) - 1)], 3)


def finished(daemon: Daemon, tenant: str) -> list[dict[str, Any]]:
    """The tenant's activations' lines, but for prepared ones that never got a step."""
    lines = daemon.events("activation.finished", tenant=tenant)
    return [e for e in lines if e["outcome"] != "unused"]


def run_mix(daemon: Daemon) -> dict[str, int]:
    """Tenant a: 3 instances of 2 steps; tenant b: one crash and one refusal. Returns how many
    activation lines each tenant should end with (a deploy's inspection is one more)."""
    c = daemon.client()
    for tenant in ("a", "b"):
        deploy_source(c, tenant, SRC)
    c.create_batch("a", "w", [(f"i{n}", {"steps": 2}) for n in range(3)])
    c.create("b", "crash", id="crash")
    c.create("b", "refuse", id="refuse")
    expected = {}
    for tenant, ids in (("a", ["i0", "i1", "i2"]), ("b", ["crash", "refuse"])):
        for iid in ids:
            assert c.wait(tenant, iid, timeout_s=60)["status"] in ("complete", "errored")
        expected[tenant] = 1 + sum(len(reaped_activations(c, tenant, iid)) for iid in ids)
    for tenant, n in expected.items():
        wait_for(lambda t=tenant, n=n: len(finished(daemon, t)) == n, 30, f"{tenant}'s lines")
    return expected


def test_stats_agree_with_the_activations_that_ran(make_daemon: Callable[..., Daemon]) -> None:
    # A prepared activation left over waits (it is neither running nor exiting) past the test.
    daemon = make_daemon(server="prepared_idle_s = 20\n")
    expected = run_mix(daemon)
    s = daemon.client().stats()
    assert s["running"] == 0 and s["exiting"] == 0 and not s["draining"]
    assert s["activations"] == sum(expected.values())
    assert s["instances"] == {"complete": 3, "errored": 2}
    for tenant in ("a", "b"):
        lines = finished(daemon, tenant)
        t = s["tenants"][tenant]
        assert t["activations"] == expected[tenant] == len(lines)
        colds = [e["cold_start_ms"] for e in lines if e["cold_start_ms"]]
        execs = [e["exec_ms"] for e in lines if e["exec_ms"] is not None]
        for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
            assert t["cold_start_ms"][name] == nearest_rank(colds, q)
            assert t["exec_ms"][name] == nearest_rank(execs, q)
        fails = Counter(e["outcome"] for e in lines if e["outcome"] != "ok")
        assert t["failures"] == dict(fails) == t["failures_since_start"]
    assert s["tenants"]["a"]["instances"] == {"complete": 3}
    assert set(s["tenants"]["b"]["failures"]) == {"crashed", "error"}
    [fork_server] = s["fork_servers"]
    assert fork_server["state"] == "running" and fork_server["failures"] == 0
    loop = s["loop"]  # every result was acknowledged after a sync of the commit holding it
    assert 0 < loop["syncs"] <= loop["commits"] <= loop["iterations"]

    mine = daemon.client().stats("b")  # one tenant's view holds nothing of the others
    assert set(mine["tenants"]) == {"b"} and "fork_servers" not in mine and "loop" not in mine
    with pytest.raises(StepVisorError) as err:
        daemon.client().stats("nobody")
    assert err.value.code == "UNKNOWN_TENANT"

    out = daemon.cli("stats")
    assert out.returncode == 0, out.stderr
    assert "fork server" in out.stdout and "crashed 1, error " in out.stdout
    assert "loop since start: " in out.stdout


def test_usage_agrees_with_the_activations_and_survives_a_restart(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon()
    run_mix(daemon)
    c = daemon.client()
    rows = {r["tenant"]: r for r in c.usage()}
    assert set(rows) == {"a", "b"}
    for tenant, row in rows.items():
        lines = finished(daemon, tenant)
        assert row["activations"] == len(lines)
        assert row["steps"] == sum(e["step"] is not None for e in lines)
        assert row["failures"] == sum(e["outcome"] != "ok" for e in lines)
        assert row["cpu_ms"] == pytest.approx(sum(e["cpu_ms"] for e in lines), abs=0.01)
        # A prepared activation's wait for its step is not the tenant's.
        wall = sum(e["total_ms"] - ((e["phases"] or {}).get("parked") or 0.0) for e in lines)
        assert row["wall_ms"] == pytest.approx(wall, abs=0.01)
        assert row["memory_peak_kib"] == max(e["max_rss_kib"] for e in lines)
        assert row["memory_sum_kib"] == sum(e["max_rss_kib"] for e in lines)
    assert rows["a"]["steps"] == 6 and rows["b"]["steps"] == 2

    assert daemon.stop() == 0
    c = daemon.start().client()
    assert {r["tenant"]: r for r in c.usage()} == rows  # durable
    assert c.usage("a") == [rows["a"]]
    assert c.usage(since=time.time() + 7200) == []
    hourly = c.usage(hourly=True)
    assert sum(r["activations"] for r in hourly) == sum(r["activations"] for r in rows.values())

    out = daemon.cli("usage", "--since", "1d", "--csv")
    assert out.returncode == 0, out.stderr
    parsed = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [(r["tenant"], int(r["activations"])) for r in parsed] == [
        ("a", rows["a"]["activations"]),
        ("b", rows["b"]["activations"]),
    ]
    bad = daemon.cli("usage", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "neither a duration" in bad.stderr


def test_stats_watch_refreshes_until_stopped(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon()
    cli = [sys.executable, "-m", "stepvisor.cli", "--socket", daemon.endpoint, "--json"]
    proc = subprocess.Popen(
        [*cli, "stats", "--watch", "0.1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first, second = json.loads(proc.stdout.readline()), json.loads(proc.stdout.readline())
        assert second["uptime_s"] >= first["uptime_s"] and "fork_servers" in second
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130  # Ctrl-C ends it quietly
