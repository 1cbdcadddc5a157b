"""`stepvisor migrate --to postgresql://...`: copy an embedded SQLite database into an empty
PostgreSQL one, offline, so a platform graduates to several nodes keeping every instance, journal
entry, event, activation record, usage row, key and uid owner.

The copy is one PostgreSQL transaction (all or nothing), streamed with COPY. Ids keep their
values (events, activations, a tenant's number: its sandbox group id) and the identity
sequences continue after them. The SQLite file is only read. Nodes are not copied: each
supervisor registers itself, and the first to start takes the activations that were open
when the embedded supervisor stopped (rows with no node) as its own to recover.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

from supervisor.journal import pg_schema, sqlite_schema

# Parents first; `nodes` is left out on purpose (see above).
TABLES = (
    "tenants",
    "code_versions",
    "deployments",
    "instances",
    "journal",
    "attempt_errors",
    "events",
    "activations",
    "usage",
    "api_keys",
    "sandbox_uids",
)
IDENTITIES = (("tenants", "number"), ("events", "id"), ("activations", "id"))


class CopyError(Exception):
    """The copy cannot be made; the message says why. Nothing was written."""


def copy(source: Path, url: str, say: Callable[[str], None] = print) -> dict[str, int]:
    """Copy `source` into the PostgreSQL database at `url`; rows copied per table."""
    if not source.is_file():
        raise CopyError(f"no SQLite database at {source}")
    lite = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        version = lite.execute("PRAGMA user_version").fetchone()[0]
        if version != len(sqlite_schema.MIGRATIONS):
            raise CopyError(
                f"{source} is at schema {version}, this stepvisor at "
                f"{len(sqlite_schema.MIGRATIONS)}: start and stop `stepvisor serve` on it once"
                " to upgrade it, then migrate"
            )
        try:
            pg_schema.connect(url).close()  # creates or upgrades the schema
            with psycopg.connect(url) as pg:
                return _copy_all(lite, pg, say)
        except psycopg.Error as exc:
            raise CopyError(f"PostgreSQL: {str(exc).strip()}") from None
    finally:
        lite.close()


def _copy_all(
    lite: sqlite3.Connection, pg: psycopg.Connection, say: Callable[[str], None]
) -> dict[str, int]:
    for table in (*TABLES, "nodes"):
        row = pg.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(table)))
        if (found := row.fetchone()) and found[0]:
            raise CopyError(f"the PostgreSQL database is not empty (table {table} has rows)")
    copied: dict[str, int] = {}
    for table in TABLES:
        columns = [r[1] for r in lite.execute(f"PRAGMA table_info({table})")]
        select = ", ".join(columns)
        if table == "tenants":  # a tenant's number is SQLite's rowid
            columns, select = [*columns, "number"], f"{select}, rowid"
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        n = 0
        with pg.cursor().copy(statement) as out:
            for row in lite.execute(f"SELECT {select} FROM {table}"):
                out.write_row(row)
                n += 1
        copied[table] = n
        say(f"{table}: {n:,} rows")
    for table, column in IDENTITIES:
        pg.execute(
            sql.SQL(
                "SELECT setval(pg_get_serial_sequence({t}, {c}),"
                " GREATEST((SELECT MAX({col}) FROM {tab}), 0) + 1, false)"
            ).format(
                t=sql.Literal(table),
                c=sql.Literal(column),
                col=sql.Identifier(column),
                tab=sql.Identifier(table),
            )
        )
    for table, n in copied.items():  # the same rows arrived, before anything commits
        row = pg.execute(sql.SQL("SELECT COUNT(*) FROM {}").format(sql.Identifier(table)))
        got = (row.fetchone() or (0,))[0]
        if got != n:
            raise CopyError(f"{table}: {n} rows read, {got} written")
    return copied
