"""Prepared activations: a tenant with steady work gets a process launched ahead, which its next
due step is given instead of a new one. Still one fresh process per step, of its tenant only."""

from __future__ import annotations

import datetime as dt
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Daemon, deploy_source, reaped_activations, wait_for

SRC = """
import os, resource
from stepvisor import workflow

@workflow("w")
def w(event, step):
    seen = []
    for i in range(event.payload["steps"]):
        seen.append(step.do(f"s{i}", lambda: {
            "pid": os.getpid(),
            "uid": os.getuid(),
            "gid": os.getgid(),
            "cpu_s": resource.getrlimit(resource.RLIMIT_CPU)[0],
        }))
    return seen
"""


def run(daemon: Daemon, tenant: str, iid: str, steps: int) -> list[dict[str, Any]]:
    c = daemon.client()
    c.create(tenant, "w", {"steps": steps}, id=iid)
    done = c.wait(tenant, iid, timeout_s=60)
    assert done["status"] == "complete", done
    out: list[dict[str, Any]] = done["output"]
    return out


def prepared(daemon: Daemon) -> dict[str, int]:
    tally: dict[str, int] = daemon.client().stats()["prepared"]
    return tally


def with_waiting(daemon: Daemon, waiting: int) -> Daemon:
    """Run a 4-step instance of tenant acme, then wait until `waiting` prepared activations of
    it wait (`prepared_idle_s` long enough in `daemon`'s config)."""
    deploy_source(daemon.client(), "acme", SRC)
    run(daemon, "acme", "i1", 4)
    wait_for(lambda: prepared(daemon)["waiting"] == waiting, 30, "prepared activations to wait")
    return daemon


def test_steady_steps_are_given_prepared_activations(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon()
    c = daemon.client()
    deploy_source(c, "acme", SRC)
    seen = run(daemon, "acme", "i1", 8)
    assert len({s["pid"] for s in seen}) == 8  # still a process of its own per step
    acts = reaped_activations(c, "acme", "i1")
    assert len(acts) == 9 and all(a["outcome"] == "ok" for a in acts)
    bound = [a for a in acts if a["bound_at"] is not None]
    assert bound, "no step was given a prepared activation"
    for a in bound:
        assert dt.datetime.fromisoformat(a["launched_at"]) <= dt.datetime.fromisoformat(
            a["bound_at"]
        )
        # What the step waited for is the time after it was given the process, not before.
        assert a["exec_ms"] <= a["total_ms"] - a["cold_start_ms"]
    # The one prepared after the last step finds none: stopped after `prepared_idle_s`.
    tally = wait_for(
        lambda: (p := prepared(daemon))["waiting"] == 0 and p["unused"] >= 1 and p,
        30,
        "the prepared activation no step took to be stopped",
    )
    assert tally["made"] == tally["used"] + tally["unused"]
    assert tally["used"] == len(bound)
    unused = wait_for(
        lambda: daemon.query(
            "SELECT outcome, detail, cpu_ms FROM activations"
            " WHERE tenant = 'acme' AND kind = 'run' AND instance IS NULL"
            " AND finished_at IS NOT NULL"
        ),
        30,
        "the unused prepared activation to be reaped and recorded",
    )
    assert {row[0] for row in unused} == {"unused"}, unused
    assert "no step for it within 1 s" in unused[0][1]
    # The tenant is billed for its steps' activations (and its deploy's inspection) only, not
    # for one that never got a step.
    (usage,) = c.usage("acme")
    assert usage["activations"] == 9 + 1 and usage["steps"] == 8
    out = daemon.cli("stats")
    assert out.returncode == 0, out.stderr
    assert f"{tally['used']} of {tally['made']} given a step" in out.stdout
    out = daemon.cli("history", "acme", "i1")
    assert out.returncode == 0, out.stderr
    assert f"{len(bound)} of them prepared before their step was due" in out.stdout


def test_a_prepared_activation_only_runs_its_own_tenants_steps(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon()
    c = daemon.client()
    for tenant in ("a", "b"):
        deploy_source(c, tenant, SRC)
    ids = [f"i{n}" for n in range(3)]
    for iid in ids:
        for tenant in ("a", "b"):
            c.create(tenant, "w", {"steps": 5}, id=iid)
    seen: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    for tenant in ("a", "b"):
        for iid in ids:
            done = c.wait(tenant, iid, timeout_s=60)
            assert done["status"] == "complete", done
            seen[tenant] += done["output"]
            assert any(a["bound_at"] for a in reaped_activations(c, tenant, iid))
    if os.geteuid() != 0:
        pytest.skip("sandbox uids and groups need root: nothing tells tenants' processes apart")
    # Each tenant's activations share its sandbox group, and a uid once a tenant's is never
    # another's: a prepared activation given another tenant's step would show here.
    assert len({s["gid"] for s in seen["a"]}) == 1 and len({s["gid"] for s in seen["b"]}) == 1
    assert seen["a"][0]["gid"] != seen["b"][0]["gid"]
    assert not {s["uid"] for s in seen["a"]} & {s["uid"] for s in seen["b"]}


def test_a_reload_that_changes_limits_retires_the_prepared_activation(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon("[tenants.acme]\ncpu_seconds = 30\n", server="prepared_idle_s = 20\n")
    c = daemon.client()
    deploy_source(c, "acme", SRC)
    assert {s["cpu_s"] for s in run(daemon, "acme", "i1", 4)} == {30}
    wait_for(lambda: prepared(daemon)["waiting"] == 1, 30, "a prepared activation to wait")
    daemon.write_config("[tenants.acme]\ncpu_seconds = 40\n", server="prepared_idle_s = 20\n")
    c.reload()
    # Prepared under the old limits: never given a step, stopped instead.
    assert [s["cpu_s"] for s in run(daemon, "acme", "i2", 1)] == [40]
    assert prepared(daemon)["unused"] >= 1
    details = daemon.query("SELECT detail FROM activations WHERE outcome = 'unused'")
    assert any("limits changed" in d for (d,) in details), details


def test_draining_stops_prepared_activations_at_once(make_daemon: Callable[..., Daemon]) -> None:
    # A drain timeout well past the stop's own: a drain that waited for the prepared
    # activation would fail the stop.
    daemon = with_waiting(make_daemon(server="prepared_idle_s = 20\ndrain_timeout_s = 120\n"), 1)
    assert daemon.stop(signal.SIGTERM, timeout_s=30) == 0, daemon.stray_output()
    rows = daemon.query(
        "SELECT outcome, detail FROM activations WHERE kind = 'run' AND instance IS NULL"
    )
    assert ("unused", "the supervisor is draining") in rows, rows


def test_prepared_activations_can_be_turned_off(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(server="prepared_per_tenant = 0\n")
    c = daemon.client()
    deploy_source(c, "acme", SRC)
    run(daemon, "acme", "i1", 6)
    assert all(a["bound_at"] is None for a in reaped_activations(c, "acme", "i1"))
    assert prepared(daemon) == {"waiting": 0, "made": 0, "used": 0, "unused": 0}


def test_prepared_per_tenant_is_kept_topped_up(make_daemon: Callable[..., Daemon]) -> None:
    daemon = with_waiting(make_daemon(server="prepared_per_tenant = 2\nprepared_idle_s = 20\n"), 2)
    c = daemon.client()
    # Both are used by the next instance's first two activations, then topped up again.
    run(daemon, "acme", "i2", 2)
    acts = reaped_activations(c, "acme", "i2")
    assert all(a["bound_at"] for a in acts[:2]), acts
    assert prepared(daemon)["waiting"] <= 2
