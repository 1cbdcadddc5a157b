"""The journal of each instance (one row per command) and the events sent to instances."""

from __future__ import annotations

from typing import Any, NamedTuple

from protocol.messages import ErrorInfo, JournalEntry
from supervisor.journal.db import Db, Row
from supervisor.journal.error_column import decode_error, encode_error

KEPT_ATTEMPT_ERRORS = 20  # failed attempts remembered per step: the newest


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


class TailRow(NamedTuple):
    entry: JournalEntry
    started_at: float  # when the row was written first: a rewritten entry has a new one


def journal_tail(conn: Db, tenant: str, instance: str, first: int) -> list[TailRow]:
    """The journal from seq `first` on, each entry with its `started_at`. Rows are unpacked by
    position: an activation late in a long workflow may read every entry before it, and lookups
    by name cost a third of that."""
    return [
        TailRow(
            JournalEntry(seq, kind, name, status, attempts, result, decode_error(error), until),
            started_at,
        )
        for seq, kind, name, status, attempts, result, error, until, started_at in conn.execute(
            "SELECT seq, kind, name, status, attempts, result, error, until, started_at"
            " FROM journal WHERE tenant = ? AND instance = ? AND seq >= ? ORDER BY seq",
            (tenant, instance, first),
        )
    ]


def journal_entries(conn: Db, tenant: str, instance: str) -> list[JournalEntry]:
    """The journal as replay sees it."""
    return [row.entry for row in journal_tail(conn, tenant, instance, 0)]


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
    """How many entries the journal holds. Its seqs are dense (a command is journaled only at
    the seq after the last, and only suffixes are ever cut), so this is the last seq + 1: one
    index probe, where counting would read every entry."""
    row = conn.execute(
        "SELECT COALESCE(MAX(seq) + 1, 0) FROM journal WHERE tenant = ? AND instance = ?",
        (tenant, instance),
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
