"""`python -m bench.nodes`: several supervisor nodes on one PostgreSQL database.

Runs the no-op workload (the suite's: W workflows x S steps, one tenant) on one node on the
embedded SQLite, then on 1, 2 and 3 nodes sharing a throwaway PostgreSQL cluster (Debian's
server binaries, as the tests use), and reports steps/s as ratios to one node on SQLite and to
one node on PostgreSQL. Every run has the same concurrency C: the tenant's `max_concurrent` is
C, cluster-wide, and each of n nodes has C / n activation slots (`max_activations`), so every
node takes its share (a node with slots to spare would run the whole workload itself: the node
that settles a step claims the instance's next one in the same transaction). On a machine with
few cores the nodes share them, so this measures what spreading costs, not what more machines
would give.

Then create-to-start latency across nodes: node A is kept full (one slot, held by a long step),
so each instance created through A must be started by node B, woken by LISTEN/NOTIFY; the
latency is B's launch time minus A's create time, both read from the database.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.harness import (
    TENANT,
    BenchError,
    Supervisor,
    environment,
    guarded,
    log,
    markdown_rows,
    run_workload,
    summarize,
    supervised,
    workload_parser,
    write_report,
)
from stepvisor.client import Client
from tests.pg import Cluster, cluster_owner, find_binaries

LEASE_S = 5.0


def node_server(url: str, n: int) -> tuple[str, str]:
    """([server] lines, [isolation] table) of node `n`: the shared database, and a sandbox uid
    range of its own (nodes on one host must not hand one uid to two activations at once)."""
    low = 900_000 + n * 10_000
    server = f'database = "{url}"\nnode_name = "node{n}"\nlease_s = {LEASE_S}\n'
    return server, f"\n[isolation]\nsandbox_uid_range = [{low}, {low + 9_999}]\n"


@contextlib.contextmanager
def nodes(url: str, count: int, concurrency: int, slots: int | None = None) -> Iterator[list]:
    """`count` started supervisors sharing the database at `url`, each with `slots`
    activation slots (default: `concurrency`), all with the tenant's `max_concurrent` =
    `concurrency`; stopped on the way out."""
    base = Path(tempfile.mkdtemp(prefix="svn-", dir="/tmp"))
    base.chmod(0o711)
    sups: list[Supervisor] = []
    try:
        for n in range(count):
            d = base / f"n{n}"
            d.mkdir()
            d.chmod(0o711)
            server, extra = node_server(url, n)
            sup = Supervisor(d, concurrency, server=server, extra=extra, slots=slots)
            sup.start()
            sups.append(sup)
        yield sups
    finally:
        for sup in sups:
            if (rc := sup.stop()) not in (None, 0):
                log(f"node exited with status {rc}: {sup.log_tail(10)}")
            sup.remove_leftover_cgroups()
        shutil.rmtree(base, ignore_errors=True)


def fresh_database(cluster: Cluster, name: str) -> str:
    with psycopg.connect(cluster.url("postgres"), autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return cluster.url(name)


def throughput(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    log("1 node on SQLite")
    with supervised(args.concurrency) as sup:
        runs["sqlite_1"] = run_workload(sup, args.workflows, args.steps, args.timeout)
    for count in (1, 2, 3):
        log(f"{count} node(s) on PostgreSQL")
        url = fresh_database(cluster, f"bench_{count}")
        slots = -(-args.concurrency // count)  # C / n, rounded up
        with nodes(url, count, args.concurrency, slots) as sups:
            res = run_workload(sups[0], args.workflows, args.steps, args.timeout)
        with psycopg.connect(url) as pg:
            spread: dict[str, int] = dict(
                pg.execute("SELECT node, COUNT(*) FROM activations GROUP BY node")
            )
        res["activations_by_node"] = dict(sorted(spread.items()))
        runs[f"postgresql_{count}"] = res
    base_lite = runs["sqlite_1"]["steps_per_s"]
    base_pg = runs["postgresql_1"]["steps_per_s"]
    for res in runs.values():
        res["vs_sqlite_1"] = round(res["steps_per_s"] / base_lite, 3)
        res["vs_postgresql_1"] = round(res["steps_per_s"] / base_pg, 3)
    return runs


BLOCK = """
import time
from stepvisor import workflow

@workflow("block")
def block(event, step):
    step.do("hold", lambda: time.sleep(600), timeout=900)

@workflow("one")
def one(event, step):
    return step.do("only", lambda: 1)
