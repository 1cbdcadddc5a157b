"""Retention: finished instances go, with every row of theirs, once their tenant's retention has
passed; nothing unfinished, nothing of tenants that keep theirs, and no usage goes with them."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from stepvisor.client import Client, StepVisorError
from tests.conftest import Daemon, deploy_source, reaped_activations, wait_for

SRC = """
from stepvisor import workflow

@workflow("w")
def w(event, step):
    step.do("one", lambda: 1)
    if event.payload == "wait":
        step.wait_for_event("go", type="go", timeout=3600)
    return "done"
"""

SHORT = 2.0 / 86_400  # two seconds, in days


def rows(daemon: Daemon, table: str, tenant: str, instance: str) -> int:
    column = "id" if table == "instances" else "instance"
    sql = f"SELECT COUNT(*) FROM {table} WHERE tenant = ? AND {column} = ?"
    return int(daemon.query(sql, (tenant, instance))[0][0])


def gone(c: Client, tenant: str, iid: str) -> bool:
    try:
        c.status(tenant, iid)
    except StepVisorError as exc:
        assert exc.code == "NOT_FOUND"
        return True
    return False


def setup(daemon: Daemon) -> Client:
    c = daemon.client()
    for tenant in ("short", "keep"):
        deploy_source(c, tenant, SRC)
    for tenant in ("short", "keep"):
        # "done" waits for the event, so it is still there to take it however fast it runs:
        # an event row that must go with it.
        c.create(tenant, "w", "wait", id="done")
        c.create(tenant, "w", "wait", id="waiting")
        c.send_event(tenant, "done", "go")
        assert c.wait(tenant, "done", timeout_s=60)["status"] == "complete"
        wait_for(lambda t=tenant: c.status(t, "waiting")["status"] == "waiting", 60, "a wait")
        reaped_activations(c, tenant, "done")
    return c


def assert_deleted_whole(daemon: Daemon, c: Client) -> None:
    for table in ("instances", "journal", "events", "activations"):
        assert rows(daemon, table, "short", "done") == 0, table
    assert c.status("short", "waiting")["status"] == "waiting"  # unfinished: kept
    assert c.status("keep", "done")["status"] == "complete"  # retention_days = 0: kept
    assert rows(daemon, "journal", "keep", "done") > 0
    usage = {r["tenant"]: r for r in c.usage()}
    assert usage["short"]["steps"] >= 2  # billing outlives the instances


CONFIG = f"[tenants.short]\nretention_days = {SHORT!r}\n[tenants.keep]\nretention_days = 0\n"


def test_stepvisor_gc_deletes_what_outlived_its_retention(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon(CONFIG, server="retention_interval_s = 3600\n")
    c = setup(daemon)
    deleted = {"instances": 0, "inspections": 0}

    def collected() -> bool:
        for key, n in c.gc().items():
            deleted[key] += n
        return gone(c, "short", "done")

    wait_for(collected, 30, "retention to delete the finished instance")
    # The deploy check's record too, and any of a prepared activation stopped unused.
    assert deleted["instances"] == 1 and deleted["inspections"] >= 1
    checks = "SELECT COUNT(*) FROM activations WHERE tenant = 'short' AND kind = 'inspect'"
    assert daemon.query(checks) == [(0,)]
    assert_deleted_whole(daemon, c)
    out = daemon.cli("gc")
    assert out.returncode == 0 and "deleted 0 instances" in out.stdout


def test_the_loop_runs_retention_by_itself(make_daemon: Callable[..., Daemon]) -> None:
    # Set up with everything kept, then shorten `short`'s retention by a reload: with it short
    # from the start, the loop could delete short/done (2 s after it finished) while `setup`
    # was still waiting for its activations to be reaped, and setup then failed on NOT_FOUND.
    server = "retention_interval_s = 0.5\n"
    daemon = make_daemon(
        CONFIG.replace(f"retention_days = {SHORT!r}", "retention_days = 0"), server
    )
    c = setup(daemon)
    assert not daemon.events("retention.deleted")  # nothing went before the reload
    daemon.write_config(CONFIG, server)
    assert c.reload()["changes"] == {"tenants.short.retention_days": {"old": 0, "new": SHORT}}
    wait_for(lambda: gone(c, "short", "done"), 30, "the loop's retention pass")
    assert_deleted_whole(daemon, c)
    assert daemon.events("retention.deleted")


def test_retention_is_per_tenant_and_validated() -> None:
    from supervisor.config import ConfigError, parse

    cfg = parse("[defaults]\nretention_days = 7\n[tenants.a]\nretention_days = 1\n")
    assert cfg.limits_for("a").retention_days == 1
    assert cfg.limits_for("b").retention_days == 7
    with pytest.raises(ConfigError, match="retention_days"):
        parse("[defaults]\nretention_days = -1\n")
