"""All SQL of stepvisor: schema, migrations and every read and write of durable state.

The supervisor's loop owns one connection and wraps each loop iteration in one `BEGIN IMMEDIATE`
transaction (group commit); every function here runs inside that transaction and never commits.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from protocol.messages import ErrorInfo, JournalEntry

_error_encoder = msgspec.json.Encoder()
_error_decoder = msgspec.json.Decoder(ErrorInfo)

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE tenants (
        name TEXT PRIMARY KEY,
        created_at REAL NOT NULL
    );
    CREATE TABLE code_versions (
        tenant TEXT NOT NULL,
        hash TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('source', 'pickle')),
        filename TEXT NOT NULL,
        code BLOB NOT NULL,
        workflows TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (tenant, hash)
    );
    CREATE TABLE deployments (
        tenant TEXT NOT NULL,
        workflow TEXT NOT NULL,
        version TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (tenant, workflow)
    );
    CREATE TABLE instances (
        tenant TEXT NOT NULL,
        id TEXT NOT NULL,
        workflow TEXT NOT NULL,
        version TEXT NOT NULL,
        status TEXT NOT NULL,
        params BLOB NOT NULL,
        output BLOB,
        error TEXT,
        wake_at REAL,
        lease INTEGER,
        pause_requested INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        activations INTEGER NOT NULL DEFAULT 0,
        steps INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (tenant, id)
    );
    CREATE INDEX instances_due ON instances (tenant, wake_at)
        WHERE wake_at IS NOT NULL AND lease IS NULL;
    CREATE INDEX instances_next ON instances (wake_at)
        WHERE wake_at IS NOT NULL AND lease IS NULL;
    CREATE INDEX instances_leased ON instances (lease) WHERE lease IS NOT NULL;
    CREATE INDEX instances_status ON instances (tenant, status, created_at);
    CREATE TABLE journal (
        tenant TEXT NOT NULL,
        instance TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('step', 'sleep', 'wait_event')),
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        result BLOB,
        error TEXT,
        until REAL,
        event_type TEXT,
        retry_limit INTEGER,
        retry_delay_s REAL,
        backoff TEXT,
        timeout_s REAL,
        started_at REAL NOT NULL,
        finished_at REAL,
        duration_ms REAL,
        PRIMARY KEY (tenant, instance, seq)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        tenant TEXT NOT NULL,
        instance TEXT NOT NULL,
        type TEXT NOT NULL,
        payload BLOB NOT NULL,
        created_at REAL NOT NULL,
        consumed_seq INTEGER
    );
    CREATE INDEX events_pending ON events (tenant, instance, type, id) WHERE consumed_seq IS NULL;
    CREATE TABLE activations (
        id INTEGER PRIMARY KEY,
        tenant TEXT NOT NULL,
        instance TEXT,
        kind TEXT NOT NULL,
        seq INTEGER,
        step TEXT,
        pid INTEGER,
        pid_started REAL,
        launched_at REAL NOT NULL,
        finished_at REAL,
        outcome TEXT,
        detail TEXT,
        exit_code INTEGER,
        cold_start_ms REAL,
        exec_ms REAL,
        total_ms REAL,
        cpu_ms REAL,
        max_rss_kib INTEGER
    );
    CREATE INDEX activations_instance ON activations (tenant, instance, id);
    CREATE INDEX activations_open ON activations (id) WHERE finished_at IS NULL;
    """,
    # 2: where an activation's time went (JSON object: phase -> ms; see Activation.phases)
    """
    ALTER TABLE activations ADD COLUMN phases TEXT;
    """,
    # 3: per-tenant usage by UTC hour, for billing; kept when instances are deleted. Filled from
    # the activations already recorded, then by every reaped activation (`add_usage`).
    """
    CREATE TABLE usage (
        tenant TEXT NOT NULL,
        hour INTEGER NOT NULL,
        activations INTEGER NOT NULL DEFAULT 0,
        steps INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        cpu_ms REAL NOT NULL DEFAULT 0,
        wall_ms REAL NOT NULL DEFAULT 0,
        memory_peak_kib INTEGER NOT NULL DEFAULT 0,
        memory_sum_kib INTEGER NOT NULL DEFAULT 0,
        memory_kib_s REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, hour)
    );
    INSERT INTO usage
        SELECT tenant, CAST(launched_at / 3600 AS INTEGER) * 3600, COUNT(*),
               SUM(step IS NOT NULL), SUM(outcome IS NOT NULL AND outcome != 'ok'),
               TOTAL(cpu_ms), TOTAL(total_ms), COALESCE(MAX(max_rss_kib), 0),
               COALESCE(SUM(max_rss_kib), 0), TOTAL(max_rss_kib * total_ms / 1000.0)
        FROM activations WHERE finished_at IS NOT NULL
        GROUP BY tenant, CAST(launched_at / 3600 AS INTEGER)
    """,
    # 4: finished instances by age, for retention
    """
    CREATE INDEX instances_finished ON instances (tenant, updated_at)
        WHERE status IN ('complete', 'errored', 'terminated');
    CREATE INDEX activations_inspections ON activations (tenant, launched_at)
        WHERE instance IS NULL
    """,
    # 5: remote API client keys (CURVE public keys, Z85): each acts for one tenant, or is an
    # admin key (tenant NULL); revoked keys are kept, marked
    """
    CREATE TABLE api_keys (
        public TEXT PRIMARY KEY,
        tenant TEXT,
        created_at REAL NOT NULL,
        revoked_at REAL
    )
    """,
    # 6: activation ids are never handed out twice, even after their rows are deleted (with an
    # instance, or by retention): an id names a scratch dir and cgroups that may outlive its row.
    # And the events of one instance, found without a scan, for deleting them.
    """
    CREATE TABLE activations_new (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant TEXT NOT NULL,
        instance TEXT,
        kind TEXT NOT NULL,
        seq INTEGER,
        step TEXT,
        pid INTEGER,
        pid_started REAL,
        launched_at REAL NOT NULL,
        finished_at REAL,
        outcome TEXT,
        detail TEXT,
        exit_code INTEGER,
        cold_start_ms REAL,
        exec_ms REAL,
        total_ms REAL,
        cpu_ms REAL,
        max_rss_kib INTEGER,
        phases TEXT
    );
    INSERT INTO activations_new
        SELECT id, tenant, instance, kind, seq, step, pid, pid_started, launched_at, finished_at,
               outcome, detail, exit_code, cold_start_ms, exec_ms, total_ms, cpu_ms, max_rss_kib,
               phases
        FROM activations;
    DROP TABLE activations;
    ALTER TABLE activations_new RENAME TO activations;
    CREATE INDEX activations_instance ON activations (tenant, instance, id);
    CREATE INDEX activations_open ON activations (id) WHERE finished_at IS NULL;
    CREATE INDEX activations_inspections ON activations (tenant, launched_at)
        WHERE instance IS NULL;
    CREATE INDEX events_instance ON events (tenant, instance)
    """,
    # 7: the error of every failed attempt of a step (the last KEPT_ATTEMPT_ERRORS of each), so
    # a retry that succeeds does not erase why the attempts before it failed
    """
    CREATE TABLE attempt_errors (
        tenant TEXT NOT NULL,
        instance TEXT NOT NULL,
        seq INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        error TEXT NOT NULL,
        failed_at REAL NOT NULL,
        PRIMARY KEY (tenant, instance, seq, attempt)
    )
    """,
    # 8: usage: the most scratch disk one activation of the hour held at its exit
    """
    ALTER TABLE usage ADD COLUMN scratch_max_kib INTEGER NOT NULL DEFAULT 0
    """,
    # 9: the tenant each sandbox uid was first given to; no other tenant ever gets it, so files
    # one tenant's activations left owned by the uid never reach another tenant
    """
    CREATE TABLE sandbox_uids (
        uid INTEGER PRIMARY KEY,
        tenant TEXT NOT NULL
    )
    """,
]

