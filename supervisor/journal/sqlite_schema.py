"""The embedded database's schema: SQLite migrations (numbered by `PRAGMA user_version`) and how
a connection is opened: WAL, synchronous, busy timeout, incremental vacuum."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from supervisor.journal.db import SqliteDb, open_sqlite

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
    # 10: supervisor nodes sharing the database, and the node that runs each activation (an
    # instance's lease is an activation id, so its node is the activation's). Rows from before
    # have no node: the first node to start takes them as its own.
    """
    CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        state_dir TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        fenced_at REAL,
        stopped_at REAL
    );
    ALTER TABLE activations ADD COLUMN node TEXT;
    CREATE INDEX activations_node_open ON activations (node) WHERE finished_at IS NULL;
    CREATE INDEX instances_tenant_leased ON instances (tenant) WHERE lease IS NOT NULL
    """,
    # 11: instances by pinned code version, for `stepvisor workflows` and upgrades
    """
    CREATE INDEX instances_version ON instances (tenant, version, status)
    """,
    # 12: child workflows. A journal entry of kind 'invoke' names its child instance; a child
    # names its parent and the seq waiting for it. SQLite cannot alter a CHECK constraint, so
    # the journal is rebuilt.
    """
    CREATE TABLE journal_v12 (
        tenant TEXT NOT NULL,
        instance TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('step', 'sleep', 'wait_event', 'invoke')),
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
        child TEXT,
        PRIMARY KEY (tenant, instance, seq)
    );
    INSERT INTO journal_v12 (
        tenant, instance, seq, kind, name, status, attempts, result, error, until,
        event_type, retry_limit, retry_delay_s, backoff, timeout_s, started_at, finished_at,
        duration_ms
    ) SELECT
        tenant, instance, seq, kind, name, status, attempts, result, error, until,
        event_type, retry_limit, retry_delay_s, backoff, timeout_s, started_at, finished_at,
        duration_ms
    FROM journal;
    DROP TABLE journal;
    ALTER TABLE journal_v12 RENAME TO journal;
    ALTER TABLE instances ADD COLUMN parent TEXT;
    ALTER TABLE instances ADD COLUMN parent_seq INTEGER;
    CREATE INDEX instances_parent ON instances (tenant, parent) WHERE parent IS NOT NULL
    """,
    # 13: when a prepared activation (launched ahead, see supervisor/prepared.py) was given its
    # step; NULL for one launched for its step
    """
    ALTER TABLE activations ADD COLUMN bound_at REAL
    """,
    # 14: fewer indexes on the rows every activation writes several times (each index an
    # activation's write enters or leaves is one more page per commit): open activations are
    # found by `activations_node_open` alone; inspections by `activations_instance`; leased
    # instances by one index, not two
    """
    DROP INDEX activations_open;
    DROP INDEX activations_inspections;
    DROP INDEX instances_leased;
    DROP INDEX instances_tenant_leased;
    CREATE INDEX instances_leased ON instances (tenant, lease) WHERE lease IS NOT NULL
    """,
]

CONVERT_AT_START_MAX_BYTES = 1 << 30  # larger databases are not rebuilt at start (see connect)


def connect(
    path: Path,
    *,
    synchronous: str = "full",
    before_rebuild: Callable[[int], None] | None = None,
) -> SqliteDb:
    """Open (creating and migrating) the state database. Autocommit; callers use `transaction`.

    `synchronous`: "full", SQLite syncs the WAL at every commit; "normal" and "acked", only
    before a checkpoint ("acked": the caller syncs with `Db.sync` when it must)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    conn = open_sqlite(path)
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


def memory() -> SqliteDb:
    """A private in-memory database with the current schema (`stepvisor.testing`'s journal)."""
    conn = open_sqlite(Path(":memory:"))
    conn.execute("PRAGMA foreign_keys=ON")
    migrate(conn)
    return conn


def migrate(conn: SqliteDb) -> None:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        with conn.transaction():
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")


def is_incremental(conn: SqliteDb) -> bool:
    return bool(conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2)


def incremental_vacuum(conn: SqliteDb, pages: int) -> None:
    """Give up to `pages` free pages back to the file system. Outside a transaction: the
    pragma frees one page per step, and only executescript steps it to the end."""
    assert not conn.in_transaction
    conn.executescript(f"PRAGMA incremental_vacuum({int(pages)});")
