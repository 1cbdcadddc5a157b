"""Workflow instances: create, read, list, change, delete, and what is due to run."""

from __future__ import annotations

from typing import Any

from supervisor.journal.db import Db, Row


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
    """Set the given columns. Pass only those that change: SQLite rewrites every index holding a
    column that is set, to its own value too (a page more in the write-ahead log for each)."""
    cols = ", ".join(f"{name} = ?" for name in fields)
    conn.execute(
        f"UPDATE instances SET {cols} WHERE tenant = ? AND id = ?",
        (*fields.values(), tenant, instance),
    )


def ensure_status(conn: Db, tenant: str, instance: str, status: str, now: float) -> None:
    """Set the instance's status (and `updated_at`) unless it has that status already: then
    the row is not written at all, which is what a step starting finds almost always."""
    conn.execute(
        "UPDATE instances SET status = ?, updated_at = ? WHERE tenant = ? AND id = ?"
        " AND status <> ?",
        (status, now, tenant, instance, status),
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
    """Records of activations with no instance (deploy checks, prepared activations stopped
    unused) launched before the cutoff, oldest first: ids grow with launch time, so the
    `(tenant, instance, id)` index finds them in order (no index of their own, which every
    prepared activation would enter at launch and leave when it gets its step)."""
    cur = conn.execute(
        "DELETE FROM activations WHERE id IN (SELECT id FROM activations WHERE tenant = ? "
        "AND instance IS NULL AND launched_at < ? AND finished_at IS NOT NULL "
        "ORDER BY id LIMIT ?)",
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
    it before this transaction ends. The fence every commit of an activation's consequences
    passes: a node that lost its lease while paused finds out here.

    A read, not a write: PostgreSQL locks the row (`FOR UPDATE`, no new row version); SQLite's
    transaction already holds the database's one write lock (`BEGIN IMMEDIATE`), so no other
    writer can change the row before it ends, and a no-op write there would only add pages to
    the write-ahead log."""
    lock = " FOR UPDATE" if conn.dialect == "postgresql" else ""
    row = conn.execute(
        "SELECT 1 FROM instances WHERE tenant = ? AND id = ? AND lease = ?" + lock,
        (tenant, instance, activation),
    ).fetchone()
    return row is not None


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