"""


def latency(cluster: Cluster, samples: int, timeout_s: float) -> dict[str, Any]:
    """Create through a full node A; node B starts it. Launch time minus create time."""
    url = fresh_database(cluster, "bench_latency")
    with nodes(url, 1, 4, slots=1) as [a], Client(a.endpoint, timeout_s=30) as ca:
        ca.deploy(TENANT, textwrap.dedent(BLOCK), filename="block.py")
        ca.create(TENANT, "block", id="blocker")
        _wait_running(url, "blocker", timeout_s)
        base = a.base.parent
        d = base / "n1"
        d.mkdir()
        d.chmod(0o711)
        server, extra = node_server(url, 1)
        b = Supervisor(d, 4, server=server, extra=extra)
        b.start()
        try:
            ms = []
            for k in range(samples):
                iid = f"l{k:04d}"
                ca.create(TENANT, "one", id=iid)
                created, launched, node = _wait_running(url, iid, timeout_s)
                if node != "node1":
                    raise BenchError(f"{iid} started on {node}, not on the free node")
                ms.append((launched - created) * 1000)
                ca.wait(TENANT, iid, timeout_s=timeout_s)
        finally:
            b.stop()
            b.remove_leftover_cgroups()
    return {"samples": samples, "create_to_start_ms": summarize(ms)}


def _wait_running(url: str, iid: str, timeout_s: float) -> tuple[float, float, str]:
    """(created_at, first launched_at, node) of the instance once an activation has started."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(url, autocommit=True) as pg:
        while True:
            row = pg.execute(
                "SELECT i.created_at, a.launched_at, a.node FROM instances i"
                " JOIN activations a ON a.tenant = i.tenant AND a.instance = i.id"
                " WHERE i.tenant = %s AND i.id = %s ORDER BY a.id LIMIT 1",
                (TENANT, iid),
            ).fetchone()
            if row is not None:
                return float(row[0]), float(row[1]), str(row[2])
            if time.monotonic() > deadline:
                raise BenchError(f"{iid} did not start within {timeout_s:g} s")
            time.sleep(0.005)  # polling the database from outside; the nodes do not wait on it


def markdown(res: dict[str, Any]) -> str:
    rows = [("run", "steps/s", "vs 1 node SQLite", "vs 1 node PostgreSQL", "activations by node")]
    for name, r in res["throughput"].items():
        rows.append(
            (
                name.replace("_", ", ") + " node(s)",
                f"{r['steps_per_s']:.1f}",
                f"{r['vs_sqlite_1']:.2f}",
                f"{r['vs_postgresql_1']:.2f}",
                ", ".join(f"{k}: {v}" for k, v in r.get("activations_by_node", {}).items()) or "-",
            )
        )
    lat = res["latency"]["create_to_start_ms"]
    return "\n".join(
        [
            "# Several nodes on one PostgreSQL database",
            "",
            f"{res['config']['workflows']} workflows x {res['config']['steps']} no-op steps, "
            f"tenant max_concurrent {res['config']['concurrency']} (cluster-wide), "
            f"{res['environment'].get('cpu_count', '?')} CPUs, started {res['started_at']}.",
            "",
            markdown_rows(rows),
            "",
            f"Create on a full node to start on another ({res['latency']['samples']} samples): "
            f"p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, max {lat['max']:.1f} ms "
            "(LISTEN/NOTIFY; the fallback poll of the wake-up index is once a second).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = workload_parser(
        "python -m bench.nodes",
        __doc__,
        workflows=60,
        steps=10,
        concurrency=8,
        outputs="nodes.json and nodes.md",
        timeout_s=600.0,
    )
    p.add_argument("--samples", type=int, default=30, help="latency samples (default 30)")
    args = p.parse_args(argv)

    def run() -> dict[str, Any]:
        binaries = find_binaries()
        if binaries is None:
            raise BenchError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        cluster = Cluster(binaries, cluster_owner())
        cluster.start(durable=True)  # as durable as SQLite's synchronous = acked
        try:
            return {
                "benchmark": "nodes",
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "config": {
                    "workflows": args.workflows,
                    "steps": args.steps,
                    "concurrency": args.concurrency,
                },
                "environment": environment(),
                "throughput": throughput(cluster, args),
                "latency": latency(cluster, args.samples, args.timeout),
            }
        finally:
            cluster.stop()

    status, res = guarded(run)
    if res is None:
        return status
    write_report(args.out, "nodes", res, markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
