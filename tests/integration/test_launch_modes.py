"""Both launch modes: activations forked from the pre-imported zygote (the default) and freshly
spawned interpreters (`launch_mode = "spawn"`) run workflows and get every isolation layer alike."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from supervisor.activation import PHASES
from tests.conftest import deploy_source, reaped_activations, wait_for, writable
from tests.integration.arena import ATTACKER

FORK = 'launch_mode = "fork"\n'
MODES = pytest.mark.parametrize("mode", ["fork", "spawn"])

SRC = """
from stepvisor import workflow

@workflow("w")
def w(event, step):
    total = 0
    for i in range(3):
        total += step.do(f"s{i}", lambda i=i: print(f"step {i}") or i)
    return total
"""


def zygotes(daemon) -> list[psutil.Process]:
    """The running fork server (its forked activations share its command line, so it is found
    by the pid the supervisor logged)."""
    started = daemon.events("zygote.started")
    if not started:
        return []
    try:
        return [psutil.Process(started[-1]["pid"])]
    except psutil.NoSuchProcess:
        return []


def children_named(daemon, name: str) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(daemon.proc.pid).children():
        with contextlib.suppress(psutil.Error):
            if p.name() == name:
                out.append(p)
    return out


def outcomes(c, instance: str) -> list[str]:
    return [a["outcome"] for a in c.history("acme", instance)["activations"]]


@MODES
def test_activations_run_workflows_one_process_per_step(make_daemon, mode: str) -> None:
    daemon = make_daemon(server=f'launch_mode = "{mode}"\n')
    c = daemon.client()
    deploy_source(c, "acme", SRC)
    c.create("acme", "w", id="i")
    st = c.wait("acme", "i", timeout_s=60)
    assert (st["status"], st["output"], st["activations"]) == ("complete", 3, 4)
    pids = {a["pid"] for a in c.history("acme", "i")["activations"]}
    assert len(pids) == 4
    assert sorted(e["line"] for e in daemon.events("tenant.output", instance="i")) == [
        "step 0", "step 1", "step 2"]  # fmt: skip
    assert [e["launch_mode"] for e in daemon.events("supervisor.ready")] == [mode]
    # Every activation says where its time went, and the phases add up to its total.
    for a in reaped_activations(c, "acme", "i"):
        assert list(a["phases"]) == list(PHASES)
        assert all(v >= 0 for v in a["phases"].values())
        assert abs(sum(a["phases"].values()) - a["total_ms"]) < 0.05
    assert not daemon.events("zygote.failed")


@MODES
def test_activations_get_every_isolation_layer(make_daemon, mode: str) -> None:
    daemon = make_daemon(server=f'launch_mode = "{mode}"\n')
    c = daemon.client()
    deploy_source(c, "evil", ATTACKER)
    code = """
        import os, socket
        out = {"uid": os.getuid(), "cgroup": open("/proc/self/cgroup").read()}
        for name, fn in (("db", lambda: open(params["db"], "rb")),
                         ("socket", lambda: socket.socket())):
            try:
                fn()
                out[name] = "allowed"
            except OSError as exc:
                out[name] = exc.strerror
        result = out
    """
    import textwrap

    # The supervisor's database, or with PostgreSQL its config (as private, and as forbidden)
    secret = daemon.config_path if daemon.database else daemon.state / "stepvisor.db"
    c.create(
        "evil",
        "attack",
        {"code": textwrap.dedent(code), "db": str(secret)},
        id="a",
    )
    out = c.wait("evil", "a", timeout_s=60)["output"]
    layers = {e["layer"] for e in daemon.events("isolation.layer")}
    if "uid" in layers:
        assert out["uid"] >= 900_000
    if layers & {"uid", "landlock"}:
        assert out["db"] == "Permission denied"
    if "seccomp" in layers:
        assert out["socket"] == "Operation not permitted"
    if "cgroup" in layers:
        assert "/evil/act-" in out["cgroup"]


def test_crashes_timeouts_and_a_dead_zygote(make_daemon, shared: Path) -> None:
    daemon = make_daemon(writable(shared), server=FORK + "hello_timeout_s = 5\n")
    c = daemon.client()
    deploy_source(c, "acme", """
        import ctypes, time
        from stepvisor import workflow

        @workflow("crash")
        def crash(event, step):
            step.do("segv", lambda: ctypes.string_at(0), retries={"limit": 0})

        @workflow("slow")
        def slow(event, step):
            step.do("slow", lambda: time.sleep(60), timeout=0.5, retries={"limit": 0})
    """)  # fmt: skip
    c.create("acme", "crash", id="c")
    c.create("acme", "slow", id="s")
    assert c.wait("acme", "c", timeout_s=60)["status"] == "errored"
    assert outcomes(c, "c")[0] == "signalled(SIGSEGV)"
    assert c.history("acme", "c")["activations"][0]["phases"] is None  # it never finished
    assert c.wait("acme", "s", timeout_s=60)["status"] == "errored"
    assert outcomes(c, "s")[0] == "wall_timeout"
    (zygote,) = zygotes(daemon)
    zygote.send_signal(signal.SIGKILL)
    deploy_source(c, "acme", SRC, filename="again.py")  # needs an activation: zygote restarted
    c.create("acme", "w", id="after")
    assert c.wait("acme", "after", timeout_s=60)["output"] == 3
    wait_for(lambda: daemon.events("zygote.failed"), 10, "the zygote's death to be logged")
    assert len(daemon.events("zygote.started")) == 2


def test_a_stuck_zygote_is_replaced_and_its_requests_spawned(make_daemon) -> None:
    daemon = make_daemon(server=FORK)
    c = daemon.client()
    deploy_source(c, "acme", SRC)
    (zygote,) = zygotes(daemon)
    zygote.send_signal(signal.SIGSTOP)  # alive, holding its socket, answering nothing
    try:
        c.create("acme", "w", id="i")
        assert c.wait("acme", "i", timeout_s=60)["output"] == 3
    finally:
        with contextlib.suppress(psutil.Error):  # the supervisor has killed it already
            zygote.send_signal(signal.SIGKILL)
    (failed,) = daemon.events("zygote.failed")
    assert "did not answer" in failed["error"]
    assert daemon.events("zygote.fallback")
    # Every activation still ran exactly once: the abandoned request was spawned, not lost.
    assert outcomes(c, "i") == ["ok"] * 4


def test_spare_processes_are_forked_ahead_and_a_dead_one_is_skipped(make_daemon) -> None:
    daemon = make_daemon(server=FORK)
    c = daemon.client()
    deploy_source(c, "acme", SRC)

    def spares() -> list[psutil.Process]:
        # Idle spares: the supervisor's children that say so (activations that have exited
        # are zombies).
        return children_named(daemon, "sv-spare")

    def gone(p: psutil.Process) -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE  # exited: its socket is closed
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: len(spares()) == 2, 10, "two spare processes")
    killed = spares()
    for p in killed:
        p.send_signal(signal.SIGKILL)  # the fork server finds out when it hands one out
    wait_for(lambda: all(gone(p) for p in killed), 10, "the spares to die")
    c.create("acme", "w", id="i")
    assert c.wait("acme", "i", timeout_s=60)["output"] == 3
    assert outcomes(c, "i") == ["ok"] * 4
    wait_for(lambda: len(spares()) == 2, 10, "the spares to be replaced")
    assert not daemon.events("zygote.failed")


def test_spares_are_forked_once_where_the_host_allows(make_daemon) -> None:
    """With sibling forks the nursery is the supervisor's child and forks each spare straight
    into the supervisor's children: no middle process per spare."""
    daemon = make_daemon(server=FORK)
    deploy_source(daemon.client(), "acme", SRC)
    (zygote,) = zygotes(daemon)
    wait_for(lambda: len(children_named(daemon, "sv-spare")) == 2, 10, "two spare processes")
    if any(p.name() == "sv-nursery" for p in zygote.children()):
        pytest.skip("sibling forks are unavailable here: spares go through a middle process")
    (nursery,) = children_named(daemon, "sv-nursery")
    c = daemon.client()
    c.create("acme", "w", id="i")
    assert c.wait("acme", "i", timeout_s=60)["output"] == 3
    wait_for(lambda: len(children_named(daemon, "sv-spare")) == 2, 10, "the spares replaced")
    assert nursery.is_running() and not nursery.children()  # the spares are not its own


