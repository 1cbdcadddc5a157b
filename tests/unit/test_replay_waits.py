"""sandbox_host.runtime in-process: sleeps and event waits, new and replayed."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable

from protocol.messages import ErrorInfo, JournalEntry, SleepCmd, StepStarted, WaitEventCmd
from tests.unit.runtime_harness import NOW, Outcome, failure_of, output_of


def test_sleep_sends_until_now_plus_seconds(activate: Callable[..., Outcome]) -> None:
    out = activate("""
        @workflow("w")
        def w(event, step):
            step.sleep("grace", 3600)
            step.do("after", lambda: effect("after"))
    """)
    assert out.sent == [SleepCmd(seq=0, name="grace", until=NOW + 3600)]
    assert out.effects == []


def test_sleep_accepts_duration_strings(activate: Callable[..., Outcome]) -> None:
    out = activate("""
        @workflow("w")
        def w(event, step):
            step.sleep("grace", "2 hours")
    """)
    assert out.sent == [SleepCmd(seq=0, name="grace", until=NOW + 7200)]


def test_elapsed_sleep_is_passed_through(activate: Callable[..., Outcome]) -> None:
    journal = [JournalEntry(seq=0, kind="sleep", name="grace", status="ok", until=NOW - 5)]
    out = activate(
        """
        @workflow("w")
        def w(event, step):
            step.sleep("grace", 3600)
            return step.do("after", lambda: effect("after"))
    """,
        journal,
    )
    assert out.effects == ["after"]
    assert isinstance(out.sent[0], StepStarted) and out.sent[0].seq == 1


def test_unelapsed_sleep_is_resent_with_its_original_deadline(
    activate: Callable[..., Outcome],
) -> None:
    journal = [JournalEntry(seq=0, kind="sleep", name="grace", status="sleeping", until=NOW + 100)]
    out = activate(
        """
        @workflow("w")
        def w(event, step):
            step.sleep("grace", 3600)
    """,
        journal,
    )
    assert out.sent == [SleepCmd(seq=0, name="grace", until=NOW + 100)]


def test_sleep_until(activate: Callable[..., Outcome]) -> None:
    out = activate("""
        import datetime

        @workflow("w")
        def w(event, step):
            step.sleep_until("new year", datetime.datetime(2030, 1, 1))
    """)
    expected = dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()
    assert out.sent == [SleepCmd(seq=0, name="new year", until=expected)]


def test_wait_for_event_sends_the_wait(activate: Callable[..., Outcome]) -> None:
    out = activate("""
        @workflow("w")
        def w(event, step):
            step.wait_for_event("confirm", type="email-confirmed", timeout="1 day")
    """)
    assert out.sent == [
        WaitEventCmd(seq=0, name="confirm", type="email-confirmed", timeout_s=86400.0)
    ]


def test_wait_for_event_returns_the_journaled_event(activate: Callable[..., Outcome]) -> None:
    event = {"type": "email-confirmed", "payload": {"ok": True}, "timestamp": "2024-01-01"}
    journal = [
        JournalEntry(
            seq=0,
            kind="wait_event",
            name="confirm",
            status="ok",
            result=json.dumps(event).encode(),
            until=NOW + 10,
        )
    ]
    out = activate(
        """
        @workflow("w")
        def w(event, step):
            return step.wait_for_event("confirm", type="email-confirmed")
    """,
        journal,
    )
    assert output_of(out) == event


def test_wait_timeout_entry_raises_wait_timeout(activate: Callable[..., Outcome]) -> None:
    journal = [
        JournalEntry(
            seq=0,
            kind="wait_event",
            name="confirm",
            status="timeout",
            until=NOW - 1,
            error=ErrorInfo(type="WaitTimeout", message="no event"),
        )
    ]
    caught = activate(
        """
        @workflow("w")
        def w(event, step):
            try:
                step.wait_for_event("confirm", type="email-confirmed", timeout=60)
            except WaitTimeout as exc:
                return {"timed_out": exc.step, "type": exc.event_type}
    """,
        journal,
    )
    assert output_of(caught) == {"timed_out": "confirm", "type": "email-confirmed"}
    uncaught = activate(
        """
        @workflow("w")
        def w(event, step):
            step.wait_for_event("confirm", type="email-confirmed", timeout=60)
    """,
        journal,
    )
    assert failure_of(uncaught).type == "WaitTimeout"
