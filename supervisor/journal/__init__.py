"""All SQL of stepvisor: every read and write of durable state, on SQLite or PostgreSQL.

The supervisor's loop owns one `Db` and wraps each loop iteration in one transaction (group
commit); every function here runs inside that transaction and never commits. Each statement is
written once, in SQL both databases speak (`db.py` says how); the schemas and migrations of the two
live in `sqlite_schema` and `pg_schema`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import msgspec

from protocol.messages import ErrorInfo, JournalEntry
from supervisor.journal import pg_schema, sqlite_schema
from supervisor.journal.db import (
    CONNECTION_LOST,
    CONTENDED,
    Db,
    IntegrityError,
    Row,
    SqliteDb,
    is_postgres,
    safe_url,
)
from supervisor.journal.sqlite_schema import MIGRATIONS

# Re-exported: what callers use of db.py and sqlite_schema through `journal`.
__all__ = [
    "CONNECTION_LOST",
    "CONTENDED",
    "MIGRATIONS",
    "Db",
    "IntegrityError",
    "Row",
    "connect",
    "is_postgres",
    "safe_url",
    "transaction",
]

_error_encoder = msgspec.json.Encoder()
_error_decoder = msgspec.json.Decoder(ErrorInfo)

KEPT_ATTEMPT_ERRORS = 20  # failed attempts remembered per step: the newest
TENANT_LOCKS = 0x5354_4554  # advisory lock class of the per-tenant locks
RETENTION_LOCK = 0x5354_4552  # advisory lock class of the retention pass
WAKE_CHANNEL = "stepvisor_wake"  # LISTEN/NOTIFY channel: work may be due
KILL_CHANNEL = "stepvisor_kill"  # payload: an activation id an operator stopped


def connect(
    database: Path | str,
    *,
    synchronous: str = "full",
    before_rebuild: Callable[[int], None] | None = None,
    lease_s: float = 10.0,
) -> Db:
    """Open (creating and migrating) the state database: a PostgreSQL URL, else a SQLite path.
    Autocommit; callers use `transaction`."""
    if isinstance(database, str) and is_postgres(database):
        return pg_schema.connect(database, lease_s)
    return sqlite_schema.connect(
        Path(database), synchronous=synchronous, before_rebuild=before_rebuild
    )


def transaction(conn: Db) -> AbstractContextManager[Db]:
    """One write transaction (on SQLite `BEGIN IMMEDIATE`, retried while the file is locked).
    The backend's own context manager: the loop opens one every iteration."""
    cm: AbstractContextManager[Db] = conn.transaction()
    return cm


def is_incremental(conn: Db) -> bool:
    """Whether retention's freed space goes back to the file system (PostgreSQL: autovacuum)."""
    return not isinstance(conn, SqliteDb) or sqlite_schema.is_incremental(conn)


def give_back_space(conn: Db, pages: int) -> None:
    """After retention deleted rows: SQLite returns up to `pages` free pages to the file system;
    PostgreSQL's autovacuum does that work itself."""
    if isinstance(conn, SqliteDb):
        sqlite_schema.incremental_vacuum(conn, pages)


def encode_error(err: ErrorInfo | None) -> str | None:
    return None if err is None else _error_encoder.encode(err).decode()


def decode_error(text: str | None) -> ErrorInfo | None:
    return None if text is None else _error_decoder.decode(text)


# ---------------------------------------------------------------- tenants and code


def ensure_tenant(conn: Db, tenant: str, now: float) -> None:
    conn.execute(
        "INSERT INTO tenants (name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING", (tenant, now)
    )


def tenant_exists(conn: Db, tenant: str) -> bool:
    """A tenant exists once it has deployed code successfully."""
    row = conn.execute("SELECT 1 FROM deployments WHERE tenant = ? LIMIT 1", (tenant,))
    return row.fetchone() is not None


def tenant_number(conn: Db, tenant: str) -> int:
    """A small, stable number per tenant (SQLite's rowid, PostgreSQL's identity column): the
    basis of its sandbox group id."""
    column = "rowid" if conn.dialect == "sqlite" else "number"
    row = conn.execute(f"SELECT {column} FROM tenants WHERE name = ?", (tenant,)).fetchone()
    return 0 if row is None else int(row[0])