@contextlib.contextmanager
def late_answers(zygote: psutil.Process, delay_us: int) -> Iterator[None]:
    """Make the fork server answer late: strace delays its `sendto` calls (its answers and its
    asks to the nursery; a request reaches a spare by `sendmsg`, undelayed)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: it delays the fork server's answer")
    delay = subprocess.Popen(
        ["strace", "-p", str(zygote.pid), "-o", "/dev/null", "-e", "trace=sendto",
         "-e", f"inject=sendto:delay_enter={delay_us}"],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert delay.stderr is not None
        attached = delay.stderr.readline()
        if "attached" not in attached:
            pytest.skip(f"strace cannot trace the fork server here: {attached.strip()}")
        yield
    finally:
        delay.terminate()
        delay.wait()


def test_an_activation_that_finishes_before_its_fork_server_answers_is_still_reaped(
    make_daemon,
) -> None:
    """The fork server hands a request to a spare and only then answers with its pid. A fork
    server descheduled in between leaves an activation that reports, is settled and exits before
    the supervisor knows its pid; it must still be reaped and recorded, and its slot freed."""
    daemon = make_daemon(server=FORK + "fork_spares = 1\n")
    c = daemon.client()
    deploy_source(c, "acme", SRC)
    (zygote,) = zygotes(daemon)
    with late_answers(zygote, 700_000):  # well inside the reply timeout
        c.create("acme", "w", id="i")
        assert c.wait("acme", "i", timeout_s=60)["output"] == 3
        acts = reaped_activations(c, "acme", "i")
    assert [a["outcome"] for a in acts] == ["ok"] * 4
    assert all(a["pid"] for a in acts)  # recorded, though it came after the result
    assert daemon.events("zygote.late_answer"), "the answer was never late: nothing was tested"
    s = c.stats()
    assert s["running"] == 0 and s["exiting"] == 0


def test_a_fork_server_that_dies_before_answering_leaves_no_activation_behind(
    make_daemon,
) -> None:
    """The fork server dies after handing a request to a spare and before answering: the spare
    is running the step, and the supervisor never learns its pid. It is settled as crashed and
    killed by its cgroup (never spawned a second time with the same token), and the step's
    retry runs."""
    daemon = make_daemon(server=FORK + "fork_spares = 1\n")
    c = daemon.client()
    deploy_source(c, "acme", """
        import time
        from stepvisor import workflow

        @workflow("w")
        def w(event, step):
            def once(ctx):
                return "again" if ctx.attempt > 1 else time.sleep(60)
            return step.do("s", once, retries={"limit": 1, "delay": 0})
    """)  # fmt: skip
    (zygote,) = zygotes(daemon)
    with late_answers(zygote, 4_000_000):
        c.create("acme", "w", id="i")

        def in_step() -> bool:
            acts = c.history("acme", "i")["activations"]
            return bool(acts) and acts[0]["seq"] == 0

        wait_for(in_step, 30, "the first activation to start its step")
        zygote.send_signal(signal.SIGKILL)
    assert c.wait("acme", "i", timeout_s=60)["output"] == "again"
    acts = reaped_activations(c, "acme", "i")
    assert acts[0]["outcome"] == "crashed" and "fork server" in acts[0]["detail"]
    assert [a["outcome"] for a in acts[1:]] == ["ok", "ok"]
    s = c.stats()
    assert s["running"] == 0 and s["exiting"] == 0
