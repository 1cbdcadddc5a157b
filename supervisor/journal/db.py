"""The two databases behind the journal, behind one small interface.

Every query in `supervisor.journal` is written once, in the SQL both SQLite and PostgreSQL speak,
with `?` and `:name` placeholders; `Db` is what those queries run on. `SqliteDb` *is* a
`sqlite3.Connection` (no wrapper on the embedded hot path); `PgDb` runs the same text on
PostgreSQL through psycopg 3 and a connection pool, rewriting the placeholders once per statement.
Where the dialects differ (a handful of statements) a query asks `db.dialect`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict

Dialect = Literal["sqlite", "postgresql"]
PG_SCHEMES = ("postgresql://", "postgres://")
IDLE_CHECK_S = 2.0  # a pooled connection idle longer than this is pinged before use
# A constraint said no (unique key, CHECK, NOT NULL), on either database.
IntegrityError = (sqlite3.IntegrityError, psycopg.IntegrityError)
# Another node's transaction was in the way (PostgreSQL): a deadlock, a serialization failure, or
# a lock not granted within lock_timeout. The statement failed; the connection is fine.
CONTENDED = (psycopg.errors.TransactionRollback, psycopg.errors.LockNotAvailable)
# The connection is gone (PostgreSQL): the server is down or the connection was cut, or the server
# ended the session, as it does to a transaction left idle past idle_in_transaction_session_timeout
# (a node paused inside one). That last one fails the next statement with 25P03, which psycopg
# files under InternalError, not OperationalError. The transaction did not commit.
CONNECTION_LOST = (psycopg.OperationalError, psycopg.errors.IdleInTransactionSessionTimeout)


class Row(Protocol):
    """A result row: by position or by column name (sqlite3.Row's interface)."""

    def __getitem__(self, key: int | str, /) -> Any: ...
    def keys(self) -> list[str]: ...


class Result(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    dialect: Dialect

    def execute(self, sql: str, parameters: Any = ..., /) -> Result: ...
    def transaction(self) -> Any: ...  # a context manager: one write transaction
    def sync(self) -> None: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...
    @property
    def total_changes(self) -> int: ...
    @property
    def in_transaction(self) -> bool: ...


def is_postgres(database: str) -> bool:
    return database.startswith(PG_SCHEMES)


# ---------------------------------------------------------------- SQLite


class SqliteDb(sqlite3.Connection):
    """The embedded database: a sqlite3 connection in autocommit mode, plus what `Db` adds."""

    dialect: Dialect = "sqlite"
    path: Path
    wal_fd: int | None = None

    @contextmanager
    def transaction(self) -> Iterator[SqliteDb]:
        """One write transaction, retried on `database is locked` at BEGIN."""
        for attempt in range(50):
            try:
                self.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.01)
        try:
            yield self
        except BaseException:
            self.execute("ROLLBACK")
            raise
        self.execute("COMMIT")

    def sync(self) -> None:
        """Make every transaction committed so far durable: fsync the write-ahead log, which is
        what `synchronous = FULL` does at each commit (checkpoints sync it themselves).

        The log's descriptor is kept: while this connection is open SQLite keeps the file (it
        truncates it at most, never replaces it), so opening it again for every sync is waste."""
        if self.wal_fd is None:
            try:
                self.wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # no log at all: every commit is in the synced database
                return
        os.fsync(self.wal_fd)

    def close(self) -> None:
        if self.wal_fd is not None:
            os.close(self.wal_fd)
            self.wal_fd = None
        super().close()

    def describe(self) -> str:
        return f"sqlite {self.path}"


def open_sqlite(path: Path) -> SqliteDb:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True, factory=SqliteDb)
    conn.row_factory = sqlite3.Row
    conn.path = path
    return conn


# ---------------------------------------------------------------- PostgreSQL

# A quoted literal (left alone), a `%` (doubled), a `?`, or a `:name` that is not a `::` cast.
_PLACEHOLDERS = re.compile(r"'(?:[^']|'')*'|%|\?|(?<!:):([A-Za-z_]\w*)")


@lru_cache(maxsize=1024)
def to_pyformat(sql: str) -> str:
    """The statement with `?` → `%s` and `:name` → `%(name)s`, as psycopg takes them."""

    def swap(m: re.Match[str]) -> str:
        text = m.group(0)
        if text.startswith("'"):
            return text
        if text == "%":
            return "%%"
        if text == "?":
            return "%s"
        return f"%({m.group(1)})s"

    return _PLACEHOLDERS.sub(swap, sql)


class PgRow(tuple[Any, ...]):
    """A row that answers to a column name as well as a position, like sqlite3.Row."""

    __slots__ = ()
    _index: dict[str, int] = {}

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            key = self._index[key]
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


@lru_cache(maxsize=512)
def _row_class(names: tuple[str, ...]) -> type[PgRow]:
    # One class per column list, holding its name → position map, so a row is a bare tuple.
    return type("PgRow", (PgRow,), {"__slots__": (), "_index": {n: i for i, n in enumerate(names)}})


def _pg_row(cursor: psycopg.Cursor[Any]) -> Any:
    names = tuple(col.name for col in cursor.description or ())
    cls = _row_class(names)
    return lambda values: cls(values)


