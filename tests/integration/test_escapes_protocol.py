"""Tenant code speaking on its own activation channel: absurd numbers, commands that contradict
the journal, forged inspection results. Each attempt must end with a clear recorded error, and the
tenant's own status, list and history must keep answering (never INTERNAL)."""

from __future__ import annotations

import socket
import textwrap
from typing import Any

import pytest

from protocol import zmtp
from protocol.codec import encode
from protocol.messages import StepResult
from stepvisor.client import StepVisorError
from tests.conftest import deploy_source, wait_for
from tests.integration.arena import Arena

# Runs its payload's code in the workflow body, outside any step: that is where the runtime
# sends SleepCmd, WaitEventCmd and StepStarted.
RAW = """
from stepvisor import workflow

@workflow("raw")
def raw(event, step):
    scope = {"params": event.payload, "step": step}
    exec(event.payload["code"], scope)
    return scope.get("result")
"""

GRAB = """
import gc, time
from protocol import messages as m
(channel,) = [o for o in gc.get_objects() if type(o).__name__ == "Channel"]
(runtime,) = [o for o in gc.get_objects() if type(o).__name__ == "Runtime"]
"""


def raw_attack(arena: Arena, code: str, iid: str) -> dict[str, Any]:
    deploy_source(arena.client, "evil", RAW, filename="raw.py")
    payload = {"code": textwrap.dedent(GRAB) + textwrap.dedent(code)}
    arena.client.create("evil", "raw", payload, id=iid)
    return arena.client.wait("evil", iid, timeout_s=120)


def assert_tenant_readable(arena: Arena, iid: str) -> dict[str, Any]:
    """status, list and history of the tenant answer (an INTERNAL error would raise)."""
    c = arena.client
    c.status("evil", iid)
    assert iid in [row["id"] for row in c.list("evil")]
    return c.history("evil", iid)


@pytest.mark.parametrize(
    ("forged", "field"),
    [
        ('m.SleepCmd(seq=0, name="s", until=float("nan"))', "until"),
        ('m.SleepCmd(seq=0, name="s", until=float("inf"))', "until"),
        ('m.SleepCmd(seq=0, name="s", until=1e300)', "until"),
        ('m.WaitEventCmd(seq=0, name="w", type="go", timeout_s=1e300)', "timeout_s"),
        ('m.WaitEventCmd(seq=0, name="w", type="go", timeout_s=float("nan"))', "timeout_s"),
    ],
    ids=["sleep-nan", "sleep-inf", "sleep-1e300", "wait-1e300", "wait-nan"],
)
def test_absurd_numbers_are_protocol_errors(arena: Arena, forged: str, field: str) -> None:
    st = raw_attack(arena, f"channel.send({forged})\ntime.sleep(30)\n", "n")
    assert st["status"] == "errored"
    assert st["error"]["type"] == "ActivationFailed"
    h = assert_tenant_readable(arena, "n")
    assert h["entries"] == []  # nothing of it was journaled
    outcomes = {a["outcome"] for a in h["activations"]}
    assert outcomes == {"protocol_error"}
    assert all(field in a["detail"] for a in h["activations"])


def test_a_step_started_against_the_journal_is_nondeterminism(arena: Arena) -> None:
    # First activation: step "a" fails and is journaled for a retry. Second: the code claims
    # seq 0 is another step. The supervisor checks its own journal, whatever the runtime says.
    st = raw_attack(
        arena,
        """
        if not runtime.journal:
            def fail():
                raise RuntimeError("first attempt")
            step.do("a", fail, retries={"limit": 3, "delay": 0})
        channel.send(m.StepStarted(seq=0, name="forged", attempt=2, retry_limit=3,
                                   retry_delay_s=0.0, backoff="constant", timeout_s=10.0))
        time.sleep(30)
        """,
        "d",
    )
    assert st["status"] == "errored"
    assert st["error"]["code"] == "NONDETERMINISM"
    assert "'forged'" in st["error"]["message"] and "'a'" in st["error"]["message"]
    h = assert_tenant_readable(arena, "d")
    (entry,) = h["entries"]
    assert (entry["kind"], entry["name"]) == ("step", "a")  # the journal was not rewritten
    assert [a["outcome"] for a in h["activations"]] == ["error", "protocol_error"]


