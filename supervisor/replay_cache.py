"""What building an activation's `Activate` would otherwise read again from the database every
time: the tenant code it runs, and the settled head of its instance's journal.

An instance's k-th activation replays the k-1 entries before it. Read back row by row on every
activation, a workflow cost O(k) rows per step (2.6 ms of supervisor CPU at k = 1000). Two facts
make both safe to keep:
- a code version is immutable and never deleted: its key is its content hash;
- a journal only ever grows, changes its *last* entry (a step's attempts, a sleep that ends, a
  wait that gets its event) or loses a suffix (restart from a step, delete). Entries before the
  last are settled and never written again.

So an instance's settled head is kept, and the next activation reads from the head's last entry
on: the database's rows there replace the kept ones, and that first row must still be the entry
kept (same seq, same `started_at`). A journal cut at or before it and written again since, by
this node or another, has a new row there, stamped when it was written: the head is dropped and
the journal read whole. Bounded by bytes, least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from protocol.messages import JournalEntry
from supervisor import journal as j
from supervisor.engine import carried_bytes
from supervisor.journal.db import Db, Row

SETTLED = frozenset({"ok", "error", "timeout"})  # an entry with one of these is never rewritten
ENTRY_OVERHEAD_BYTES = 200  # a kept entry's own size, beyond its result and error
MAX_BYTES = 32 * 1024 * 1024
MAX_CODE_BYTES = 16 * 1024 * 1024


class _Head(NamedTuple):
    entries: list[JournalEntry]  # seq 0 .. len-1, all settled
    started_at: float  # of the last entry: what a rewritten one would differ in
    size: int
    state: int  # the entries' `carried_bytes`


class Replay(NamedTuple):
    entries: list[JournalEntry]  # the journal as replay sees it, in seq order
    state_bytes: int  # what its results and errors weigh (`engine.carried_bytes`)


def _size(e: JournalEntry) -> int:
    return ENTRY_OVERHEAD_BYTES + len(e.name) + carried_bytes(e)


class ReplayCache:
    """Owned by the supervisor's loop thread; `max_bytes` bounds the journal heads kept."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._heads: OrderedDict[tuple[str, str], _Head] = OrderedDict()
        self._bytes = 0
        self._code: OrderedDict[tuple[str, str], Row] = OrderedDict()
        self._code_bytes = 0
        self.hits = self.misses = 0  # heads reused / journals read whole (tests read them)

    def code(self, conn: Db, tenant: str, version: str) -> Row | None:
        key = (tenant, version)
        row = self._code.get(key)
        if row is not None:
            self._code.move_to_end(key)
            return row
        row = j.get_code(conn, tenant, version)
        if row is not None:
            self._code[key] = row
            self._code_bytes += len(row["code"])
            while self._code_bytes > MAX_CODE_BYTES and len(self._code) > 1:
                _, old = self._code.popitem(last=False)
                self._code_bytes -= len(old["code"])
        return row

    def journal(self, conn: Db, tenant: str, instance: str) -> Replay:
        """The instance's journal as replay sees it, and its weight, without reading what is
        kept of it again."""
        key = (tenant, instance)
        head = self._heads.pop(key, None)
        kept: list[JournalEntry] = []
        kept_size = kept_state = 0
        tail: list[j.TailRow] | None = None
        if head is not None:
            self._bytes -= head.size
            last = head.entries[-1]
            tail = j.journal_tail(conn, tenant, instance, last.seq)
            if tail and tail[0].entry.seq == last.seq and tail[0].started_at == head.started_at:
                kept, kept_size = head.entries[:-1], head.size - _size(last)
                kept_state = head.state - carried_bytes(last)
                self.hits += 1
            else:
                tail = None
        if tail is None:
            tail = j.journal_tail(conn, tenant, instance, 0)
            self.misses += 1
        # The head kept is the leading run of settled entries: only the last entry of a journal
        # is ever unsettled, but what is kept must not depend on that.
        settled = 0
        while settled < len(tail) and tail[settled].entry.status in SETTLED:
            settled += 1
        entries = kept + [row.entry for row in tail]
        weights = [carried_bytes(row.entry) for row in tail]
        if settled:
            size = kept_size + sum(_size(row.entry) for row in tail[:settled])
            if size <= self.max_bytes:
                stamp = tail[settled - 1].started_at
                state = kept_state + sum(weights[:settled])
                self._heads[key] = _Head(entries[: len(kept) + settled], stamp, size, state)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._heads.popitem(last=False)
                    self._bytes -= old.size
        return Replay(entries, kept_state + sum(weights))

    def forget(self, tenant: str, instance: str) -> None:
        """Drop what is kept of an instance (it ended: no activation will replay it soon)."""
        head = self._heads.pop((tenant, instance), None)
        if head is not None:
            self._bytes -= head.size
