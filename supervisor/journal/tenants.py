"""Tenants, their deployed code and deployments, their sandbox uids, and remote API keys."""

from __future__ import annotations

from supervisor.journal.db import Db, Row


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