def test_a_sleep_at_a_journaled_step_seq_is_nondeterminism(arena: Arena) -> None:
    st = raw_attack(
        arena,
        """
        if not runtime.journal:
            def fail():
                raise RuntimeError("first attempt")
            step.do("a", fail, retries={"limit": 3, "delay": 0})
        channel.send(m.SleepCmd(seq=0, name="a", until=1.0))
        time.sleep(30)
        """,
        "k",
    )
    assert st["status"] == "errored"
    assert st["error"]["code"] == "NONDETERMINISM"
    (entry,) = assert_tenant_readable(arena, "k")["entries"]
    assert (entry["kind"], entry["status"]) == ("step", "retry")


@pytest.mark.parametrize(
    ("workflows", "why"),
    [
        ('["gh" + "ost"]', "does not name"),
        ('["a" + chr(44) + "b"]', "comma"),
        ('["x" * 300]', "length <= 256"),  # over the name length: refused by the codec
    ],
    ids=["not-in-code", "comma", "too-long"],
)
def test_a_forged_inspection_fails_the_deploy(arena: Arena, workflows: str, why: str) -> None:
    source = f"""
        import gc, time
        from protocol import messages as m
        (channel,) = [o for o in gc.get_objects() if type(o).__name__ == "Channel"]
        channel.send(m.Inspected(workflows={workflows}))
        time.sleep(30)
    """
    with pytest.raises(StepVisorError) as exc:
        deploy_source(arena.client, "evil", source, filename="forged.py")
    assert exc.value.code == "DEPLOY_FAILED"
    assert why in exc.value.message
    # nothing was deployed under a forged name
    with pytest.raises(StepVisorError) as nope:
        arena.client.create("evil", "ghost", id="g")
    assert nope.value.code == "UNKNOWN_WORKFLOW"


def test_a_leaked_token_is_no_good_from_another_uid(arena: Arena) -> None:
    """A step leaks its own token and drops its connection, then waits. A process of another uid
    (this test's) connects under the token and forges the step's result: the supervisor refuses
    the connection by the uid the kernel reports, and journals nothing of it."""
    arena.need("uid")
    arena.client.create(
        "evil",
        "attack",
        {
            "code": textwrap.dedent(
                """
                import gc, time
                (channel,) = [o for o in gc.get_objects() if type(o).__name__ == "Channel"]
                print("TOKEN", channel.token, flush=True)
                channel.sock.close()  # the token's routing id is free again
                time.sleep(params["wait_s"])
                result = "slept"
                """
            ),
            "wait_s": 20,
        },
        id="leak",
    )
    wait_for(
        lambda: arena.daemon.events("tenant.output", tenant="evil", instance="leak"), 30, "token"
    )
    (line,) = arena.daemon.events("tenant.output", tenant="evil", instance="leak")
    token = line["line"].split()[1].encode()
    path = arena.daemon.run_dir / "sandbox.sock"
    forged = zmtp.frame(encode(StepResult(seq=0, ok=True, value=b'"forged"')))

    def refused_by_uid() -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(zmtp.greeting() + zmtp.ready(b"DEALER", token) + forged)
        while sock.recv(65536):  # the supervisor's greeting, then the end
            pass
        sock.close()
        return any(
            e["kind"] == "not admitted" for e in arena.daemon.events("sandbox.connection_refused")
        )

    wait_for(refused_by_uid, 30, "the connection refused by its uid")
    arena.client.terminate("evil", "leak")
    st = arena.client.wait("evil", "leak", timeout_s=60)
    assert st["output"] != "forged" and st["status"] == "terminated", st
    assert all(e.get("result") != "forged" for e in arena.client.history("evil", "leak")["entries"])