KEPT_ATTEMPT_ERRORS = 20  # failed attempts remembered per step: the newest


CONVERT_AT_START_MAX_BYTES = 1 << 30  # larger databases are not rebuilt at start (see connect)


def connect(
    path: Path,
    *,
    synchronous: str = "full",
    before_rebuild: Callable[[int], None] | None = None,
) -> sqlite3.Connection:
    """Open (creating and migrating) the state database. Autocommit; callers use `transaction`.

    `synchronous`: "full", SQLite syncs the WAL at every commit; "normal" and "acked", only
    before a checkpoint ("acked": the caller syncs with `sync_wal` when it must)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    conn.row_factory = sqlite3.Row
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        # INCREMENTAL, so retention can give freed pages back a few at a time. A new database
        # takes it here, before anything is written; an older one only with a rebuild (VACUUM,
        # needing its size again in free disk), done here up to CONVERT_AT_START_MAX_BYTES.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            size = path.stat().st_size
            if size <= CONVERT_AT_START_MAX_BYTES:
                if before_rebuild is not None:
                    before_rebuild(size)
                conn.execute("VACUUM")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    path.chmod(0o600)
    migrate(conn)
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        with transaction(conn):
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")


def sync_wal(path: Path) -> None:
    """Make every transaction committed so far durable: fsync the write-ahead log, which is what
    `synchronous = FULL` does at each commit (checkpoints sync it themselves)."""
    try:
        fd = os.open(f"{path}-wal", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # no log at all: every commit is in the (synced) database file
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, retried on `database is locked` at BEGIN."""
    for attempt in range(50):
        try:
            conn.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 49:
                raise
            time.sleep(0.01)
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def encode_error(err: ErrorInfo | None) -> str | None:
    return None if err is None else _error_encoder.encode(err).decode()


