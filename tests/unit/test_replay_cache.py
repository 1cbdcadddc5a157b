"""supervisor.replay_cache on a real database: the journal an activation gets is always the one
the database holds, however the journal changed since the last activation of the instance."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import journal as j
from supervisor.engine import carried_bytes
from supervisor.replay_cache import ReplayCache

T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def conn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[j.Db]:
    database = (
        tmp_path / "stepvisor.db"
        if request.param == "sqlite"
        else str(request.getfixturevalue("pg_db"))
    )
    c = j.connect(database)
    j.insert_instance(c, "acme", "i1", "wf", "v1", b"null", T0, "queued")
    yield c
    c.close()


def step(conn: j.Db, seq: int, status: str = "ok", *, at: float, result: bytes = b"1") -> None:
    j.upsert_entry(
        conn,
        "acme",
        "i1",
        seq,
        kind="step",
        name=f"s{seq}",
        status=status,
        attempts=1,
        result=result if status == "ok" else None,
        started_at=at,
    )


def check(cache: ReplayCache, conn: j.Db) -> list[tuple[str, str, bytes | None]]:
    """What the cache gives, asserted equal to a whole read of the database."""
    got = cache.journal(conn, "acme", "i1")
    assert got.entries == j.journal_entries(conn, "acme", "i1")
    assert got.state_bytes == sum(carried_bytes(e) for e in got.entries)
    return [(e.name, e.status, e.result) for e in got.entries]


def test_a_growing_journal_is_read_from_its_last_settled_entry_on(conn: j.Db) -> None:
    cache = ReplayCache()
    for seq in range(5):
        step(conn, seq, at=T0 + seq)
    assert len(check(cache, conn)) == 5
    step(conn, 5, "running", at=T0 + 5)
    assert check(cache, conn)[-1] == ("s5", "running", None)
    step(conn, 5, at=T0 + 5, result=b"6")  # the last entry changes in place: read again
    assert check(cache, conn)[-1] == ("s5", "ok", b"6")
    assert (cache.hits, cache.misses) == (2, 1)


def test_a_journal_cut_and_written_again_is_read_whole(conn: j.Db) -> None:
    cache = ReplayCache()
    for seq in range(4):
        step(conn, seq, at=T0 + seq)
    check(cache, conn)
    # Restart from seq 1 (through any node), and run on to the same length with new results.
    j.reset_instance(conn, "acme", "i1", T0 + 10, "queued", from_seq=1)
    for seq in range(1, 4):
        step(conn, seq, at=T0 + 10 + seq, result=b"2")
    assert check(cache, conn) == [("s0", "ok", b"1")] + [(f"s{s}", "ok", b"2") for s in (1, 2, 3)]
    assert cache.misses == 2


def test_a_cut_after_the_kept_head_keeps_it(conn: j.Db) -> None:
    cache = ReplayCache()
    for seq in range(3):
        step(conn, seq, at=T0 + seq)
    step(conn, 3, "retry", at=T0 + 3)
    check(cache, conn)
    j.reset_instance(conn, "acme", "i1", T0 + 10, "queued", from_seq=3)
    assert len(check(cache, conn)) == 3
    assert cache.hits == 1


def test_a_deleted_and_recreated_instance_is_read_whole(conn: j.Db) -> None:
    cache = ReplayCache()
    for seq in range(3):
        step(conn, seq, at=T0 + seq)
    check(cache, conn)
    j.delete_instance(conn, "acme", "i1")
    assert check(cache, conn) == []
    j.insert_instance(conn, "acme", "i1", "wf", "v1", b"null", T0 + 20, "queued")
    for seq in range(3):
        step(conn, seq, at=T0 + 20 + seq, result=b"9")
    assert {r for _, _, r in check(cache, conn)} == {b"9"}
    assert cache.hits == 0


def test_heads_beyond_the_byte_budget_are_dropped_oldest_first(conn: j.Db) -> None:
    cache = ReplayCache(max_bytes=3_000)
    for iid in ("i1", "i2"):
        if iid != "i1":
            j.insert_instance(conn, "acme", iid, "wf", "v1", b"null", T0, "queued")
        j.upsert_entry(
            conn,
            "acme",
            iid,
            0,
            kind="step",
            name="s",
            status="ok",
            result=b"1" * 2_000,
            started_at=T0,
        )
        cache.journal(conn, "acme", iid)
    cache.journal(conn, "acme", "i2")
    cache.journal(conn, "acme", "i1")  # its head was dropped for i2's
    assert (cache.hits, cache.misses) == (1, 3)
    j.upsert_entry(
        conn,
        "acme",
        "i1",
        1,
        kind="step",
        name="t",
        status="ok",
        result=b"1" * 5_000,
        started_at=T0,
    )
    # too big to keep at all: still right
    assert len(cache.journal(conn, "acme", "i1").entries) == 2


def test_only_a_leading_run_of_settled_entries_is_kept(conn: j.Db) -> None:
    # A journal the engine never writes (an unsettled entry before a settled one), rewritten
    # in the middle: what is kept must not depend on only the last entry being unsettled.
    cache = ReplayCache()
    step(conn, 0, at=T0)
    step(conn, 1, "retry", at=T0 + 1)
    step(conn, 2, at=T0 + 2)
    check(cache, conn)
    step(conn, 1, at=T0 + 1, result=b"7")
    assert check(cache, conn)[1] == ("s1", "ok", b"7")