class Rows:
    """What a statement returned, read in full: a connection goes back to the pool right after
    a statement run outside a transaction, so no live cursor may outlive it."""

    __slots__ = ("_at", "_rows", "rowcount")

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self.rowcount = cursor.rowcount
        self._rows: list[Any] = cursor.fetchall() if cursor.description is not None else []
        self._at = 0

    def fetchone(self) -> Any:
        if self._at >= len(self._rows):
            return None
        self._at += 1
        return self._rows[self._at - 1]

    def fetchall(self) -> list[Any]:
        rows, self._at = self._rows[self._at :], len(self._rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class PgDb:
    """PostgreSQL through a small psycopg pool. A transaction holds one connection from BEGIN to
    COMMIT; a statement outside one borrows a connection for itself (autocommit)."""

    dialect: Dialect = "postgresql"

    def __init__(
        self, url: str, *, lease_s: float = 10.0, max_size: int = 4, timeout_s: float = 10.0
    ) -> None:
        self.url = url
        # A node paused inside a transaction (SIGSTOP, a stalled VM) would hold its row and
        # advisory locks for as long as it is paused, and every other node would wait on them,
        # unable even to fence it. The server ends such a session after half a lease (the
        # paused node's transaction rolls back: nothing of it commits); and no statement of a
        # node waits on a lock for longer than two leases.
        limits = {
            "idle_in_transaction_session_timeout": f"{max(500, int(lease_s * 500))}ms",
            "lock_timeout": f"{int(lease_s * 2000)}ms",
        }
        ours = " ".join(f"-c {k}={v}" for k, v in limits.items())
        theirs = conninfo_to_dict(url).get("options") or ""  # the URL's own, kept
        self._used: dict[int, float] = {}  # id(connection) → when it was last given back
        self.pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            timeout=timeout_s,
            kwargs={
                "autocommit": True,
                "row_factory": _pg_row,
                "options": f"{theirs} {ours}".strip(),
            },
            check=self._check,
            name="stepvisor",
            open=False,
        )
        self.pool.open(wait=True, timeout=timeout_s)
        self._conn: psycopg.Connection[Any] | None = None
        self._changes = 0

    def _check(self, conn: psycopg.Connection[Any]) -> None:
        """Before a connection is lent: ping it if it sat idle a while (the server may have
        restarted meanwhile; a dead one is replaced), not when it was in use a moment ago, as
        the loop's is every tick: that would cost a round trip a tick."""
        if time.monotonic() - self._used.get(id(conn), 0.0) > IDLE_CHECK_S:
            psycopg_pool.ConnectionPool.check_connection(conn)

    @contextmanager
    def _borrow(self) -> Iterator[psycopg.Connection[Any]]:
        with self.pool.connection() as conn:
            try:
                yield conn
            finally:
                self._used[id(conn)] = time.monotonic()

    @property
    def total_changes(self) -> int:
        return self._changes

    @property
    def in_transaction(self) -> bool:
        return self._conn is not None

    def execute(self, sql: str, parameters: Any = (), /) -> Rows:
        query = to_pyformat(sql)
        if self._conn is not None:
            return self._run(self._conn, query, parameters)
        # Outside a transaction the loop only reads (its next wake-up, say): a connection that
        # died in the pool is dropped and the read tried once more on a fresh one.
        for attempt in range(2):
            conn: psycopg.Connection[Any] | None = None
            try:
                with self._borrow() as conn:
                    return self._run(conn, query, parameters)
            except psycopg.OperationalError:
                if attempt or conn is None or not conn.closed:
                    raise
                self.pool.check()  # the others sat there as long: drop the dead ones too
        raise AssertionError("unreachable")

    def _run(self, conn: psycopg.Connection[Any], query: str, parameters: Any) -> Rows:
        cur = conn.execute(query, parameters or None)
        rows = Rows(cur)
        if cur.description is None and rows.rowcount > 0:
            self._changes += rows.rowcount
        return rows

    @contextmanager
    def transaction(self) -> Iterator[PgDb]:
        """One transaction (READ COMMITTED) on one pooled connection."""
        if self._conn is not None:
            raise RuntimeError("transactions do not nest; use a SAVEPOINT")
        conn = self._begin()
        self._conn = conn
        try:
            yield self
        except BaseException:
            self._conn = None
            with contextlib.suppress(psycopg.Error):  # a dead connection: the error says why
                conn.execute("ROLLBACK")
            self._give_back(conn)
            raise
        self._conn = None
        try:
            conn.execute("COMMIT")
        finally:
            self._give_back(conn)

    def _begin(self) -> psycopg.Connection[Any]:
        """A pooled connection with a transaction begun. One that died while it sat in the pool
        (the server restarted since the last tick) fails at BEGIN, before anything was done:
        it is dropped, with any other dead one, and a fresh one taken, which the pool waits for
        (up to its timeout) while the server comes back."""
        for attempt in range(2):
            conn = self.pool.getconn()
            try:
                conn.execute("BEGIN")
                return conn
            except psycopg.OperationalError:
                self._give_back(conn)  # closed: the pool discards it
                if attempt:
                    raise
                self.pool.check()  # the others sat there as long: drop the dead ones too
        raise AssertionError("unreachable")

    def _give_back(self, conn: psycopg.Connection[Any]) -> None:
        self._used[id(conn)] = time.monotonic()
        self.pool.putconn(conn)

    def sync(self) -> None:
        """Nothing to do: a PostgreSQL commit is durable when it returns (synchronous_commit)."""

    def describe(self) -> str:
        return f"postgresql {safe_url(self.url)}"

    def close(self) -> None:
        self.pool.close()


def safe_url(url: str) -> str:
    """The URL's host, port, database and user, never its password: for logs and reports."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(unparsable URL)"
    where = info.get("host") or "localhost"
    port = f":{info['port']}" if info.get("port") else ""
    user = f"{info['user']}@" if info.get("user") else ""
    return f"{user}{where}{port}/{info.get('dbname', '')}"