def uid_owners(conn: Db) -> dict[int, str]:
    return {int(r[0]): str(r[1]) for r in conn.execute("SELECT uid, tenant FROM sandbox_uids")}


def claim_uid(conn: Db, uid: int, tenant: str) -> str:
    """Give `uid` to `tenant` for good, unless a tenant has it already (another node's claim):
    the uid's owner either way."""
    conn.execute(
        "INSERT INTO sandbox_uids (uid, tenant) VALUES (?, ?) ON CONFLICT DO NOTHING", (uid, tenant)
    )
    return str(conn.execute("SELECT tenant FROM sandbox_uids WHERE uid = ?", (uid,)).fetchone()[0])


def tenant_names(conn: Db) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM tenants ORDER BY name")]


def get_code(conn: Db, tenant: str, version: str) -> Row | None:
    row: Row | None = conn.execute(
        "SELECT * FROM code_versions WHERE tenant = ? AND hash = ?", (tenant, version)
    ).fetchone()
    return row


def put_code(
    conn: Db,
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


def set_deployment(conn: Db, tenant: str, workflow: str, version: str, now: float) -> None:
    conn.execute(
        "INSERT INTO deployments (tenant, workflow, version, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (tenant, workflow) DO UPDATE SET version = excluded.version,"
        " updated_at = excluded.updated_at",
        (tenant, workflow, version, now),
    )


def get_deployment(conn: Db, tenant: str, workflow: str) -> str | None:
    row = conn.execute(
        "SELECT version FROM deployments WHERE tenant = ? AND workflow = ?", (tenant, workflow)
    ).fetchone()
    return None if row is None else str(row[0])


# ---------------------------------------------------------------- instances


def get_instance(conn: Db, tenant: str, instance: str) -> Row | None:
    row: Row | None = conn.execute(
        "SELECT * FROM instances WHERE tenant = ? AND id = ?", (tenant, instance)
    ).fetchone()
    return row


def count_live_instances(conn: Db, tenant: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM instances WHERE tenant = ?"
        " AND status NOT IN ('complete', 'errored', 'terminated')",
        (tenant,),
    ).fetchone()
    return int(row[0])


LIVE_STATUSES = ("queued", "running", "paused", "waiting")


def instances_to_check(
    conn: Db,
    tenant: str,
    workflows: list[str],
    limit: int,
    *,
    finished_since: float | None = None,
    other_than_version: str | None = None,
) -> list[Row]:
    """Instances of `workflows` a compatibility check replays: in-flight ones, oldest first,
    then (with `finished_since`) those that finished since then, newest first; at most `limit`.
    One index-ordered query per status, so a tenant's millions of instances are never sorted."""
    if not workflows:
        return []
    cols = "id, workflow, version, status, params, created_at"
    marks = ", ".join("?" * len(workflows))
    where = f"tenant = ? AND workflow IN ({marks})"
    args: list[Any] = [tenant, *workflows]
    if other_than_version is not None:
        where += " AND version <> ?"
        args.append(other_than_version)
    rows: list[Row] = []
    for status in LIVE_STATUSES:
        rows += conn.execute(
            f"SELECT {cols} FROM instances WHERE {where} AND status = ?"
            " ORDER BY created_at LIMIT ?",
            (*args, status, limit),
        ).fetchall()
    rows = sorted(rows, key=lambda r: (r["created_at"], r["id"]))[:limit]
    if finished_since is not None and len(rows) < limit:
        rows += conn.execute(
            f"SELECT {cols} FROM instances WHERE {where}"
            " AND status IN ('complete', 'errored', 'terminated') AND updated_at >= ?"
            " ORDER BY updated_at DESC LIMIT ?",
            (*args, finished_since, limit - len(rows)),
        ).fetchall()
    return rows


def code_versions(conn: Db, tenant: str) -> list[Row]:
    """Every version of the tenant's code, newest first, with the live and all instances
    pinned to it."""
    return conn.execute(
        "SELECT c.hash, c.kind, c.filename, c.workflows, c.created_at, LENGTH(c.code) AS bytes,"
        " (SELECT count(*) FROM instances i WHERE i.tenant = c.tenant AND i.version = c.hash"
        "   AND i.status NOT IN ('complete', 'errored', 'terminated')) AS live,"
        " (SELECT count(*) FROM instances i WHERE i.tenant = c.tenant AND i.version = c.hash)"
        "   AS pinned"
        " FROM code_versions c WHERE c.tenant = ? ORDER BY c.created_at DESC, c.hash",
        (tenant,),
    ).fetchall()


def deployments(conn: Db, tenant: str) -> list[Row]:
    """The version each of the tenant's workflows is deployed at."""
    return conn.execute(
        "SELECT workflow, version, updated_at FROM deployments WHERE tenant = ? ORDER BY workflow",
        (tenant,),
    ).fetchall()


def insert_instance(
    conn: Db,
    tenant: str,
    instance: str,
    workflow: str,
    version: str,
    params: bytes,
    now: float,
    status: str,
    parent: tuple[str, int] | None = None,
) -> bool:
    """Create an instance, due now; `parent`: the instance and seq waiting for it. False when
    the id is already taken (the row is left untouched)."""
    parent_id, parent_seq = parent or (None, None)
    cur = conn.execute(
        "INSERT INTO instances (tenant, id, workflow, version, status, params, wake_at,"
        " created_at, updated_at, parent, parent_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        (tenant, instance, workflow, version, status, params, now, now, now, parent_id, parent_seq),
    )
    return cur.rowcount == 1


def live_children(conn: Db, tenant: str, instance: str, from_seq: int = 0) -> list[Row]:
    """The instance's children still running, started at `from_seq` or later."""
    return conn.execute(
        "SELECT * FROM instances WHERE tenant = ? AND parent = ? AND parent_seq >= ?"
        " AND status NOT IN ('complete', 'errored', 'terminated') ORDER BY created_at, id",
        (tenant, instance, from_seq),
    ).fetchall()


def list_instances(
    conn: Db,
    tenant: str,
    status: str | None,
    limit: int,
    inline_bytes: int = 1 << 62,
) -> list[Row]:
    """A tenant's instances, oldest first. An output longer than `inline_bytes` is left out
    (NULL; `output_bytes` says its size), so a listing never reads every instance's megabyte."""
    cols = (
        "tenant, id, workflow, version, status, error, created_at, updated_at, wake_at, steps, "
        "activations, parent, LENGTH(output) AS output_bytes, "
        "CASE WHEN LENGTH(output) <= :inline THEN output END AS output"
    )
    where = "tenant = :tenant" + ("" if status is None else " AND status = :status")
    sql = f"SELECT {cols} FROM instances WHERE {where} ORDER BY created_at, id LIMIT :limit"
    args = {"tenant": tenant, "status": status, "limit": limit, "inline": inline_bytes}
    return conn.execute(sql, args).fetchall()


def update_instance(conn: Db, tenant: str, instance: str, **fields: Any) -> None:
    cols = ", ".join(f"{name} = ?" for name in fields)
    conn.execute(
        f"UPDATE instances SET {cols} WHERE tenant = ? AND id = ?",
        (*fields.values(), tenant, instance),
    )


def delete_instance(conn: Db, tenant: str, instance: str) -> None:
    """The instance with its journal, events and activation records (usage stays)."""
    args = (tenant, instance)
    conn.execute("DELETE FROM journal WHERE tenant = ? AND instance = ?", args)
    conn.execute("DELETE FROM attempt_errors WHERE tenant = ? AND instance = ?", args)
    conn.execute("DELETE FROM events WHERE tenant = ? AND instance = ?", args)
    conn.execute("DELETE FROM activations WHERE tenant = ? AND instance = ?", args)
    conn.execute("DELETE FROM instances WHERE tenant = ? AND id = ?", args)


def expired_instances(conn: Db, tenant: str, finished_before: float, limit: int) -> list[str]:
    """Finished instances of the tenant last updated before `finished_before`, oldest first."""
    rows = conn.execute(
        "SELECT id FROM instances WHERE tenant = ? AND updated_at < ? "
        "AND status IN ('complete', 'errored', 'terminated') ORDER BY updated_at LIMIT ?",
        (tenant, finished_before, limit),
    )
    return [r[0] for r in rows]


def delete_inspections(conn: Db, tenant: str, launched_before: float, limit: int) -> int:
    """Records of deploy-check activations (no instance) launched before the cutoff."""
    cur = conn.execute(
        "DELETE FROM activations WHERE id IN (SELECT id FROM activations WHERE tenant = ? "
        "AND instance IS NULL AND launched_at < ? AND finished_at IS NOT NULL "
        "ORDER BY launched_at LIMIT ?)",
        (tenant, launched_before, limit),
    )
    return cur.rowcount


def reset_instance(
    conn: Db, tenant: str, instance: str, now: float, status: str, from_seq: int = 0
) -> None:
    """Restart from `from_seq` (0: from scratch): drop the journal from there on and the events
    its waits consumed; keep what came before, the params and the pinned code."""
    args = (tenant, instance, from_seq)
    conn.execute("DELETE FROM journal WHERE tenant = ? AND instance = ? AND seq >= ?", args)
    conn.execute("DELETE FROM attempt_errors WHERE tenant = ? AND instance = ? AND seq >= ?", args)
    conn.execute("DELETE FROM events WHERE tenant = ? AND instance = ? AND consumed_seq >= ?", args)
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
        steps=from_seq,
        updated_at=now,
    )