def decode_error(text: str | None) -> ErrorInfo | None:
    return None if text is None else _error_decoder.decode(text)


# ---------------------------------------------------------------- tenants and code


def ensure_tenant(conn: sqlite3.Connection, tenant: str, now: float) -> None:
    conn.execute(
        "INSERT INTO tenants (name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING", (tenant, now)
    )


def tenant_exists(conn: sqlite3.Connection, tenant: str) -> bool:
    """A tenant exists once it has deployed code successfully."""
    row = conn.execute("SELECT 1 FROM deployments WHERE tenant = ? LIMIT 1", (tenant,))
    return row.fetchone() is not None


def tenant_number(conn: sqlite3.Connection, tenant: str) -> int:
    """A small, stable number per tenant (its rowid): the basis of its sandbox group id."""
    row = conn.execute("SELECT rowid FROM tenants WHERE name = ?", (tenant,)).fetchone()
    return 0 if row is None else int(row[0])


def uid_owners(conn: sqlite3.Connection) -> dict[int, str]:
    return {int(r[0]): str(r[1]) for r in conn.execute("SELECT uid, tenant FROM sandbox_uids")}


def claim_uid(conn: sqlite3.Connection, uid: int, tenant: str) -> None:
    conn.execute("INSERT INTO sandbox_uids (uid, tenant) VALUES (?, ?)", (uid, tenant))


