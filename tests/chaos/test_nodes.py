"""Several supervisor nodes on one PostgreSQL database: any node serves any request; kill -9 of a
node, or a SIGSTOP past its lease, loses nothing and journals nothing twice; a tenant's limits
hold across the cluster."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stepvisor.client import StepVisorError
from tests.chaos.executions import (
    GATED_SEQ,
    SRC,
    LeaseSampler,
    executions,
    make_log,
    start_gated,
)
from tests.conftest import Daemon, deploy_source, wait_for, wait_gone, writable

pytestmark = [pytest.mark.chaos, pytest.mark.postgresql_only]

LEASE_S = 2.0

HOLD = """
from stepvisor import workflow

@workflow("hold")
def w(event, step):
    return step.wait_for_event("go", type="go", timeout=3600)
"""


def node_config(shared: Path, n: int, slots: int = 16, **defaults: object) -> tuple[str, str]:
    """(config, server lines) for node `n`: short leases, `slots` activations at most, and its
    own sandbox uids (nodes on one host must not hand one uid to two activations at once)."""
    low = 900_000 + n * 10_000
    config = writable(shared, **defaults) + (
        f"[isolation]\nsandbox_uid_range = [{low}, {low + 9_999}]\n"
    )
    return config, f'lease_s = {LEASE_S}\nnode_name = "node{n}"\nmax_activations = {slots}\n'


def cluster(
    make_daemon: Callable[..., Daemon], shared: Path, n: int, slots: int = 16, **defaults: object
) -> list[Daemon]:
    return [make_daemon(*node_config(shared, i, slots, **defaults)) for i in range(n)]


def nodes_by_name(daemon: Daemon) -> dict[str, dict]:
    client = daemon.clients[0] if daemon.clients else daemon.client()
    return {n["node"]: n for n in client.nodes()}


def test_any_node_serves_any_request_and_each_lists_the_cluster(make_daemon, shared: Path) -> None:
    a, b = cluster(make_daemon, shared, 2)
    ca, cb = a.client(), b.client()
    deploy_source(ca, "acme", SRC)  # deployed through a: the code lives in the database
    log = make_log(shared)
    ids = [f"i{n}" for n in range(6)]
    cb.create_batch("acme", "w", [(i, {"log": str(log), "steps": 3, "pause": 0.05}) for i in ids])
    finals = {i: ca.wait("acme", i, timeout_s=120) for i in ids}
    assert {st["status"] for st in finals.values()} == {"complete"}
    for iid, st in finals.items():
        for seq, token in enumerate(st["output"]):
            assert executions(log)[(iid, seq)] == [token]  # each step ran once, on one node
    nodes = {a["node"] for i in ids for a in cb.history("acme", i)["activations"]}
    assert nodes <= {"node0", "node1"} and nodes
    listed = nodes_by_name(b)
    assert set(listed) == {"node0", "node1"}
    assert {n["state"] for n in listed.values()} == {"up"}
    assert listed["node1"]["self"] and not listed["node0"]["self"]
    out = b.cli("nodes")
    assert out.returncode == 0, out.stderr
    assert "node0" in out.stdout and "node1 *" in out.stdout
    # A clean stop is said, so no node fences it.
    assert a.stop() == 0
    assert nodes_by_name(b)["node0"]["state"] == "stopped"


def test_kill_9_of_a_node_reruns_its_steps_on_another(make_daemon, shared: Path) -> None:
    # Two slots a node: neither can take all the work, so both are running steps when one dies.
    a, b = cluster(make_daemon, shared, 2, slots=2, max_concurrent=8)
    c = b.client()
    deploy_source(c, "acme", SRC)
    log = make_log(shared)
    ids = [f"i{n}" for n in range(8)]
    c.create_batch("acme", "w", [(i, {"log": str(log), "steps": 4, "pause": 0.3}) for i in ids])
    wait_for(lambda: nodes_by_name(b)["node0"]["running"] > 0, 60, "node0 to run steps")
    a.stop(signal.SIGKILL)
    finals = {i: c.wait("acme", i, timeout_s=180) for i in ids}
    assert {st["status"] for st in finals.values()} == {"complete"}
    runs = executions(log)
    for iid, st in finals.items():
        for seq, token in enumerate(st["output"]):
            assert runs[(iid, seq)][-1] == token  # a journaled step never runs again
            assert len(runs[(iid, seq)]) <= 2  # one re-run at most, for the node that died
        entries = c.history("acme", iid)["entries"]
        assert [e["seq"] for e in entries] == list(range(4))  # nothing journaled twice
    assert b.events("node.fenced_other", node="node0")
    lost = [
        act
        for i in ids
        for act in c.history("acme", i)["activations"]
        if act["outcome"] == "interrupted"
    ]
    assert lost and all(act["node"] == "node0" for act in lost)
    assert all("node0 stopped renewing its lease" in act["detail"] for act in lost)
    assert nodes_by_name(b)["node0"]["state"] == "fenced"


def test_a_node_paused_past_its_lease_is_fenced_and_never_commits(
    make_daemon, shared: Path
) -> None:
    [a] = cluster(make_daemon, shared, 1)
    first, _ = start_gated(a.client(), shared)
    b = make_daemon(*node_config(shared, 1))
    cb = b.client()
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: len(list(shared.glob("attempt-*"))) == 2, 60, "node1 to re-run the step")
        assert nodes_by_name(b)["node0"]["state"] == "fenced"
        (shared / "go").touch()  # both attempts now return: node0's reports to a stopped node
        st = cb.wait("acme", "g", timeout_s=60)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    assert st["status"] == "complete"
    # node0 comes back, finds it was fenced, and stops without journaling its attempt.
    assert a.proc.wait(30) == 75, a.stray_output()
    # Fenced at its next heartbeat; or, paused mid-transaction, its session was ended by the
    # server meanwhile (so that it held no lock the others waited on) and it stops on that.
    assert a.events("node.fenced", node="node0") or a.events("database.lost")
    h = cb.history("acme", "g")
    assert [e["status"] for e in h["entries"]] == ["ok", "ok"]  # each step journaled once
    assert st["output"][GATED_SEQ] != first  # node1's attempt, not node0's
    ran = {act["node"]: act for act in h["activations"] if act["seq"] == GATED_SEQ}
    assert ran["node1"]["outcome"] == "ok"
    assert ran["node0"]["outcome"] in ("interrupted", "fenced")
    assert cb.status("acme", "g")["output"] == st["output"]  # unchanged after node0 woke


def test_a_tenants_limits_hold_across_nodes(make_daemon, database: str, shared: Path) -> None:
    # Two slots a node, three for the tenant: it takes both nodes to reach the tenant's limit,
    # and only a count across them keeps it there.
    a, b = cluster(make_daemon, shared, 2, slots=2, max_concurrent=3)
    ca, cb = a.client(), b.client()
    deploy_source(ca, "acme", SRC)
    log = make_log(shared)
    ids = [f"i{n}" for n in range(10)]
    with LeaseSampler(database, "acme").sampling() as leases:
        for n, iid in enumerate(ids):  # creates through both nodes
            (ca if n % 2 else cb).create("acme", "w", {"log": str(log), "steps": 2, "pause": 0.2},
                                         id=iid)  # fmt: skip
        finals = {i: ca.wait("acme", i, timeout_s=180) for i in ids}
    assert {st["status"] for st in finals.values()} == {"complete"}
    assert leases.most == 3
    ran_on = {act["node"] for i in ids for act in ca.history("acme", i)["activations"]}
    assert ran_on == {"node0", "node1"}

    # max_instances, with creates racing through both nodes at once
    deploy_source(ca, "capped", HOLD)
    for n, d in enumerate((a, b)):
        config, server = node_config(shared, n, 2, max_concurrent=3)
        d.write_config(config + "[tenants.capped]\nmax_instances = 5\n", server)
        assert d.cli("reload").returncode == 0
    results: list[str] = []

    def create(client_of: Daemon, name: str) -> None:
        c = client_of.client()
        try:
            c.create("capped", "hold", None, id=name)
            results.append("created")
        except StepVisorError as exc:
            results.append(exc.code)

    threads = [
        threading.Thread(target=create, args=(a if n % 2 else b, f"c{n}")) for n in range(10)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["LIMIT_EXCEEDED"] * 5 + ["created"] * 5


def test_a_second_node_with_a_live_nodes_name_is_refused(make_daemon, shared: Path) -> None:
    [a] = cluster(make_daemon, shared, 1)
    config, server = node_config(shared, 1)
    twin = make_daemon(config, server.replace('"node1"', '"node0"'), start=False)
    with pytest.raises(AssertionError, match="node node0 is running on"):
        twin.start()
    assert a.alive() and nodes_by_name(a)["node0"]["state"] == "up"


def final(c: Any, iid: str, nodes: list[Daemon]) -> dict[str, Any]:
    """The instance once it has ended; when it does not, what each node knew of it."""
    try:
        st: dict[str, Any] = c.wait("acme", iid, timeout_s=180)
        return st
    except StepVisorError as exc:
        said = [
            (n.events("supervisor.ready")[:1], [e for e in n.logs() if e.get("instance") == iid])
            for n in nodes
        ]
        acts = c.history("acme", iid)["activations"]
        raise AssertionError(
            f"{exc}\nactivations: {acts}\nnodes: {c.nodes()}\nwhat each node logged: {said}"
        ) from None


def test_three_nodes_under_load_survive_a_kill_and_a_pause(
    make_daemon, database: str, shared: Path
) -> None:
    """The issue's chaos run: three nodes under load; kill -9 one, SIGSTOP another past its
    lease and resume it. Every instance completes with the right output, nothing is journaled
    twice or by a fenced node, and the tenant's concurrency holds (sampled from the database)."""
    # Two slots a node, five for the tenant: no two nodes can take all the work.
    nodes = cluster(make_daemon, shared, 3, slots=2, max_concurrent=5)
    a, b, c3 = nodes
    c = c3.client()
    deploy_source(c, "acme", SRC)
    log = make_log(shared)
    ids = [f"i{n}" for n in range(16)]
    with LeaseSampler(database, "acme").sampling() as leases:
        c.create_batch("acme", "w", [(i, {"log": str(log), "steps": 4, "pause": 0.3}) for i in ids])
        wait_for(lambda: nodes_by_name(c3)["node0"]["running"], 60, "node0 to run steps")
        a.stop(signal.SIGKILL)
        wait_for(lambda: nodes_by_name(c3)["node1"]["running"], 60, "node1 to run steps")
        assert b.proc is not None
        b.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: nodes_by_name(c3)["node1"]["state"] == "fenced", 60, "node1 fenced")
        finally:
            b.proc.send_signal(signal.SIGCONT)
        assert b.proc.wait(30) == 75, b.stray_output()
        finals = {i: final(c, i, nodes) for i in ids}
    assert {st["status"] for st in finals.values()} == {"complete"}
    runs = executions(log)
    for iid, st in finals.items():
        for seq, token in enumerate(st["output"]):
            assert runs[(iid, seq)][-1] == token  # the journaled result is the last run's
        assert [e["seq"] for e in c.history("acme", iid)["entries"]] == list(range(4))
    assert leases.most <= 5
    with psycopg.connect(database) as pg:
        late = pg.execute(
            "SELECT j.instance, j.seq, a.node FROM journal j JOIN activations a"
            " ON a.tenant = j.tenant AND a.instance = j.instance AND a.seq = j.seq"
            " AND a.outcome = 'ok' JOIN nodes n ON n.id = a.node"
            " WHERE n.fenced_at IS NOT NULL AND j.finished_at > n.fenced_at"
        ).fetchall()
        fenced = {r[0] for r in pg.execute("SELECT id FROM nodes WHERE fenced_at IS NOT NULL")}
    assert late == []  # no step journaled by a node after it was fenced
    assert fenced == {"node0", "node1"}