# ---------------------------------------------------------------- scheduling


def due_instances(conn: Db, tenant: str, now: float, limit: int) -> list[str]:
    """Ids of the tenant's unleased instances whose wake time has come, oldest first. On
    PostgreSQL the rows stay locked until the transaction ends and rows another node has locked
    are skipped: no two nodes claim one instance."""
    claim = " FOR UPDATE SKIP LOCKED" if conn.dialect == "postgresql" else ""
    rows = conn.execute(
        "SELECT id FROM instances WHERE tenant = ? AND wake_at IS NOT NULL AND lease IS NULL"
        " AND wake_at <= ? ORDER BY wake_at LIMIT ?" + claim,
        (tenant, now, limit),
    )
    return [r[0] for r in rows]


def hold_lease(conn: Db, tenant: str, instance: str, activation: int) -> bool:
    """Whether activation `activation` still holds the instance; if so, nobody can take it from
    it before this transaction ends (the row is locked). The fence every commit of an
    activation's consequences passes: a node that lost its lease while paused finds out here."""
    cur = conn.execute(
        "UPDATE instances SET lease = lease WHERE tenant = ? AND id = ? AND lease = ?",
        (tenant, instance, activation),
    )
    return cur.rowcount == 1


def leased_elsewhere(conn: Db, tenant: str, node: str) -> int:
    """How many of the tenant's instances activations of other nodes hold."""
    row = conn.execute(
        "SELECT COUNT(*) FROM instances i JOIN activations a ON a.id = i.lease"
        " WHERE i.tenant = ? AND i.lease IS NOT NULL AND a.node <> ?",
        (tenant, node),
    ).fetchone()
    return int(row[0])


