"""A tenant that floods the supervisor with output, or leaves processes behind after its result,
must cost only itself: requests, results and deadlines of other tenants go on, the log stays
bounded, and nothing of an activation outlives its settlement by more than a short grace."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from stepvisor import Client
from supervisor.output import MAX_OUTPUT_LINES
from tests.conftest import Daemon, deploy_source, wait_for, wait_gone
from tests.integration.arena import ATTACKER, VICTIM, Arena

# A step that leaves a daemonised process behind (setsid, double fork) running `{body}`, and
# returns its pid.
LEAVE_BEHIND = """
import os
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    pid = os.fork()
    if pid == 0:
        {body}
    os.write(w, str(pid).encode())
    os._exit(0)
os.close(w)
result = int(os.read(r, 32))
"""
# Empty lines to the activation's stdout as fast as it can, while the step reports its result.
FLOOD = LEAVE_BEHIND.format(body='while True: os.write(1, b"\\n" * 65536)')
SLEEPER = LEAVE_BEHIND.format(body="__import__('time').sleep(300)")


def test_an_output_flood_stalls_nobody_and_is_cut(arena: Arena) -> None:
    c = arena.client
    before = arena.daemon.log_path.stat().st_size
    c.create("evil", "attack", {"code": textwrap.dedent(FLOOD)}, id="flood")
    prober = Client(arena.daemon.endpoint, timeout_s=5)
    try:
        # The loop keeps answering while the flood runs: each ping within the client's timeout.
        for _ in range(20):
            assert prober.ping()
        st = c.wait("evil", "flood", timeout_s=60)
    finally:
        prober.close()
    assert st["status"] == "complete", st
    flooder = st["output"]
    wait_gone(flooder, 15, "the left-behind flooder to be killed")
    dropped = arena.daemon.events("tenant.output_dropped", tenant="evil")
    assert len(dropped) == 1, dropped  # said once, not once per line
    lines = arena.daemon.events("tenant.output", tenant="evil", instance="flood")
    assert len(lines) <= MAX_OUTPUT_LINES
    # Bounded: the lines kept, not the gigabytes written.
    assert arena.daemon.log_path.stat().st_size - before < 8 << 20


def test_a_step_printing_past_the_caps_still_completes(arena: Arena) -> None:
    st = arena.attack(
        """
        import sys
        for i in range(3 * params["lines"]):
            print(i)
        print("x" * 100_000)  # one endless line, too
        result = "printed"
        """,
        lines=MAX_OUTPUT_LINES,
    )
    assert st["output"] == "printed"
    lines = arena.daemon.events("tenant.output", tenant="evil", instance="a")
    assert lines[0]["line"] == "0" and lines[0]["step"] == "attack"
    assert len(lines) <= MAX_OUTPUT_LINES
    assert len(arena.daemon.events("tenant.output_dropped", tenant="evil")) == 1


LINGER = """
import gc, time
from protocol.messages import StepResult
(channel,) = [o for o in gc.get_objects() if type(o).__name__ == "Channel"]
channel.send(StepResult(seq=0, ok=True, value=b'"reported"'))
channel.wait_ack()
time.sleep(300)  # and stay: the supervisor must not wait for this process
"""


def test_processes_lingering_after_their_result_hold_back_only_their_tenant(
    make_daemon: Callable[..., Daemon],
) -> None:
    # One activation at a time overall; evil may have two. A long grace, so that the victim's
    # progress while evil's processes linger is an order of events, not a race.
    daemon = make_daemon(
        "[tenants.evil]\nmax_concurrent = 2\n",
        server="max_activations = 1\nsettled_grace_s = 10\n",
    )
    c = daemon.client(timeout_s=60)
    deploy_source(c, "evil", ATTACKER)
    deploy_source(c, "victim", VICTIM)
    for iid in ("l1", "l2"):
        c.create("evil", "attack", {"code": textwrap.dedent(LINGER)}, id=iid)
    wait_for(
        lambda: all(c.history("evil", i)["entries"] for i in ("l1", "l2")),
        30,
        "both lingering steps to report",
    )
    c.create("victim", "keep", id="v")
    wait_for(lambda: c.status("victim", "v")["status"] == "waiting", 30, "the victim to run")
    c.send_event("victim", "v", "go")
    assert c.wait("victim", "v", timeout_s=30)["output"] == {"secret": "victim-data"}
    # The victim ran while evil's reported steps were still there, within their grace.
    lingered = daemon.events("activation.lingered", tenant="evil")
    assert len(lingered) < 2, "the victim waited for evil's stragglers"
    # And the stragglers are killed after the grace; their results stand.
    wait_for(lambda: len(daemon.events("activation.lingered", tenant="evil")) == 2, 30, "kills")
    for iid in ("l1", "l2"):
        assert c.wait("evil", iid, timeout_s=30)["output"] == "reported"


def test_messages_after_the_result_are_dropped_and_said_once(arena: Arena) -> None:
    """Messages behind the result, in the same write: dropped, and logged once. The
    supervisor then ends the connection with its Ack, so nothing more can follow (and the
    sandbox forbids a new socket)."""
    st = arena.attack(
        """
        import gc
        from protocol import zmtp
        from protocol.codec import encode
        from protocol.messages import StepResult
        (channel,) = [o for o in gc.get_objects() if type(o).__name__ == "Channel"]
        first = zmtp.frame(encode(StepResult(seq=0, ok=True, value=b'"first"')))
        again = zmtp.frame(encode(StepResult(seq=0, ok=True, value=b'"again"')))
        channel.sock.sendall(first + again * 3000)  # the supervisor queues few of these
        channel.wait_ack()
        assert channel.sock.recv(1) == b""  # the supervisor ended the connection
        result = "second"
        """
    )
    assert st["output"] == "first"  # the journaled result stands
    late = arena.daemon.events("sandbox.late_message", tenant="evil")
    assert len(late) == 1, late


def test_without_cgroups_a_daemonised_grandchild_dies_by_its_uid(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon('[isolation]\ncgroup = "off"\n')
    if "uid" not in {e["layer"] for e in daemon.events("isolation.layer")}:
        pytest.skip("isolation layer uid is not available on this host")
    c = daemon.client(timeout_s=60)
    deploy_source(c, "evil", ATTACKER)
    c.create("evil", "attack", {"code": SLEEPER}, id="d")
    st = c.wait("evil", "d", timeout_s=60)
    assert st["status"] == "complete", st
    escapee = st["output"]
    wait_gone(escapee, 15, "the daemonised grandchild to be killed by its sandbox uid")


def test_a_scratch_full_of_files_is_deleted_off_the_loop(arena: Arena) -> None:
    st = arena.attack(
        """
        import os
        os.mkdir("many")
        for n in range(params["files"]):
            open(f"many/{n}", "w").close()
        result = os.getcwd()
        """,
        files=20_000,
    )
    scratch = Path(st["output"])
    trash = scratch.parent / ".trash"
    wait_for(lambda: not scratch.exists(), 30, "the scratch dir to be taken away")
    assert trash.exists()  # too many files to delete in the loop: handed to the janitor
    wait_for(lambda: not any(trash.iterdir()), 60, "the janitor to empty the trash")
    assert arena.client.ping()
