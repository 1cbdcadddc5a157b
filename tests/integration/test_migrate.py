"""`stepvisor migrate --to`: an embedded SQLite database graduates to PostgreSQL with its history,
and the supervisor carries on from there."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from tests.conftest import Daemon, deploy_source

pytestmark = pytest.mark.sqlite_only  # it starts on SQLite, and moves to its own PostgreSQL

SRC = """
from stepvisor import workflow

@workflow("w")
def w(event, step):
    first = step.do("one", lambda: 1)
    if event.payload == "wait":
        got = step.wait_for_event("go", type="go", timeout=3600)
        return [first, got["payload"]]
    return first
"""


def test_history_moves_to_postgresql_and_the_supervisor_carries_on(
    make_daemon: Callable[..., Daemon], pg_db: str
) -> None:
    d = make_daemon()
    c = d.client()
    deploy_source(c, "acme", SRC)
    deploy_source(c, "beta", SRC)
    c.create("acme", "w", "done", id="done")
    c.create("beta", "w", "wait", id="waiting")
    assert c.wait("acme", "done", timeout_s=60)["status"] == "complete"
    c.send_event("beta", "waiting", "early", {"n": 0})  # a buffered event of another type
    before = {(t, i): c.history(t, i) for t, i in (("acme", "done"), ("beta", "waiting"))}
    assert before[("beta", "waiting")]["instance"]["status"] == "waiting"

    out = d.cli("migrate", "--to", pg_db, "--config", str(d.config_path))
    assert out.returncode == 1 and "a supervisor is running" in out.stderr  # refused: live
    assert d.stop() == 0
    out = d.cli("migrate", "--to", pg_db, "--config", str(d.config_path))
    assert out.returncode == 0, out.stderr
    assert "instances: 2 rows" in out.stdout and "copied" in out.stdout
    again = d.cli("migrate", "--to", pg_db, "--config", str(d.config_path))
    assert again.returncode == 1 and "not empty" in again.stderr  # never over existing data

    d.database = pg_db
    d.write_config()
    d.start()
    c = d.client()
    for (tenant, iid), h in before.items():
        assert c.history(tenant, iid) == h  # every entry and activation, as it was
    c.send_event("beta", "waiting", "go", {"n": 1})
    st = c.wait("beta", "waiting", timeout_s=60)
    assert (st["status"], st["output"]) == ("complete", [1, {"n": 1}])
    ids = [a["id"] for a in c.history("beta", "waiting")["activations"]]
    assert ids == sorted(set(ids))  # new activation ids follow the copied ones
    assert "postgresql" in c.stats()["database"]
    d.stop(signal.SIGTERM)


def test_a_bad_target_is_refused_with_a_clear_error(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(start=False)
    out = d.cli("migrate", "--to", "mysql://x/y", "--config", str(d.config_path))
    assert out.returncode == 2 and "expected a postgresql:// URL" in out.stderr
    out = d.cli("migrate", "--to", "postgresql:///x", "--config", str(d.config_path))
    assert out.returncode == 1 and "no state dir" in out.stderr  # nothing to migrate
    d.state.mkdir(mode=0o700)
    out = d.cli("migrate", "--to", "postgresql:///x", "--config", str(d.config_path))
    assert out.returncode == 1 and "no SQLite database" in out.stderr