def next_wake(conn: Db) -> float | None:
    row = conn.execute(
        "SELECT min(wake_at) FROM instances WHERE wake_at IS NOT NULL AND lease IS NULL"
    ).fetchone()
    return None if row[0] is None else float(row[0])


def leased_instances(conn: Db, node: str) -> list[Row]:
    """Instances held by activations of `node` (or of no node: rows from before nodes)."""
    return conn.execute(
        "SELECT i.* FROM instances i LEFT JOIN activations a ON a.id = i.lease"
        " WHERE i.lease IS NOT NULL AND (a.node = ? OR a.node IS NULL)",
        (node,),
    ).fetchall()


# ---------------------------------------------------------------- journal entries


def journal_rows(conn: Db, tenant: str, instance: str) -> list[Row]:
    return conn.execute(
        "SELECT * FROM journal WHERE tenant = ? AND instance = ? ORDER BY seq", (tenant, instance)
    ).fetchall()


def last_entry(conn: Db, tenant: str, instance: str) -> Row | None:
    """The newest journal entry (one index probe: no need to read the whole journal)."""
    row: Row | None = conn.execute(
        "SELECT * FROM journal WHERE tenant = ? AND instance = ? ORDER BY seq DESC LIMIT 1",
        (tenant, instance),
    ).fetchone()
    return row


