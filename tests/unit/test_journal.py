"""supervisor.journal on a real SQLite file: schema, immutable code, FIFO events, scheduling."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.messages import ErrorInfo, JournalEntry
from supervisor import journal as j
from supervisor.journal import pg_schema, sqlite_schema
from supervisor.journal.db import open_sqlite

T0 = 1_700_000_000.0


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "stepvisor.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, db_path: Path) -> Path | str:
    """Each backend in turn: every test taking `database` or `conn` runs on both."""
    return db_path if request.param == "sqlite" else str(request.getfixturevalue("pg_db"))


@pytest.fixture
def conn(database: Path | str) -> Iterator[j.Db]:
    c = j.connect(database)
    yield c
    c.close()


def add(
    conn: j.Db,
    iid: str,
    *,
    tenant: str = "acme",
    now: float = T0,
    params: bytes = b"null",
) -> bool:
    return j.insert_instance(conn, tenant, iid, "wf", "v1", params, now, "queued")


# ---------------------------------------------------------------- schema


def test_connect_creates_a_wal_database_at_the_current_schema(db_path: Path) -> None:
    conn = j.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(j.MIGRATIONS)
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        assert conn.in_transaction is False  # autocommit; callers use transaction()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {
            "tenants",
            "code_versions",
            "deployments",
            "instances",
            "journal",
            "events",
            "activations",
        } <= tables
    finally:
        conn.close()
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_connect_normal_synchronous(db_path: Path) -> None:
    conn = j.connect(db_path, synchronous="normal")
    try:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        conn.close()


def test_connecting_twice_is_idempotent_and_keeps_data(db_path: Path) -> None:
    first = j.connect(db_path)
    with j.transaction(first):
        assert add(first, "i1")
    first.close()
    second = j.connect(db_path)
    try:
        assert second.execute("PRAGMA user_version").fetchone()[0] == len(j.MIGRATIONS)
        row = j.get_instance(second, "acme", "i1")
        assert row is not None and row["status"] == "queued"
        # a third connection while the second is open migrates nothing and sees the same rows
        third = j.connect(db_path)
        assert j.get_instance(third, "acme", "i1") is not None
        third.close()
    finally:
        second.close()


# ---------------------------------------------------------------- transactions


def test_transaction_commits(conn: j.Db, database: Path | str) -> None:
    with j.transaction(conn):
        j.ensure_tenant(conn, "acme", T0)
    other = j.connect(database)
    try:
        assert [tuple(r) for r in other.execute("SELECT name FROM tenants")] == [("acme",)]
    finally:
        other.close()


def test_transaction_rolls_back_on_exception(conn: j.Db) -> None:
    with j.transaction(conn):
        assert add(conn, "keep")
    with pytest.raises(RuntimeError, match="boom"), j.transaction(conn):
        assert add(conn, "gone")
        j.update_instance(conn, "acme", "keep", status="running")
        raise RuntimeError("boom")
    assert conn.in_transaction is False
    assert j.get_instance(conn, "acme", "gone") is None
    row = j.get_instance(conn, "acme", "keep")
    assert row is not None and row["status"] == "queued"
    # the connection is still usable afterwards
    with j.transaction(conn):
        assert add(conn, "after")
    assert j.get_instance(conn, "acme", "after") is not None


def test_transaction_rolls_back_on_base_exception(conn: j.Db) -> None:
    with pytest.raises(KeyboardInterrupt), j.transaction(conn):
        add(conn, "gone")
        raise KeyboardInterrupt
    assert j.get_instance(conn, "acme", "gone") is None


# ---------------------------------------------------------------- tenants and code


def test_tenants(conn: j.Db) -> None:
    assert not j.tenant_exists(conn, "acme")
    j.ensure_tenant(conn, "zeta", T0)
    j.ensure_tenant(conn, "acme", T0)
    j.ensure_tenant(conn, "acme", T0 + 5)  # idempotent
    assert not j.tenant_exists(conn, "acme")  # known, numbered, but nothing deployed yet
    assert j.tenant_names(conn) == ["acme", "zeta"]
    assert (j.tenant_number(conn, "zeta"), j.tenant_number(conn, "acme")) == (1, 2)
    j.set_deployment(conn, "acme", "w", "h1", T0)
    assert j.tenant_exists(conn, "acme")


def test_put_code_is_immutable_per_hash(conn: j.Db) -> None:
    j.put_code(conn, "acme", "h1", "source", "a.py", b"first", ["w1", "w2"], T0)
    j.put_code(conn, "acme", "h1", "pickle", "b.py", b"second", ["other"], T0 + 10)
    row = j.get_code(conn, "acme", "h1")
    assert row is not None
    assert (
        row["kind"],
        row["filename"],
        bytes(row["code"]),
        row["workflows"],
        row["created_at"],
    ) == ("source", "a.py", b"first", "w1,w2", T0)
    assert conn.execute("SELECT count(*) FROM code_versions").fetchone()[0] == 1
    # the same hash is a separate version for another tenant
    j.put_code(conn, "beta", "h1", "source", "b.py", b"beta code", ["w"], T0)
    beta = j.get_code(conn, "beta", "h1")
    assert beta is not None and bytes(beta["code"]) == b"beta code"
    assert j.get_code(conn, "acme", "nope") is None


def test_times_bytes_and_big_numbers_round_trip_exactly(conn: j.Db) -> None:
    when = T0 + 0.123456789  # a 4-byte float would lose the fraction
    blob = bytes(range(256)) * 4
    with j.transaction(conn):
        assert j.insert_instance(conn, "acme", "i", "wf", "v1", blob, when, "queued")
        j.update_instance(conn, "acme", "i", output=b"\x00out", wake_at=when + 1e-6)
        j.add_usage(
            conn,
            "acme",
            when,
            step=True,
            failed=False,
            cpu_ms=0.5,
            wall_ms=1.5,
            max_rss_kib=3 << 31,
        )  # past a 32-bit integer: sums must not overflow
        j.add_usage(
            conn, "acme", when, step=True, failed=True, cpu_ms=0.5, wall_ms=1.5, max_rss_kib=3 << 31
        )
    row = j.get_instance(conn, "acme", "i")
    assert row is not None
    assert (row["params"], row["output"]) == (blob, b"\x00out")
    assert (row["created_at"], row["wake_at"]) == (when, when + 1e-6)
    assert isinstance(row["params"], bytes)
    [total] = j.usage(conn, "acme", None, hourly=False)
    assert (total["activations"], total["steps"], total["failures"]) == (2, 2, 1)
    assert total["memory_sum_kib"] == 3 << 32 and total["memory_peak_kib"] == 3 << 31
    assert all(type(total[k]) is int for k in ("activations", "steps", "memory_sum_kib"))


def test_put_code_rejects_unknown_kind(conn: j.Db) -> None:
    with pytest.raises(j.IntegrityError):
        j.put_code(conn, "acme", "h", "exe", "a", b"x", [], T0)


def test_deployments_point_at_the_latest_version(conn: j.Db) -> None:
    assert j.get_deployment(conn, "acme", "wf") is None
    j.set_deployment(conn, "acme", "wf", "v1", T0)
    j.set_deployment(conn, "acme", "wf", "v2", T0 + 1)
    assert j.get_deployment(conn, "acme", "wf") == "v2"
    assert j.get_deployment(conn, "beta", "wf") is None


# ---------------------------------------------------------------- instances


def test_insert_instance_creates_a_queued_due_instance(conn: j.Db) -> None:
    assert add(conn, "i1", params=b'{"x":1}') is True
    row = j.get_instance(conn, "acme", "i1")
    assert row is not None
    assert row["status"] == "queued"
    assert row["wake_at"] == T0
    assert row["lease"] is None
    assert bytes(row["params"]) == b'{"x":1}'
    assert (row["version"], row["workflow"]) == ("v1", "wf")


def test_insert_instance_duplicate_returns_false_and_leaves_row(conn: j.Db) -> None:
    assert add(conn, "i1", params=b"1")
    j.update_instance(conn, "acme", "i1", status="running", lease=7)
    assert j.insert_instance(conn, "acme", "i1", "other", "v9", b"2", T0 + 50, "queued") is False
    row = j.get_instance(conn, "acme", "i1")
    assert row is not None
    assert (
        row["workflow"],
        row["version"],
        bytes(row["params"]),
        row["status"],
        row["lease"],
        row["created_at"],
    ) == ("wf", "v1", b"1", "running", 7, T0)
    # the same id in another tenant is a different instance
    assert add(conn, "i1", tenant="beta") is True


def test_count_and_list_instances(conn: j.Db) -> None:
    for n, status in enumerate(
        ["queued", "running", "complete", "errored", "terminated", "paused", "waiting"]
    ):
        add(conn, f"i{n}", now=T0 + n)
        j.update_instance(conn, "acme", f"i{n}", status=status)
    add(conn, "other", tenant="beta")
    assert j.count_live_instances(conn, "acme") == 4
    assert [r["id"] for r in j.list_instances(conn, "acme", None, 100)] == [
        f"i{n}" for n in range(7)
    ]
    assert [r["id"] for r in j.list_instances(conn, "acme", None, 2)] == ["i0", "i1"]
    assert [r["id"] for r in j.list_instances(conn, "acme", "complete", 100)] == ["i2"]
    assert [r["id"] for r in j.list_instances(conn, "beta", None, 100)] == ["other"]


# ---------------------------------------------------------------- events


def test_consume_event_is_fifo_per_type_and_never_repeats(conn: j.Db) -> None:
    add(conn, "i1")
    e1 = j.add_event(conn, "acme", "i1", "a", b"1", T0)
    j.add_event(conn, "acme", "i1", "b", b"b1", T0 + 1)
    e3 = j.add_event(conn, "acme", "i1", "a", b"2", T0 + 2)
    j.add_event(conn, "acme", "i2", "a", b"other instance", T0)
    j.add_event(conn, "beta", "i1", "a", b"other tenant", T0)
    assert e1 < e3

    first = j.consume_event(conn, "acme", "i1", "a", 3)
    second = j.consume_event(conn, "acme", "i1", "a", 5)
    assert first is not None and second is not None
    assert (first["id"], bytes(first["payload"]), first["type"]) == (e1, b"1", "a")
    assert (second["id"], bytes(second["payload"])) == (e3, b"2")
    assert j.consume_event(conn, "acme", "i1", "a", 6) is None
    b = j.consume_event(conn, "acme", "i1", "b", 7)
    assert b is not None and bytes(b["payload"]) == b"b1"
    assert j.consume_event(conn, "acme", "i1", "b", 8) is None
    consumed = dict(
        conn.execute(
            "SELECT id, consumed_seq FROM events WHERE tenant = 'acme' AND instance = 'i1'"
        ).fetchall()
    )
    assert consumed[e1] == 3 and consumed[e3] == 5
    # the other instance's and the other tenant's events are untouched
    assert conn.execute("SELECT count(*) FROM events WHERE consumed_seq IS NULL").fetchone()[0] == 2


# ---------------------------------------------------------------- scheduling


def test_due_instances_orders_by_wake_at_and_skips_leased_and_future(
    conn: j.Db,
) -> None:
    add(conn, "late", now=T0 + 30)
    add(conn, "early", now=T0 + 10)
    add(conn, "middle", now=T0 + 20)
    add(conn, "leased", now=T0)
    j.update_instance(conn, "acme", "leased", lease=1)
    add(conn, "future", now=T0 + 1000)
    add(conn, "parked")
    j.update_instance(conn, "acme", "parked", wake_at=None, status="paused")
    assert j.due_instances(conn, "acme", T0 + 100, 10) == ["early", "middle", "late"]
    assert j.due_instances(conn, "acme", T0 + 100, 2) == ["early", "middle"]
    assert j.due_instances(conn, "acme", T0 + 20, 10) == ["early", "middle"]  # wake_at <= now
    assert j.due_instances(conn, "acme", T0 + 5, 10) == []


def test_due_instances_is_per_tenant(conn: j.Db) -> None:
    add(conn, "a1", tenant="acme", now=T0)
    add(conn, "a2", tenant="acme", now=T0 + 1)
    add(conn, "b1", tenant="beta", now=T0 + 2)
    assert j.due_instances(conn, "beta", T0 + 10, 100) == ["b1"]
    assert j.due_instances(conn, "acme", T0 + 10, 100) == ["a1", "a2"]
    assert j.due_instances(conn, "gamma", T0 + 10, 100) == []


def test_next_wake(conn: j.Db) -> None:
    assert j.next_wake(conn) is None
    add(conn, "a", now=T0 + 50)
    add(conn, "b", tenant="beta", now=T0 + 20)
    add(conn, "c", now=T0 + 5)
    j.update_instance(conn, "acme", "c", lease=3)  # leased: not waiting for a wake
    assert j.next_wake(conn) == T0 + 20
    j.update_instance(conn, "beta", "b", wake_at=None)
    assert j.next_wake(conn) == T0 + 50
    assert [r["id"] for r in j.leased_instances(conn, "n1")] == ["c"]


# ---------------------------------------------------------------- journal entries


def test_upsert_entry_inserts_then_updates(conn: j.Db) -> None:
    add(conn, "i1")
    j.upsert_entry(
        conn, "acme", "i1", 0, kind="step", name="a", status="running", attempts=1, started_at=T0
    )
    j.upsert_entry(conn, "acme", "i1", 0, status="ok", result=b"42", finished_at=T0 + 1)
    err = ErrorInfo(type="ValueError", message="bad", traceback="tb")
    j.upsert_entry(
        conn,
        "acme",
        "i1",
        1,
        kind="step",
        name="b",
        status="error",
        attempts=3,
        error=j.encode_error(err),
        started_at=T0 + 2,
    )
    j.upsert_entry(
        conn,
        "acme",
        "i1",
        2,
        kind="sleep",
        name="s",
        status="sleeping",
        until=T0 + 99,
        started_at=T0 + 3,
    )
    assert j.journal_length(conn, "acme", "i1") == 3
    assert j.journal_entries(conn, "acme", "i1") == [
        JournalEntry(seq=0, kind="step", name="a", status="ok", attempts=1, result=b"42"),
        JournalEntry(seq=1, kind="step", name="b", status="error", attempts=3, error=err),
        JournalEntry(seq=2, kind="sleep", name="s", status="sleeping", until=T0 + 99),
    ]
    row = j.get_entry(conn, "acme", "i1", 0)
    assert row is not None and row["finished_at"] == T0 + 1 and row["started_at"] == T0
    assert j.get_entry(conn, "acme", "i1", 9) is None
    assert j.journal_entries(conn, "beta", "i1") == []


def test_error_encoding_round_trips() -> None:
    err = ErrorInfo(type="E", message="m", traceback="t", code="NONDETERMINISM")
    assert j.decode_error(j.encode_error(err)) == err
    assert j.encode_error(None) is None and j.decode_error(None) is None


# ---------------------------------------------------------------- delete and reset


def _instance_with_history(conn: j.Db, iid: str) -> None:
    add(conn, iid, params=b'{"p":1}')
    j.upsert_entry(
        conn, "acme", iid, 0, kind="step", name="a", status="ok", result=b"1", started_at=T0
    )
    j.upsert_entry(conn, "acme", iid, 1, kind="wait_event", name="w", status="ok", started_at=T0)
    j.add_event(conn, "acme", iid, "e", b"consumed", T0)
    j.consume_event(conn, "acme", iid, "e", 1)
    j.add_event(conn, "acme", iid, "e", b"pending", T0 + 1)
    j.update_instance(
        conn,
        "acme",
        iid,
        status="complete",
        output=b"1",
        wake_at=None,
        failures=2,
        steps=2,
        pause_requested=1,
        error='{"type":"x"}',
    )


def test_delete_instance_removes_journal_and_events(conn: j.Db) -> None:
    _instance_with_history(conn, "doomed")
    _instance_with_history(conn, "kept")
    j.delete_instance(conn, "acme", "doomed")
    assert j.get_instance(conn, "acme", "doomed") is None
    assert j.journal_rows(conn, "acme", "doomed") == []
    assert conn.execute("SELECT count(*) FROM events WHERE instance = 'doomed'").fetchone()[0] == 0
    assert j.get_instance(conn, "acme", "kept") is not None
    assert j.journal_length(conn, "acme", "kept") == 2
    assert conn.execute("SELECT count(*) FROM events WHERE instance = 'kept'").fetchone()[0] == 2
    # the id can be reused afterwards
    assert add(conn, "doomed")


def test_reset_instance_clears_the_journal_and_requeues(conn: j.Db) -> None:
    _instance_with_history(conn, "i1")
    j.reset_instance(conn, "acme", "i1", T0 + 500, "queued")
    row = j.get_instance(conn, "acme", "i1")
    assert row is not None
    assert j.journal_rows(conn, "acme", "i1") == []
    assert (
        row["status"],
        row["wake_at"],
        row["output"],
        row["error"],
        row["lease"],
        row["failures"],
        row["steps"],
        row["pause_requested"],
    ) == ("queued", T0 + 500, None, None, None, 0, 0, 0)
    assert (bytes(row["params"]), row["version"]) == (b'{"p":1}', "v1")  # pinned code kept
    payloads = [bytes(r[0]) for r in conn.execute("SELECT payload FROM events WHERE instance='i1'")]
    assert payloads == [b"pending"]  # consumed events are dropped, pending ones stay buffered
    assert j.due_instances(conn, "acme", T0 + 500, 10) == ["i1"]


# ---------------------------------------------------------------- activations


def test_activation_records(conn: j.Db) -> None:
    add(conn, "i1")
    a1 = j.insert_activation(conn, "acme", "i1", "run", T0, "n1")
    a2 = j.insert_activation(conn, "acme", "i1", "run", T0 + 1, "n1")
    j.insert_activation(conn, "acme", None, "inspect", T0, "n1")
    other = j.insert_activation(conn, "acme", "i1", "run", T0 + 2, "n2")
    j.update_activation(conn, a1, finished_at=T0 + 0.5, outcome="ok", cold_start_ms=12.5)
    assert [r["id"] for r in j.open_activations(conn, "n1")] == [a2, a2 + 1]
    assert [r["id"] for r in j.open_activations(conn, "n2")] == [other]
    rows = j.instance_activations(conn, "acme", "i1")
    assert [r["id"] for r in rows] == [a1, a2, other]
    assert (rows[0]["outcome"], rows[0]["cold_start_ms"]) == ("ok", 12.5)
    assert j.instance_activations(conn, "beta", "i1") == []


def test_acked_mode_leaves_syncing_to_the_caller(db_path: Path) -> None:
    conn = j.connect(db_path, synchronous="acked")
    try:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: no sync per commit
        with j.transaction(conn):
            j.ensure_tenant(conn, "acme", 1.0)
        conn.sync()  # the daemon's one fsync for what a tick acknowledges
    finally:
        conn.close()


def test_usage_is_filled_from_earlier_activations_on_upgrade(tmp_path: Path) -> None:
    conn = open_sqlite(tmp_path / "old.db")
    for number, script in enumerate(j.MIGRATIONS[:2], start=1):  # a database at schema 2
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={number}")
    rows = [  # tenant, launched_at, step, outcome, cpu_ms, total_ms, max_rss_kib, finished
        ("acme", 7200.5, "s1", "ok", 5.0, 10.0, 1000, 1.0),
        ("acme", 7300.0, None, "crashed", 3.0, 20.0, 3000, 1.0),
        ("acme", 10800.0, "s2", "ok", 1.0, 2.0, 500, 1.0),
        ("beta", 7200.0, "s1", "ok", 2.0, 4.0, 800, None),  # still open: not counted yet
    ]
    for tenant, at, step, how, cpu, total, rss, fin in rows:
        conn.execute(
            "INSERT INTO activations (tenant, kind, launched_at, step, outcome, cpu_ms, "
            "total_ms, max_rss_kib, finished_at) VALUES (?, 'run', ?, ?, ?, ?, ?, ?, ?)",
            (tenant, at, step, how, cpu, total, rss, fin),
        )
    sqlite_schema.migrate(conn)
    hourly = [dict(r) for r in j.usage(conn, None, None, hourly=True)]
    assert [(r["tenant"], r["hour"]) for r in hourly] == [("acme", 7200), ("acme", 10800)]
    first = hourly[0]
    assert (first["activations"], first["steps"], first["failures"]) == (2, 1, 1)
    assert (first["cpu_ms"], first["wall_ms"], first["memory_peak_kib"]) == (8.0, 30.0, 3000)
    assert first["memory_sum_kib"] == 4000 and first["memory_kib_s"] == pytest.approx(70.0)
    j.add_usage(
        conn, "acme", 7201.0, step=True, failed=False, cpu_ms=1.0, wall_ms=1.0, max_rss_kib=9000
    )
    [total] = j.usage(conn, "acme", 7300.0, hourly=False)  # from the hour holding 7300 on
    assert (total["activations"], total["steps"], total["memory_peak_kib"]) == (4, 3, 9000)
    assert j.usage(conn, "acme", 14400.0, hourly=False) == []
    conn.close()


def test_an_older_database_is_converted_to_incremental_vacuum(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:  # made without auto_vacuum, as before retention
        old.execute("CREATE TABLE filler (x BLOB)")
    conn = j.connect(path)
    try:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
        with j.transaction(conn):
            conn.executemany("INSERT INTO filler VALUES (?)", [(b"x" * 4000,) for _ in range(500)])
        with j.transaction(conn):
            conn.execute("DELETE FROM filler")
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        assert free >= 400
        j.give_back_space(conn, 100)
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == free - 100
    finally:
        conn.close()


def test_a_new_database_is_incremental_and_activation_ids_never_repeat(db_path: Path) -> None:
    conn = j.connect(db_path)
    try:
        assert j.is_incremental(conn)
        with j.transaction(conn):
            first = j.insert_activation(conn, "acme", "i", "run", T0)
            conn.execute("DELETE FROM activations WHERE id = ?", (first,))
            assert j.insert_activation(conn, "acme", "i", "run", T0) == first + 1
    finally:
        conn.close()


# ---------------------------------------------------------------- nodes and leases


def test_a_lapsed_node_is_fenced_once_and_its_heartbeat_then_fails(conn: j.Db) -> None:
    with j.transaction(conn):
        j.register_node(conn, "a", "host", 1, "/s/a", T0)
        j.register_node(conn, "b", "host", 2, "/s/b", T0)
        assert j.heartbeat(conn, "b", T0 + 9)
        assert j.fence_lapsed_nodes(conn, "b", T0 + 5, T0 + 10) == ["a"]  # a: silent since T0
        assert j.fence_lapsed_nodes(conn, "b", T0 + 5, T0 + 10) == []  # once
        assert not j.heartbeat(conn, "a", T0 + 11)  # a comes back: it must stop
        assert j.heartbeat(conn, "b", T0 + 11)
        j.stop_node(conn, "b", T0 + 12)  # a clean stop is never fenced
        assert j.fence_lapsed_nodes(conn, "c", T0 + 100, T0 + 100) == []
        j.register_node(conn, "a", "host", 3, "/s/a", T0 + 20)  # restarted: not fenced
        assert j.heartbeat(conn, "a", T0 + 21)
    rows = {r["id"]: r for r in j.nodes(conn)}
    assert rows["a"]["pid"] == 3 and rows["a"]["fenced_at"] is None
    assert rows["b"]["stopped_at"] == T0 + 12


def test_a_lease_holds_for_its_activation_only(conn: j.Db) -> None:
    with j.transaction(conn):
        add(conn, "i")
        aid = j.insert_activation(conn, "acme", "i", "run", T0, "a")
        j.update_instance(conn, "acme", "i", lease=aid)
        assert j.hold_lease(conn, "acme", "i", aid)
        assert not j.hold_lease(conn, "acme", "i", aid + 1)
        assert [r["id"] for r in j.leased_instances(conn, "a")] == ["i"]
        assert j.leased_instances(conn, "b") == []
        assert j.leased_elsewhere(conn, "acme", "b") == 1
        assert j.leased_elsewhere(conn, "acme", "a") == 0
        j.update_instance(conn, "acme", "i", lease=None)
        assert not j.hold_lease(conn, "acme", "i", aid)


def test_a_uid_claimed_by_another_tenant_stays_its(conn: j.Db) -> None:
    with j.transaction(conn):
        assert j.claim_uid(conn, 900_001, "acme") == "acme"
        assert j.claim_uid(conn, 900_001, "beta") == "acme"
        assert j.claim_uid(conn, 900_001, "acme") == "acme"
    assert j.uid_owners(conn) == {900_001: "acme"}


def test_nodes_never_claim_the_same_instance_nor_a_tenant_at_once(pg_db: str) -> None:
    """Two connections as two nodes, inside open transactions: what one has claimed (locked)
    the other skips, and the tenant lock is held by one at a time."""
    a, b = j.connect(pg_db), j.connect(pg_db)
    try:
        with j.transaction(a):
            for n in range(3):
                add(a, f"i{n}", now=T0 + n)
        with j.transaction(a):
            assert j.try_lock_tenant(a, "acme")
            assert j.due_instances(a, "acme", T0 + 10, 1) == ["i0"]
            with j.transaction(b):
                assert not j.try_lock_tenant(b, "acme")
                assert j.try_lock_tenant(b, "beta")
                assert j.due_instances(b, "acme", T0 + 10, 2) == ["i1", "i2"]
        with j.transaction(b):
            assert j.try_lock_tenant(b, "acme")  # released with a's transaction
    finally:
        a.close()
        b.close()


def test_nodes_starting_together_migrate_once(pg_db: str) -> None:
    import threading

    errors: list[BaseException] = []

    def start() -> None:
        try:
            j.connect(pg_db).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    conn = j.connect(pg_db)
    try:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
        assert versions == list(range(1, len(pg_schema.MIGRATIONS) + 1))
    finally:
        conn.close()
