"""Supervisor nodes sharing one database: registration, leases, fencing, advisory locks
and wake-up notifications (PostgreSQL; on SQLite one node, and the locks always granted)."""

from __future__ import annotations

from supervisor.journal.db import Db, Row

TENANT_LOCKS = 0x5354_4554  # advisory lock class of the per-tenant locks
RETENTION_LOCK = 0x5354_4552  # advisory lock class of the retention pass
WAKE_CHANNEL = "stepvisor_wake"  # LISTEN/NOTIFY channel: work may be due
KILL_CHANNEL = "stepvisor_kill"  # payload: an activation id an operator stopped


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
