"""All SQL of stepvisor: every read and write of durable state, on SQLite or PostgreSQL.

The supervisor's loop owns one `Db` and wraps each loop iteration in one transaction (group
commit); every function here runs inside that transaction and never commits. Each statement is
written once, in SQL both databases speak (`db.py` says how); the schemas and migrations of the two
live in `sqlite_schema` and `pg_schema`.

The queries are grouped by what they touch: `tenants` (tenants, code, deployments, uids, API
keys), `instances` (instances and what is due), `entries` (each instance's journal and events),
`activations` (activation records and usage) and `membership` (nodes, leases, locks, wake-ups).
Callers see them all here, as `journal.<name>`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from supervisor.journal import pg_schema, sqlite_schema
from supervisor.journal.activations import (
    add_usage,
    insert_activation,
    instance_activations,
    instance_counts,
    open_activations,
    update_activation,
    usage,
)
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
from supervisor.journal.entries import (
    KEPT_ATTEMPT_ERRORS,
    TailRow,
    add_attempt_error,
    add_event,
    attempt_errors,
    consume_event,
    first_entry_named,
    get_entry,
    journal_entries,
    journal_length,
    journal_rows,
    journal_tail,
    last_entry,
    state_bytes,
    upsert_entry,
)
from supervisor.journal.error_column import decode_error, encode_error
from supervisor.journal.instances import (
    LIVE_STATUSES,
    count_live_instances,
    delete_inspections,
    delete_instance,
    due_instances,
    ensure_status,
    expired_instances,
    get_instance,
    hold_lease,
    insert_instance,
    instances_to_check,
    leased_elsewhere,
    leased_instances,
    list_instances,
    live_children,
    next_wake,
    reset_instance,
    update_instance,
)
from supervisor.journal.membership import (
    KILL_CHANNEL,
    RETENTION_LOCK,
    TENANT_LOCKS,
    WAKE_CHANNEL,
    fence_lapsed_nodes,
    get_node,
    heartbeat,
    lock_tenant,
    nodes,
    notify_kill,
    notify_wake,
    register_node,
    stop_node,
    try_lock_retention,
    try_lock_tenant,
)
from supervisor.journal.sqlite_schema import MIGRATIONS
from supervisor.journal.tenants import (
    add_key,
    api_keys,
    claim_uid,
    code_versions,
    deployments,
    ensure_tenant,
    get_code,
    get_deployment,
    put_code,
    revoke_key,
    set_deployment,
    tenant_exists,
    tenant_names,
    tenant_number,
    uid_owners,
)

# Callers use all of it through `journal` (`import supervisor.journal as j`): one name space,
# whichever module a query lives in.
__all__ = [
    "CONNECTION_LOST",
    "CONTENDED",
    "KEPT_ATTEMPT_ERRORS",
    "KILL_CHANNEL",
    "LIVE_STATUSES",
    "MIGRATIONS",
    "RETENTION_LOCK",
    "TENANT_LOCKS",
    "WAKE_CHANNEL",
    "Db",
    "IntegrityError",
    "Row",
    "TailRow",
    "add_attempt_error",
    "add_event",
    "add_key",
    "add_usage",
    "api_keys",
    "attempt_errors",
    "claim_uid",
    "code_versions",
    "connect",
    "consume_event",
    "count_live_instances",
    "decode_error",
    "delete_inspections",
    "delete_instance",
    "deployments",
    "due_instances",
    "encode_error",
    "ensure_status",
    "ensure_tenant",
    "expired_instances",
    "fence_lapsed_nodes",
    "first_entry_named",
    "get_code",
    "get_deployment",
    "get_entry",
    "get_instance",
    "get_node",
    "give_back_space",
    "heartbeat",
    "hold_lease",
    "insert_activation",
    "insert_instance",
    "instance_activations",
    "instance_counts",
    "instances_to_check",
    "is_incremental",
    "is_postgres",
    "journal_entries",
    "journal_length",
    "journal_rows",
    "journal_tail",
    "last_entry",
    "leased_elsewhere",
    "leased_instances",
    "list_instances",
    "live_children",
    "lock_tenant",
    "next_wake",
    "nodes",
    "notify_kill",
    "notify_wake",
    "open_activations",
    "pg_schema",
    "put_code",
    "register_node",
    "reset_instance",
    "revoke_key",
    "safe_url",
    "set_deployment",
    "sqlite_schema",
    "state_bytes",
    "stop_node",
    "tenant_exists",
    "tenant_names",
    "tenant_number",
    "transaction",
    "try_lock_retention",
    "try_lock_tenant",
    "uid_owners",
    "update_activation",
    "update_instance",
    "upsert_entry",
    "usage",
]


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
