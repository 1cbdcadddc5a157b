"""The throwaway PostgreSQL cluster (tests/pg.py) does what the PostgreSQL backend will need:
tables, LISTEN/NOTIFY between connections, row claims with SKIP LOCKED, and a connection pool."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors
from psycopg_pool import ConnectionPool


def test_session_database_takes_sql_over_the_socket_only(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("stepvisor",)
        # No TCP listener: the cluster cannot clash with, or be reached from, anything else.
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)


def test_fresh_database_per_test_stores_rows(pg_db: str) -> None:
    with psycopg.connect(pg_db) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert tables.fetchone() == (0,)
        conn.execute("CREATE TABLE instances (id text PRIMARY KEY, status text NOT NULL)")
        conn.cursor().executemany(
            "INSERT INTO instances (id, status) VALUES (%s, %s)",
            [("a", "running"), ("b", "done")],
        )
    with psycopg.connect(pg_db) as conn:  # committed: a second connection sees the rows
        rows = conn.execute("SELECT id, status FROM instances ORDER BY id").fetchall()
    assert rows == [("a", "running"), ("b", "done")]


def test_notify_reaches_a_listener_on_another_connection(pg_db: str) -> None:
    with (
        psycopg.connect(pg_db, autocommit=True) as listener,
        psycopg.connect(pg_db, autocommit=True) as sender,
    ):
        listener.execute("LISTEN wakeup")
        sender.execute("SELECT pg_notify('wakeup', 'acme/instance-1')")
        got = list(listener.notifies(timeout=10, stop_after=1))
    assert [(n.channel, n.payload) for n in got] == [("wakeup", "acme/instance-1")]


def test_skip_locked_claims_skip_a_row_another_transaction_holds(pg_db: str) -> None:
    claim = "SELECT id FROM queue ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
    with psycopg.connect(pg_db) as a, psycopg.connect(pg_db) as b:
        a.execute("CREATE TABLE queue (id int PRIMARY KEY)")
        a.execute("INSERT INTO queue VALUES (1), (2)")
        a.commit()
        assert a.execute(claim).fetchone() == (1,)  # a's transaction now holds row 1
        assert b.execute(claim).fetchone() == (2,)
        # The lock is real: b cannot take row 1 while a's transaction is open...
        with pytest.raises(errors.LockNotAvailable):
            b.execute("SELECT id FROM queue WHERE id = 1 FOR UPDATE NOWAIT")
        b.rollback()
        a.rollback()
        # ...and can once it ends.
        assert b.execute(claim).fetchone() == (1,)


def test_pool_hands_out_distinct_connections(pg_db: str) -> None:
    with ConnectionPool(pg_db, min_size=1, max_size=2, open=True, timeout=10) as pool:
        pool.wait(timeout=10)
        with pool.connection() as one, pool.connection() as two:
            pids = {c.execute("SELECT pg_backend_pid()").fetchone() for c in (one, two)}
            assert len(pids) == 2
        with pool.connection() as conn:
            assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
