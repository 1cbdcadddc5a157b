"""The launch messages (sandbox, fork request and reply), the reserved exit codes, sandbox uids."""

from __future__ import annotations

import signal

import msgspec
import pytest

from protocol.launch import ExitCode, ForkReply, ForkRequest, Sandbox
from supervisor.isolation import UidPool
from supervisor.outcome import CRASHED, classify_exit


def _status(code: int) -> int:
    return code << 8  # a wait status for a normal exit


def test_a_reserved_exit_code_is_named_with_its_meaning() -> None:
    assert classify_exit(_status(72), 0.1, 10) == (
        CRASHED,
        "exited with code 72 (NO_ACK: the result was sent but never acknowledged)",
    )


@pytest.mark.parametrize("code", list(ExitCode))
def test_every_reserved_exit_code_has_a_name_and_a_sentence(code: ExitCode) -> None:
    _, detail = classify_exit(_status(code), 0.1, 10)
    assert detail.startswith(f"exited with code {int(code)} ({code.name}: ")
    assert len(code.meaning) > 10


def test_an_unreserved_exit_code_is_reported_as_it_is() -> None:
    assert classify_exit(_status(3), 0.1, 10) == (CRASHED, "exited with code 3")


def test_signals_are_not_mistaken_for_reserved_codes() -> None:
    how, detail = classify_exit(-signal.SIGTERM, 0.1, 10)
    assert how == "signalled(SIGTERM)" and detail == "killed by SIGTERM"


def test_exit_codes_fit_in_an_exit_status_and_do_not_collide() -> None:
    assert len({int(c) for c in ExitCode}) == len(ExitCode)
    assert all(0 < c < 126 for c in ExitCode)  # 126+ mean "cannot execute" and signals in a shell


def test_a_fork_request_round_trips_with_its_sandbox() -> None:
    box = Sandbox(memory_mib=256, cpu_seconds=5, max_pids=32, scratch="/s", uid=900_001, gid=7)
    req = ForkRequest(
        id=3, endpoint="ipc://x", ppid=1, token="t" * 32, env={"HOME": "/s"}, sandbox=box
    )
    assert msgspec.json.decode(msgspec.json.encode(req), type=ForkRequest) == req


def test_a_launch_message_with_an_unknown_or_mistyped_field_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"id": 1, "pid": 2, "tenant": "x"}', type=ForkReply)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"id": 1, "pid": "2"}', type=ForkReply)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"memory_mib": 1, "cpu_seconds": 1, "max_pids": 1, "scratch": "/s", "uid": "0"}',
            type=Sandbox,
        )


def test_sandbox_uids_start_at_a_random_place_each_run() -> None:
    firsts = set()
    for _ in range(8):
        got = UidPool(900_000, 999_999).acquire("t")
        assert got is not None and 900_000 <= got[0] <= 999_999 and got[1]
        firsts.add(got[0])
    assert len(firsts) > 1  # eight runs from the same start: 1 chance in 10**35 by luck


def test_a_sandbox_uid_never_serves_two_tenants() -> None:
    pool = UidPool(10, 13)
    a1, a2 = pool.acquire("a"), pool.acquire("a")
    assert a1 is not None and a2 is not None and a1[1] and a2[1]
    pool.release(a1[0])
    assert pool.acquire("a") == (a1[0], False)  # its own free uid before a new one
    b1, b2 = pool.acquire("b"), pool.acquire("b")
    assert b1 is not None and b2 is not None
    assert {b1[0], b2[0]} == {10, 11, 12, 13} - {a1[0], a2[0]}
    pool.release(a2[0])
    assert not pool.has_free("b") and pool.acquire("b") is None  # a's free uid is still a's
    assert pool.has_free("a") and pool.has_free()
    assert pool.acquire("c") is None and not pool.has_free("c")


def test_uid_owners_outlive_the_run() -> None:
    first = UidPool(10, 11)
    got = first.acquire("a")
    assert got is not None
    again = UidPool(10, 11)
    again.load({got[0]: "a", 99: "b"})  # 99: outside today's range, ignored
    b = again.acquire("b")
    assert b is not None and b[0] != got[0] and b[1]
    assert again.acquire("b") is None  # the other uid is still a's
    assert again.acquire("a") == (got[0], False)
