"""The PostgreSQL server dies under a running node: the node stops cleanly (its activations
killed, nothing half-recorded) with a status systemd restarts, and once the database is back a
restarted node re-runs the interrupted step; nothing journaled is lost."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.executions import start_gated
from tests.conftest import Daemon, wait_gone, writable
from tests.pg import DATABASE, Cluster

pytestmark = [pytest.mark.chaos, pytest.mark.postgresql_only]


def test_a_node_whose_database_dies_stops_and_resumes_after_it(
    make_daemon: Callable[..., Daemon], own_pg_cluster: Cluster, shared: Path
) -> None:
    url = own_pg_cluster.url(DATABASE)
    d = make_daemon(writable(shared), server=f'database = "{url}"\n')
    _, pid = start_gated(d.client(), shared)

    own_pg_cluster.halt()
    assert d.proc is not None
    assert d.proc.wait(60) == 75  # EX_TEMPFAIL: systemd's Restart=on-failure brings it back
    assert d.events("database.lost")
    wait_gone(pid, 10, "the activation of a node that lost its database")

    own_pg_cluster.resume()
    d.start()
    c = d.client()
    (shared / "go").touch()
    st = c.wait("acme", "g", timeout_s=60)
    assert st["status"] == "complete"
    assert st["output"][0] == "journaled first"
    h = c.history("acme", "g")
    assert [e["status"] for e in h["entries"]] == ["ok", "ok"]
    assert [a["outcome"] for a in h["activations"]].count("interrupted") == 1
