"""The PostgreSQL server dies under a running node: the node stops cleanly (its activations
killed, nothing half-recorded) with a status systemd restarts, and once the database is back a
restarted node re-runs the interrupted step; nothing journaled is lost."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from supervisor import journal as j
from tests.chaos.executions import start_gated
from tests.conftest import Daemon, wait_for, wait_gone, writable
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


def test_connections_a_server_restart_left_dead_are_replaced(own_pg_cluster: Cluster) -> None:
    """Between two ticks the server restarted: the pooled connections are dead. A transaction
    finds out at BEGIN, before it did anything, and starts again on a fresh connection; a read
    outside one is tried again once. (A restart in the middle of a tick stops the node: see
    above.)"""
    db = j.connect(own_pg_cluster.url(DATABASE))
    try:
        with j.transaction(db):
            j.ensure_tenant(db, "acme", 1.0)
        assert j.tenant_names(db) == ["acme"]
        own_pg_cluster.halt()
        own_pg_cluster.resume()
        assert j.tenant_names(db) == ["acme"]  # a read outside a transaction
        own_pg_cluster.halt()
        own_pg_cluster.resume()
        with j.transaction(db):
            j.ensure_tenant(db, "beta", 2.0)
        assert j.tenant_names(db) == ["acme", "beta"]
    finally:
        db.close()


def test_a_session_the_server_ended_mid_transaction_is_a_lost_connection(pg_db: str) -> None:
    """A node paused inside a transaction (SIGSTOP) has its session ended by the server after half
    a lease (idle_in_transaction_session_timeout). When it wakes its next statement fails with
    25P03, which psycopg files under InternalError: the loop must take it for a lost connection
    (`database.lost`, exit 75), like any other, not die on it. Nothing of the transaction commits,
    and the pool hands out a fresh connection afterwards."""
    db = j.connect(pg_db, lease_s=1.0)  # the server ends an idle transaction after 0.5 s
    try:
        with pytest.raises(j.CONNECTION_LOST), j.transaction(db):
            j.ensure_tenant(db, "acme", 1.0)
            backend = db.execute("SELECT pg_backend_pid()").fetchone()[0]
            # "Paused": do nothing until the server has ended this session.
            with psycopg.connect(pg_db, autocommit=True) as watcher:
                wait_for(
                    lambda: (
                        not watcher.execute(
                            "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)
                        ).fetchone()
                    ),
                    10,
                    "the server to end the idle transaction's session",
                )
            j.ensure_tenant(db, "beta", 2.0)
        assert j.tenant_names(db) == []
        with j.transaction(db):
            j.ensure_tenant(db, "beta", 2.0)
        assert j.tenant_names(db) == ["beta"]
    finally:
        db.close()