def state_bytes(conn: Db, tenant: str, instance: str) -> int:
    """What the instance's journal carries in step results (and the errors kept with them)."""
    row = conn.execute(
        "SELECT CAST(COALESCE(SUM(LENGTH(result)), 0) + COALESCE(SUM(LENGTH(error)), 0) AS BIGINT)"
        " FROM journal "
        "WHERE tenant = ? AND instance = ?",
        (tenant, instance),
    ).fetchone()
    return int(row[0])


def journal_entries(conn: Db, tenant: str, instance: str) -> list[JournalEntry]:
    """The journal as replay sees it. Rows are unpacked by position: an activation late in a
    long workflow reads every entry before it, and lookups by name cost a third of that."""
    return [
        JournalEntry(seq, kind, name, status, attempts, result, decode_error(error), until)
        for seq, kind, name, status, attempts, result, error, until in conn.execute(
            "SELECT seq, kind, name, status, attempts, result, error, until FROM journal"
            " WHERE tenant = ? AND instance = ? ORDER BY seq",
            (tenant, instance),
        )
    ]


def get_entry(conn: Db, tenant: str, instance: str, seq: int) -> Row | None:
    row: Row | None = conn.execute(
        "SELECT * FROM journal WHERE tenant = ? AND instance = ? AND seq = ?",
        (tenant, instance, seq),
    ).fetchone()
    return row


def first_entry_named(conn: Db, tenant: str, instance: str, name: str) -> int | None:
    """The seq of the first command called `name`, or None."""
    row = conn.execute(
        "SELECT MIN(seq) FROM journal WHERE tenant = ? AND instance = ? AND name = ?",
        (tenant, instance, name),
    ).fetchone()
    return None if row[0] is None else int(row[0])


def journal_length(conn: Db, tenant: str, instance: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM journal WHERE tenant = ? AND instance = ?", (tenant, instance)
    ).fetchone()
    return int(row[0])


def upsert_entry(conn: Db, tenant: str, instance: str, seq: int, **fields: Any) -> None:
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
    conn: Db,
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
        "INSERT INTO attempt_errors (tenant, instance, seq, attempt, error, failed_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, instance, seq, attempt)"
        " DO UPDATE SET error = excluded.error, failed_at = excluded.failed_at",
        (tenant, instance, seq, attempt, encode_error(err), now),
    )
    conn.execute(
        "DELETE FROM attempt_errors WHERE tenant = ? AND instance = ? AND seq = ? AND attempt <= ?",
        (tenant, instance, seq, attempt - KEPT_ATTEMPT_ERRORS),
    )


def attempt_errors(conn: Db, tenant: str, instance: str) -> list[Row]:
    """Every remembered failed attempt of the instance's steps, by seq and attempt."""
    return conn.execute(
        "SELECT seq, attempt, error, failed_at FROM attempt_errors"
        " WHERE tenant = ? AND instance = ? ORDER BY seq, attempt",
        (tenant, instance),
    ).fetchall()


# ---------------------------------------------------------------- events


def add_event(conn: Db, tenant: str, instance: str, type_: str, payload: bytes, now: float) -> int:
    cur = conn.execute(
        "INSERT INTO events (tenant, instance, type, payload, created_at) VALUES (?, ?, ?, ?, ?)"
        " RETURNING id",
        (tenant, instance, type_, payload, now),
    )
    return int(cur.fetchone()[0])


def consume_event(
    conn: Db,
    tenant: str,
    instance: str,
    type_: str,
    seq: int,
    before: float | None = None,
) -> Row | None:
    """Take the oldest unconsumed event of `type_` (sent no later than `before`), or None."""
    row: Row | None = conn.execute(
        "SELECT id, type, payload, created_at FROM events WHERE tenant = ? AND instance = ?"
        " AND type = ? AND consumed_seq IS NULL AND created_at <= ? ORDER BY id LIMIT 1",
        (tenant, instance, type_, float("inf") if before is None else before),
    ).fetchone()
    if row is not None:
        conn.execute("UPDATE events SET consumed_seq = ? WHERE id = ?", (seq, row["id"]))
    return row


# ---------------------------------------------------------------- activations


