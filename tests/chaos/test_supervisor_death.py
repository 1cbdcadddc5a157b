"""Kill the supervisor (SIGKILL) or stop it (SIGTERM) mid-flight: nothing journaled is lost or
redone."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from stepvisor import Client
from tests.chaos.executions import SRC, executions, make_log
from tests.conftest import Daemon, deploy_source, wait_for, writable

pytestmark = pytest.mark.chaos


def journaled_steps(c, ids: list[str]) -> int:
    return sum(sum(e["status"] == "ok" for e in c.history("acme", i)["entries"]) for i in ids)


def sandbox_processes(daemon: Daemon) -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if f"ipc://{daemon.run_dir}" in " ".join(p.info["cmdline"] or [])
    ]


def through_two_stops(
    make_daemon, shared: Path, stop: Callable[[Daemon], None]
) -> tuple[Daemon, Client, dict[str, Any], dict[tuple[str, int], list[str]]]:
    """Six 5-step instances, stopped with `stop` after 4 and after 12 journaled steps and
    restarted each time; returns the daemon, a client, the final statuses and every execution."""
    daemon = make_daemon(writable(shared, max_concurrent=3))
    log = make_log(shared)
    c = daemon.client()
    deploy_source(c, "acme", SRC)
    ids = [f"i{n}" for n in range(6)]
    c.create_batch("acme", "w", [(i, {"log": str(log), "steps": 5, "pause": 0.15}) for i in ids])
    for threshold in (4, 12):
        wait_for(lambda t=threshold, c=c: journaled_steps(c, ids) >= t, 60, f"{threshold} steps")
        stop(daemon)
        daemon.start()
        c = daemon.client()
    finals = {i: c.wait("acme", i, timeout_s=120) for i in ids}
    assert all(st["status"] == "complete" for st in finals.values())
    return daemon, c, finals, executions(log)


def test_sigkill_mid_workflow_then_restart_loses_and_repeats_nothing(
    make_daemon, shared: Path
) -> None:
    def kill(daemon: Daemon) -> None:
        daemon.stop(signal.SIGKILL)
        # PDEATHSIG: the running activations die with their supervisor.
        wait_for(lambda: not sandbox_processes(daemon), 10, "orphaned activations to die")

    daemon, c, finals, runs = through_two_stops(make_daemon, shared, kill)
    for iid, st in finals.items():
        for seq, journaled_token in enumerate(st["output"]):
            tokens = runs[(iid, seq)]
            # The journaled result is the last execution: a journaled step never runs again.
            assert tokens[-1] == journaled_token, (iid, seq, tokens)
            assert len(tokens) <= 3  # at most one re-run per supervisor death
    assert daemon.events("recovery.requeued")
    outcomes = [a["outcome"] for i in finals for a in c.history("acme", i)["activations"]]
    assert "interrupted" in outcomes
    assert outcomes.count(None) == 0


def test_sigterm_mid_load_then_restart_loses_and_repeats_nothing(make_daemon, shared: Path) -> None:
    def drain(daemon: Daemon) -> None:
        assert daemon.stop(signal.SIGTERM) == 0  # running steps finish and are journaled
        assert not sandbox_processes(daemon)

    daemon, _, finals, runs = through_two_stops(make_daemon, shared, drain)
    for iid, st in finals.items():
        for seq, journaled_token in enumerate(st["output"]):
            assert runs[(iid, seq)] == [journaled_token], (iid, seq)  # each step ran once
    assert len(daemon.events("supervisor.drained")) == 2


def test_sigterm_drains_running_activations(make_daemon, shared: Path) -> None:
    daemon = make_daemon(writable(shared))
    log = make_log(shared)
    c = daemon.client()
    deploy_source(c, "acme", SRC)
    c.create("acme", "w", {"log": str(log), "steps": 2, "pause": 1.0}, id="d")
    wait_for(lambda: log.stat().st_size, 30, "the first step to start")
    assert daemon.stop(signal.SIGTERM) == 0
    assert daemon.events("supervisor.draining") and daemon.events("supervisor.stopped")
    daemon.start()
    c = daemon.client()
    st = c.wait("acme", "d", timeout_s=60)
    assert st["status"] == "complete"
    runs = executions(log)
    assert len(runs[("d", 0)]) == 1  # finished during the drain; not re-run after restart


def test_drain_deadline_kills_and_the_step_reruns_after_restart(make_daemon, shared: Path) -> None:
    daemon = make_daemon(writable(shared), server="drain_timeout_s = 0.3\n")
    log = make_log(shared)
    c = daemon.client()
    deploy_source(c, "acme", SRC)
    c.create("acme", "w", {"log": str(log), "steps": 1, "pause": 30}, id="d")
    wait_for(lambda: log.stat().st_size, 30, "the step to start")
    assert daemon.stop(signal.SIGTERM) == 0
    assert not sandbox_processes(daemon)
    c = daemon.start().client()
    assert c.history("acme", "d")["activations"][0]["outcome"] == "interrupted"
    wait_for(lambda: len(executions(log)[("d", 0)]) == 2, 30, "the step to re-run")
    entry = wait_for(
        lambda: (e := c.history("acme", "d")["entries"][0])["status"] == "running" and e,
        30,
        "the re-run to be journaled as started",
    )
    assert entry["attempts"] == 1  # the interrupted attempt did not count


PARENT_AND_CHILD = """
import time
from stepvisor import workflow

@workflow("child")
def child(event, step):
    return step.do("work", lambda: time.sleep(1.0) or event.payload * 2)

@workflow("parent")
def parent(event, step):
    return [step.invoke(f"call {i}", "child", event.payload + i) for i in range(2)]
"""


def test_a_parent_and_its_child_survive_sigkill(make_daemon) -> None:
    daemon = make_daemon()
    c = daemon.client()
    deploy_source(c, "acme", PARENT_AND_CHILD)
    c.create("acme", "parent", 10, id="p")

    def child_step_running() -> bool:
        listed = {i["id"]: i for i in c.list("acme")}
        return "p-0" in listed and bool(c.history("acme", "p-0")["entries"])

    wait_for(child_step_running, 30, "the first child's step to start")
    daemon.stop(signal.SIGKILL)
    wait_for(lambda: not sandbox_processes(daemon), 10, "orphaned activations to die")
    daemon.start()
    c = daemon.client()
    st = c.wait("acme", "p", timeout_s=60)
    assert (st["status"], st["output"]) == ("complete", [20, 22])
    assert [c.status("acme", f"p-{i}")["status"] for i in range(2)] == ["complete"] * 2
    assert [e["child"] for e in c.history("acme", "p")["entries"]] == ["p-0", "p-1"]