def tenant_names(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM tenants ORDER BY name")]


def get_code(conn: sqlite3.Connection, tenant: str, version: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute(
        "SELECT * FROM code_versions WHERE tenant = ? AND hash = ?", (tenant, version)
    ).fetchone()
    return row


def put_code(
    conn: sqlite3.Connection,
    tenant: str,
    version: str,
    kind: str,
    filename: str,
    code: bytes,
    workflows: list[str],
    now: float,
) -> None:
    """Store an immutable code version; a second put of the same hash changes nothing."""
    conn.execute(
        "INSERT INTO code_versions (tenant, hash, kind, filename, code, workflows, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (tenant, version, kind, filename, code, ",".join(workflows), now),
    )


def set_deployment(
    conn: sqlite3.Connection, tenant: str, workflow: str, version: str, now: float
) -> None:
    conn.execute(
        "INSERT INTO deployments (tenant, workflow, version, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (tenant, workflow) DO UPDATE SET version = excluded.version,"
        " updated_at = excluded.updated_at",
        (tenant, workflow, version, now),
    )


def get_deployment(conn: sqlite3.Connection, tenant: str, workflow: str) -> str | None:
    row = conn.execute(
        "SELECT version FROM deployments WHERE tenant = ? AND workflow = ?", (tenant, workflow)
    ).fetchone()
    return None if row is None else str(row[0])


# ---------------------------------------------------------------- instances


def get_instance(conn: sqlite3.Connection, tenant: str, instance: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute(
        "SELECT * FROM instances WHERE tenant = ? AND id = ?", (tenant, instance)
    ).fetchone()
    return row


def count_live_instances(conn: sqlite3.Connection, tenant: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM instances WHERE tenant = ?"
        " AND status NOT IN ('complete', 'errored', 'terminated')",
        (tenant,),
    ).fetchone()
    return int(row[0])


def insert_instance(
    conn: sqlite3.Connection,
    tenant: str,
    instance: str,
    workflow: str,
    version: str,
    params: bytes,
    now: float,
    status: str,
) -> bool:
    """Create an instance, due now. False when the id is already taken (the row is left
    untouched)."""
    cur = conn.execute(
        "INSERT INTO instances (tenant, id, workflow, version, status, params, wake_at,"
        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        (tenant, instance, workflow, version, status, params, now, now, now),
    )
    return cur.rowcount == 1


def list_instances(
    conn: sqlite3.Connection,
    tenant: str,
    status: str | None,
    limit: int,
    inline_bytes: int = 1 << 62,
) -> list[sqlite3.Row]:
    """A tenant's instances, oldest first. An output longer than `inline_bytes` is left out
    (NULL; `output_bytes` says its size), so a listing never reads every instance's megabyte."""
    cols = (
        "tenant, id, workflow, version, status, error, created_at, updated_at, wake_at, steps, "
        "activations, LENGTH(output) AS output_bytes, "
        "CASE WHEN LENGTH(output) <= :inline THEN output END AS output"
    )
    where = "tenant = :tenant" + ("" if status is None else " AND status = :status")
    sql = f"SELECT {cols} FROM instances WHERE {where} ORDER BY created_at, id LIMIT :limit"
    args = {"tenant": tenant, "status": status, "limit": limit, "inline": inline_bytes}
    return conn.execute(sql, args).fetchall()


def update_instance(conn: sqlite3.Connection, tenant: str, instance: str, **fields: Any) -> None:
    cols = ", ".join(f"{name} = ?" for name in fields)
    conn.execute(
        f"UPDATE instances SET {cols} WHERE tenant = ? AND id = ?",
        (*fields.values(), tenant, instance),
    )


def delete_instance(conn: sqlite3.Connection, tenant: str, instance: str) -> None:
    """The instance with its journal, events and activation records (usage stays)."""
    args = (tenant, instance)
    conn.execute("DELETE FROM journal WHERE tenant = ? AND instance = ?", args)
    conn.execute("DELETE FROM attempt_errors WHERE tenant = ? AND instance = ?", args)
    conn.execute("DELETE FROM events WHERE tenant = ? AND instance = ?", args)
    conn.execute("DELETE FROM activations WHERE tenant = ? AND instance = ?", args)
    conn.execute("DELETE FROM instances WHERE tenant = ? AND id = ?", args)


def expired_instances(
    conn: sqlite3.Connection, tenant: str, finished_before: float, limit: int
) -> list[str]:
    """Finished instances of the tenant last updated before `finished_before`, oldest first."""
    rows = conn.execute(
        "SELECT id FROM instances WHERE tenant = ? AND updated_at < ? "
        "AND status IN ('complete', 'errored', 'terminated') ORDER BY updated_at LIMIT ?",
        (tenant, finished_before, limit),
    )
    return [r[0] for r in rows]


def delete_inspections(
    conn: sqlite3.Connection, tenant: str, launched_before: float, limit: int
) -> int:
    """Records of deploy-check activations (no instance) launched before the cutoff."""
    cur = conn.execute(
        "DELETE FROM activations WHERE id IN (SELECT id FROM activations WHERE tenant = ? "
        "AND instance IS NULL AND launched_at < ? AND finished_at IS NOT NULL "
        "ORDER BY launched_at LIMIT ?)",
        (tenant, launched_before, limit),
    )
    return cur.rowcount


def is_incremental(conn: sqlite3.Connection) -> bool:
    return bool(conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2)


def incremental_vacuum(conn: sqlite3.Connection, pages: int) -> None:
    """Give up to `pages` free pages back to the file system. Outside a transaction: the
    pragma frees one page per step, and only executescript steps it to the end."""
    assert not conn.in_transaction
    conn.executescript(f"PRAGMA incremental_vacuum({int(pages)});")


def reset_instance(
    conn: sqlite3.Connection, tenant: str, instance: str, now: float, status: str
) -> None:
    """Restart from scratch: drop the journal and consumed events, keep params and pinned code."""
    args = (tenant, instance)
    conn.execute("DELETE FROM journal WHERE tenant = ? AND instance = ?", args)
    conn.execute("DELETE FROM attempt_errors WHERE tenant = ? AND instance = ?", args)
    conn.execute(
        "DELETE FROM events WHERE tenant = ? AND instance = ? AND consumed_seq IS NOT NULL", args
    )
    update_instance(
        conn,
        tenant,
        instance,
        status=status,
        output=None,
        error=None,
        wake_at=now,
        lease=None,
        pause_requested=0,
        failures=0,
        steps=0,
        updated_at=now,
    )


# ---------------------------------------------------------------- scheduling


def due_instances(conn: sqlite3.Connection, tenant: str, now: float, limit: int) -> list[str]:
    """Ids of the tenant's unleased instances whose wake time has come, oldest first."""
    rows = conn.execute(
        "SELECT id FROM instances WHERE tenant = ? AND wake_at IS NOT NULL AND lease IS NULL"
        " AND wake_at <= ? ORDER BY wake_at LIMIT ?",
        (tenant, now, limit),
    )
    return [r[0] for r in rows]


def next_wake(conn: sqlite3.Connection) -> float | None:
    row = conn.execute(
        "SELECT min(wake_at) FROM instances WHERE wake_at IS NOT NULL AND lease IS NULL"
    ).fetchone()
    return None if row[0] is None else float(row[0])


def leased_instances(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM instances WHERE lease IS NOT NULL").fetchall()


# ---------------------------------------------------------------- journal entries


def journal_rows(conn: sqlite3.Connection, tenant: str, instance: str) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT * FROM journal WHERE tenant = ? AND instance = ? ORDER BY seq", (tenant, instance)
    ).fetchall()


def last_entry(conn: sqlite3.Connection, tenant: str, instance: str) -> sqlite3.Row | None:
    """The newest journal entry (one index probe: no need to read the whole journal)."""
    row: sqlite3.Row | None = conn.execute(
        "SELECT * FROM journal WHERE tenant = ? AND instance = ? ORDER BY seq DESC LIMIT 1",
        (tenant, instance),
    ).fetchone()
    return row


def state_bytes(conn: sqlite3.Connection, tenant: str, instance: str) -> int:
    """What the instance's journal carries in step results (and the errors kept with them)."""
    row = conn.execute(
        "SELECT COALESCE(SUM(LENGTH(result)), 0) + COALESCE(SUM(LENGTH(error)), 0) FROM journal "
        "WHERE tenant = ? AND instance = ?",
        (tenant, instance),
    ).fetchone()
    return int(row[0])


def journal_entries(conn: sqlite3.Connection, tenant: str, instance: str) -> list[JournalEntry]:
    """The journal as replay sees it."""
    return [
        JournalEntry(
            seq=r["seq"],
            kind=r["kind"],
            name=r["name"],
            status=r["status"],
            attempts=r["attempts"],
            result=r["result"],
            error=decode_error(r["error"]),
            until=r["until"],
        )
        for r in conn.execute(
            "SELECT seq, kind, name, status, attempts, result, error, until FROM journal"
            " WHERE tenant = ? AND instance = ? ORDER BY seq",
            (tenant, instance),
        )
    ]


def get_entry(conn: sqlite3.Connection, tenant: str, instance: str, seq: int) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute(
        "SELECT * FROM journal WHERE tenant = ? AND instance = ? AND seq = ?",
        (tenant, instance, seq),
    ).fetchone()
    return row


def journal_length(conn: sqlite3.Connection, tenant: str, instance: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM journal WHERE tenant = ? AND instance = ?", (tenant, instance)
    ).fetchone()
    return int(row[0])


def upsert_entry(
    conn: sqlite3.Connection, tenant: str, instance: str, seq: int, **fields: Any
) -> None:
    """Update the given fields of the entry at `seq`, inserting it when it does not exist yet.

    (Not `INSERT ... ON CONFLICT`: SQLite checks NOT NULL on the insert half before the conflict.)
    """
    cols = ", ".join(f"{name} = ?" for name in fields)
    cur = conn.execute(
        f"UPDATE journal SET {cols} WHERE tenant = ? AND instance = ? AND seq = ?",
        (*fields.values(), tenant, instance, seq),
    )
    if cur.rowcount == 0:
        names = ["tenant", "instance", "seq", *fields]
        conn.execute(
            f"INSERT INTO journal ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
            (tenant, instance, seq, *fields.values()),
        )


def add_attempt_error(
    conn: sqlite3.Connection,
    tenant: str,
    instance: str,
    seq: int,
    attempt: int,
    err: ErrorInfo,
    now: float,
) -> None:
    """Remember why attempt `attempt` of the step at `seq` failed; forget the oldest beyond
    KEPT_ATTEMPT_ERRORS."""
    conn.execute(
        "INSERT OR REPLACE INTO attempt_errors (tenant, instance, seq, attempt, error, failed_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (tenant, instance, seq, attempt, encode_error(err), now),
    )
    conn.execute(
        "DELETE FROM attempt_errors WHERE tenant = ? AND instance = ? AND seq = ? AND attempt <= ?",
        (tenant, instance, seq, attempt - KEPT_ATTEMPT_ERRORS),
    )


def attempt_errors(conn: sqlite3.Connection, tenant: str, instance: str) -> list[sqlite3.Row]:
    """Every remembered failed attempt of the instance's steps, by seq and attempt."""
    return conn.execute(
        "SELECT seq, attempt, error, failed_at FROM attempt_errors"
        " WHERE tenant = ? AND instance = ? ORDER BY seq, attempt",
        (tenant, instance),
    ).fetchall()


# ---------------------------------------------------------------- events


def add_event(
    conn: sqlite3.Connection, tenant: str, instance: str, type_: str, payload: bytes, now: float
) -> int:
    cur = conn.execute(
        "INSERT INTO events (tenant, instance, type, payload, created_at) VALUES (?, ?, ?, ?, ?)",
        (tenant, instance, type_, payload, now),
    )
    return int(cur.lastrowid or 0)


def consume_event(
    conn: sqlite3.Connection,
    tenant: str,
    instance: str,
    type_: str,
    seq: int,
    before: float | None = None,
) -> sqlite3.Row | None:
    """Take the oldest unconsumed event of `type_` (sent no later than `before`), or None."""
    row: sqlite3.Row | None = conn.execute(
        "SELECT id, type, payload, created_at FROM events WHERE tenant = ? AND instance = ?"
        " AND type = ? AND consumed_seq IS NULL AND created_at <= ? ORDER BY id LIMIT 1",
        (tenant, instance, type_, float("inf") if before is None else before),
    ).fetchone()
    if row is not None:
        conn.execute("UPDATE events SET consumed_seq = ? WHERE id = ?", (seq, row["id"]))
    return row


# ---------------------------------------------------------------- activations


def insert_activation(
    conn: sqlite3.Connection, tenant: str, instance: str | None, kind: str, now: float
) -> int:
    cur = conn.execute(
        "INSERT INTO activations (tenant, instance, kind, launched_at) VALUES (?, ?, ?, ?)",
        (tenant, instance, kind, now),
    )
    return int(cur.lastrowid or 0)


def update_activation(conn: sqlite3.Connection, activation: int, **fields: Any) -> None:
    cols = ", ".join(f"{name} = ?" for name in fields)
    conn.execute(f"UPDATE activations SET {cols} WHERE id = ?", (*fields.values(), activation))


def open_activations(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM activations WHERE finished_at IS NULL").fetchall()


def instance_activations(conn: sqlite3.Connection, tenant: str, instance: str) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT * FROM activations WHERE tenant = ? AND instance = ? ORDER BY id",
        (tenant, instance),
    ).fetchall()


# ---------------------------------------------------------------- usage and counts


def add_usage(
    conn: sqlite3.Connection,
    tenant: str,
    launched_at: float,
    *,
    step: bool,
    failed: bool,
    cpu_ms: float,
    wall_ms: float,
    max_rss_kib: int,
    scratch_kib: int = 0,
) -> None:
    """Count one reaped activation in its tenant's hour (by launch time, UTC)."""
    conn.execute(
        """
        INSERT INTO usage VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (tenant, hour) DO UPDATE SET
            activations = activations + 1,
            steps = steps + excluded.steps,
            failures = failures + excluded.failures,
            cpu_ms = cpu_ms + excluded.cpu_ms,
            wall_ms = wall_ms + excluded.wall_ms,
            memory_peak_kib = MAX(memory_peak_kib, excluded.memory_peak_kib),
            memory_sum_kib = memory_sum_kib + excluded.memory_sum_kib,
            memory_kib_s = memory_kib_s + excluded.memory_kib_s,
            scratch_max_kib = MAX(scratch_max_kib, excluded.scratch_max_kib)
        """,
        (
            tenant,
            int(launched_at // 3600) * 3600,
            int(step),
            int(failed),
            cpu_ms,
            wall_ms,
            max_rss_kib,
            max_rss_kib,
            max_rss_kib * wall_ms / 1000.0,
            scratch_kib,
        ),
    )


def usage(
    conn: sqlite3.Connection, tenant: str | None, since: float | None, *, hourly: bool
) -> list[sqlite3.Row]:
    """Usage summed per tenant (per tenant and hour when `hourly`) from the hour holding
    `since` on."""
    group = "tenant, hour" if hourly else "tenant"
    sql = f"""
        SELECT tenant, {"hour" if hourly else "MIN(hour)"} AS hour, MAX(hour) AS last_hour,
               SUM(activations) AS activations, SUM(steps) AS steps, SUM(failures) AS failures,
               SUM(cpu_ms) AS cpu_ms, SUM(wall_ms) AS wall_ms,
               MAX(memory_peak_kib) AS memory_peak_kib, SUM(memory_sum_kib) AS memory_sum_kib,
               SUM(memory_kib_s) AS memory_kib_s, MAX(scratch_max_kib) AS scratch_max_kib
        FROM usage WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR hour >= ?2)
        GROUP BY {group} ORDER BY {group}
    """
    first_hour = None if since is None else int(since // 3600) * 3600
    return conn.execute(sql, (tenant, first_hour)).fetchall()


def instance_counts(conn: sqlite3.Connection, tenant: str | None) -> dict[str, dict[str, int]]:
    """tenant → status → number of instances (an index-only scan), of one tenant or all."""
    out: dict[str, dict[str, int]] = {}
    if tenant is None:
        rows = conn.execute("SELECT tenant, status, COUNT(*) FROM instances GROUP BY 1, 2")
    else:  # a range of the (tenant, status, created_at) index
        sql = "SELECT tenant, status, COUNT(*) FROM instances WHERE tenant = ? GROUP BY 1, 2"
        rows = conn.execute(sql, (tenant,))
    for row in rows:
        out.setdefault(row[0], {})[row[1]] = row[2]
    return out


# ---------------------------------------------------------------- remote API keys


def add_key(conn: sqlite3.Connection, public: str, tenant: str | None, now: float) -> None:
    conn.execute(
        "INSERT INTO api_keys (public, tenant, created_at) VALUES (?, ?, ?)", (public, tenant, now)
    )


def revoke_key(conn: sqlite3.Connection, public: str, now: float) -> bool:
    cur = conn.execute(
        "UPDATE api_keys SET revoked_at = ? WHERE public = ? AND revoked_at IS NULL", (now, public)
    )
    return cur.rowcount == 1


def api_keys(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM api_keys ORDER BY created_at, public").fetchall()