def insert_activation(
    conn: Db, tenant: str, instance: str | None, kind: str, now: float, node: str | None = None
) -> int:
    cur = conn.execute(
        "INSERT INTO activations (tenant, instance, kind, launched_at, node)"
        " VALUES (?, ?, ?, ?, ?) RETURNING id",
        (tenant, instance, kind, now, node),
    )
    return int(cur.fetchone()[0])


def update_activation(conn: Db, activation: int, **fields: Any) -> None:
    cols = ", ".join(f"{name} = ?" for name in fields)
    conn.execute(f"UPDATE activations SET {cols} WHERE id = ?", (*fields.values(), activation))


def open_activations(conn: Db, node: str) -> list[Row]:
    """Activations of `node` (or of no node: rows from before nodes) not finished."""
    return conn.execute(
        "SELECT * FROM activations WHERE finished_at IS NULL AND (node = ? OR node IS NULL)",
        (node,),
    ).fetchall()


def instance_activations(conn: Db, tenant: str, instance: str) -> list[Row]:
    return conn.execute(
        "SELECT * FROM activations WHERE tenant = ? AND instance = ? ORDER BY id",
        (tenant, instance),
    ).fetchall()


# ---------------------------------------------------------------- usage and counts


def add_usage(
    conn: Db,
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
            activations = usage.activations + 1,
            steps = usage.steps + excluded.steps,
            failures = usage.failures + excluded.failures,
            cpu_ms = usage.cpu_ms + excluded.cpu_ms,
            wall_ms = usage.wall_ms + excluded.wall_ms,
            memory_peak_kib = CASE WHEN usage.memory_peak_kib > excluded.memory_peak_kib
                THEN usage.memory_peak_kib ELSE excluded.memory_peak_kib END,
            memory_sum_kib = usage.memory_sum_kib + excluded.memory_sum_kib,
            memory_kib_s = usage.memory_kib_s + excluded.memory_kib_s,
            scratch_max_kib = CASE WHEN usage.scratch_max_kib > excluded.scratch_max_kib
                THEN usage.scratch_max_kib ELSE excluded.scratch_max_kib END
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


def usage(conn: Db, tenant: str | None, since: float | None, *, hourly: bool) -> list[Row]:
    """Usage summed per tenant (per tenant and hour when `hourly`) from the hour holding
    `since` on."""
    group = "tenant, hour" if hourly else "tenant"
    # (SUMs are cast: PostgreSQL sums integers to NUMERIC)
    where: list[str] = []
    args: dict[str, Any] = {}
    if tenant is not None:
        where.append("tenant = :tenant")
        args["tenant"] = tenant
    if since is not None:
        where.append("hour >= :first_hour")
        args["first_hour"] = int(since // 3600) * 3600
    sql = f"""
        SELECT tenant, {"hour" if hourly else "MIN(hour)"} AS hour, MAX(hour) AS last_hour,
               CAST(SUM(activations) AS BIGINT) AS activations,
               CAST(SUM(steps) AS BIGINT) AS steps, CAST(SUM(failures) AS BIGINT) AS failures,
               SUM(cpu_ms) AS cpu_ms, SUM(wall_ms) AS wall_ms,
               MAX(memory_peak_kib) AS memory_peak_kib,
               CAST(SUM(memory_sum_kib) AS BIGINT) AS memory_sum_kib,
               SUM(memory_kib_s) AS memory_kib_s, MAX(scratch_max_kib) AS scratch_max_kib
        FROM usage WHERE {" AND ".join(where) or "TRUE"}
        GROUP BY {group} ORDER BY {group}
    """
    return conn.execute(sql, args).fetchall()


def instance_counts(conn: Db, tenant: str | None) -> dict[str, dict[str, int]]:
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


def add_key(conn: Db, public: str, tenant: str | None, now: float) -> None:
    conn.execute(
        "INSERT INTO api_keys (public, tenant, created_at) VALUES (?, ?, ?)", (public, tenant, now)
    )


def revoke_key(conn: Db, public: str, now: float) -> bool:
    cur = conn.execute(
        "UPDATE api_keys SET revoked_at = ? WHERE public = ? AND revoked_at IS NULL", (now, public)
    )
    return cur.rowcount == 1


def api_keys(conn: Db) -> list[Row]:
    return conn.execute("SELECT * FROM api_keys ORDER BY created_at, public").fetchall()


# ---------------------------------------------------------------- nodes


def register_node(conn: Db, node: str, host: str, pid: int, state_dir: str, now: float) -> None:
    """This node is (back) up: alive, not fenced, not stopped."""
    conn.execute(
        "INSERT INTO nodes (id, host, pid, state_dir, started_at, heartbeat_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET host = excluded.host,"
        " pid = excluded.pid, state_dir = excluded.state_dir, started_at = excluded.started_at,"
        " heartbeat_at = excluded.heartbeat_at, fenced_at = NULL, stopped_at = NULL",
        (node, host, pid, state_dir, now, now),
    )


def get_node(conn: Db, node: str) -> Row | None:
    row: Row | None = conn.execute("SELECT * FROM nodes WHERE id = ?", (node,)).fetchone()
    return row


def heartbeat(conn: Db, node: str, now: float) -> bool:
    """Renew the node's lease; False when another node has fenced it (taken its work)."""
    cur = conn.execute(
        "UPDATE nodes SET heartbeat_at = ? WHERE id = ? AND fenced_at IS NULL", (now, node)
    )
    return cur.rowcount == 1


def fence_lapsed_nodes(conn: Db, me: str, before: float, now: float) -> list[str]:
    """Fence every other running node whose last heartbeat is older than `before`; their
    ids. The update locks each node's row, so it cannot race the node's own heartbeat: one of
    the two waits for the other and then finds the lease renewed, or fenced."""
    rows = conn.execute(
        "UPDATE nodes SET fenced_at = ? WHERE id <> ? AND fenced_at IS NULL"
        " AND stopped_at IS NULL AND heartbeat_at < ? RETURNING id",
        (now, me, before),
    )
    return sorted(str(r[0]) for r in rows)


def stop_node(conn: Db, node: str, now: float) -> None:
    conn.execute("UPDATE nodes SET stopped_at = ? WHERE id = ?", (now, node))


def nodes(conn: Db) -> list[Row]:
    """Every node with its running activations and the instances they hold."""
    return conn.execute(
        "SELECT n.*,"
        " (SELECT COUNT(*) FROM activations a WHERE a.node = n.id AND a.finished_at IS NULL)"
        " AS running,"
        " (SELECT COUNT(*) FROM instances i JOIN activations a ON a.id = i.lease"
        "  WHERE a.node = n.id) AS leases"
        " FROM nodes n ORDER BY n.id"
    ).fetchall()


def try_lock_tenant(conn: Db, tenant: str) -> bool:
    """Take the tenant's cluster-wide lock until this transaction ends, unless another node
    holds it (then False, at once). Counting a tenant's running activations and claiming more
    happen under it, so `max_concurrent` and `max_instances` hold across nodes. SQLite has a
    single writer: always True."""
    if conn.dialect == "sqlite":
        return True
    row = conn.execute("SELECT pg_try_advisory_xact_lock(?, hashtext(?))", (TENANT_LOCKS, tenant))
    return bool(row.fetchone()[0])


def try_lock_retention(conn: Db) -> bool:
    """One node at a time deletes expired rows (PostgreSQL; two deleting the same rows would
    only wait for each other, or deadlock). Held until the transaction ends."""
    if conn.dialect == "sqlite":
        return True
    row = conn.execute("SELECT pg_try_advisory_xact_lock(?, 0)", (RETENTION_LOCK,))
    return bool(row.fetchone()[0])


def lock_tenant(conn: Db, tenant: str) -> None:
    """The same lock, waited for (a create, whose count must not race another node's)."""
    if conn.dialect == "postgresql":
        conn.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (TENANT_LOCKS, tenant))


def notify_kill(conn: Db, activation: int) -> None:
    """Tell every node, at commit, to kill activation `activation` if it runs there."""
    if conn.dialect == "postgresql":
        conn.execute("SELECT pg_notify(?, ?)", (KILL_CHANNEL, str(activation)))


def notify_wake(conn: Db) -> None:
    """Tell every node, when this transaction commits, that work may be due (PostgreSQL)."""
    if conn.dialect == "postgresql":
        conn.execute(f"NOTIFY {WAKE_CHANNEL}")
