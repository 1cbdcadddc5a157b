"""Activation records and the per-tenant usage roll-ups made from them."""

from __future__ import annotations

from typing import Any

from supervisor.journal.db import Db, Row


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
