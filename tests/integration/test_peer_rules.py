"""Rules peers document and users rely on (idempotent create whatever the cap, accepted means
deliverable, an error is always recorded as raised, a retried step keeps its failed attempts),
checked against a real supervisor as a user sees them."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from protocol.limits import MAX_PAYLOAD_BYTES
from stepvisor.client import StepVisorError
from tests.conftest import Daemon, deploy_source

WAITER = """
from stepvisor import workflow

@workflow("w")
def w(event, step):
    ev = step.wait_for_event("go", type="go", timeout=600)
    return {"type": ev["type"], "length": len(ev["payload"])}
"""


def test_recreating_an_instance_succeeds_at_the_instance_cap(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon("[tenants.acme]\nmax_instances = 2\n")
    c = daemon.client()
    deploy_source(c, "acme", WAITER)
    c.create("acme", "w", {"n": 1}, id="a")
    c.create("acme", "w", {"n": 2}, id="b")
    # A retry after a lost reply: the tenant is at its cap, the instance exists already.
    again = c.create("acme", "w", {"n": 1}, id="a")
    assert (again["id"], again["created"]) == ("a", False)
    batch = c.create_batch("acme", "w", [("a", {"n": 1}), ("b", {"n": 2}), ("a", {"n": 1})])
    assert [(r["id"], r["created"]) for r in batch] == [("a", False), ("b", False), ("a", False)]
    with pytest.raises(StepVisorError) as exc:
        c.create("acme", "w", {"n": 3}, id="c")
    assert exc.value.code == "LIMIT_EXCEEDED"
    with pytest.raises(StepVisorError) as exc:  # different params: still a conflict
        c.create("acme", "w", {"n": 9}, id="a")
    assert exc.value.code == "ALREADY_EXISTS"
    c.terminate("acme", "b")
    # One free slot: a batch of the existing id and one new id, repeated, fits.
    batch = c.create_batch("acme", "w", [("a", {"n": 1}), ("c", {"n": 3}), ("c", {"n": 3})])
    assert [(r["id"], r["created"]) for r in batch] == [("a", False), ("c", True), ("c", False)]
    live = [r["id"] for r in c.list("acme") if r["status"] != "terminated"]
    assert sorted(live) == ["a", "c"]


def test_an_event_payload_at_the_limit_is_delivered_and_readable(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", WAITER)
    c.create("acme", "w", id="e")
    c.wait("acme", "e", statuses={"waiting"}, timeout_s=60)
    text = "x" * (MAX_PAYLOAD_BYTES - 2)  # its JSON is exactly the limit
    c.send_event("acme", "e", "go", text)
    st = c.wait("acme", "e", timeout_s=60)
    assert st["status"] == "complete", st["error"]
    assert st["output"] == {"type": "go", "length": len(text)}
    (entry,) = c.history("acme", "e")["entries"]
    assert entry["result"]["payload"] == text
    shown = daemon.cli("history", "acme", "e")
    assert shown.returncode == 0, shown.stderr


def test_a_step_error_whose_str_raises_is_recorded_as_raised(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", """
        from stepvisor import workflow

        class Unprintable(Exception):
            def __str__(self):
                raise RuntimeError("no str for you")

        def boom():
            raise Unprintable("details")

        @workflow("w")
        def w(event, step):
            step.do("boom", boom, retries={"limit": 0})
    """)  # fmt: skip
    c.create("acme", "w", id="s")
    st = c.wait("acme", "s", timeout_s=60)
    assert st["status"] == "errored"
    h = c.history("acme", "s")
    (entry,) = h["entries"]
    assert entry["status"] == "error"
    assert entry["error"]["type"] == "Unprintable"
    assert "details" in entry["error"]["message"]  # repr() stood in for the raising str()
    assert "in boom" in entry["error"]["traceback"]
    assert "protocol_error" not in [a["outcome"] for a in h["activations"]]


def test_a_step_that_succeeds_on_retry_keeps_its_failed_attempts(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(c, "acme", """
        from stepvisor import workflow

        def flaky(ctx):
            if ctx.attempt < 3:
                raise ConnectionError(f"attempt {ctx.attempt} failed")
            return ctx.attempt

        @workflow("w")
        def w(event, step):
            return step.do("flaky", flaky, retries={"limit": 4, "delay": 0})
    """)  # fmt: skip
    c.create("acme", "w", id="r")
    st = c.wait("acme", "r", timeout_s=60)
    assert (st["status"], st["output"]) == ("complete", 3)
    (entry,) = c.history("acme", "r")["entries"]
    assert (entry["status"], entry["attempts"], entry["error"]) == ("ok", 3, None)
    failed = [
        (f["attempt"], f["error"]["type"], f["error"]["message"]) for f in entry["failed_attempts"]
    ]
    assert failed == [
        (1, "ConnectionError", "attempt 1 failed"),
        (2, "ConnectionError", "attempt 2 failed"),
    ]
    assert "in flaky" in entry["failed_attempts"][0]["error"]["traceback"]
    shown = daemon.cli("history", "acme", "r")
    assert shown.returncode == 0, shown.stderr
    assert "ConnectionError: attempt 1 failed" in shown.stdout