def test_terminate_through_another_node_kills_the_step_where_it_runs(
    make_daemon, shared: Path
) -> None:
    [a] = cluster(make_daemon, shared, 1)
    ca = a.client()
    _, pid = start_gated(ca, shared)
    b = make_daemon(*node_config(shared, 1))
    cb = b.client()
    cb.terminate("acme", "g")
    assert cb.status("acme", "g")["status"] == "terminated"
    wait_gone(pid, 10, "the step node0 runs, stopped through node1")

    def gated() -> dict[str, Any]:
        [act] = [x for x in cb.history("acme", "g")["activations"] if x["seq"] == GATED_SEQ]
        return act

    # node0 records the outcome when it reaps the process, a moment after the process is gone.
    wait_for(lambda: gated()["outcome"] is not None, 10, "node0 recording the killed step")
    act = gated()
    assert (act["node"], act["outcome"]) == ("node0", "killed_by_operator")
    assert "through another node" in act["detail"]
    assert ca.status("acme", "g")["status"] == "terminated"


def test_a_request_held_up_by_another_transaction_gets_unavailable_and_the_node_lives(
    make_daemon, database: str, shared: Path
) -> None:
    """lock_timeout is two leases: a request that waits longer on a row another transaction
    holds (here an operator's open session) is answered UNAVAILABLE, changing nothing."""
    config, server = node_config(shared, 0)
    d = make_daemon(config, server.replace(f"lease_s = {LEASE_S}", "lease_s = 1"))
    c = d.client()
    start_gated(c, shared)
    with psycopg.connect(database) as holder:
        holder.execute("SELECT 1 FROM instances WHERE tenant = 'acme' AND id = 'g' FOR UPDATE")
        with pytest.raises(StepVisorError) as refused:
            c.pause("acme", "g")
    assert refused.value.code == "UNAVAILABLE" and "retry" in str(refused.value)
    assert d.alive() and d.events("api.contended")
    assert c.pause("acme", "g")["status"] in ("running", "paused")  # the retry goes through
    (shared / "go").touch()
    wait_for(lambda: c.status("acme", "g")["status"] == "paused", 60, "the pause after the step")
