"""`python -m bench`: the whole benchmark in one run, every figure next to a peer or a floor
measured in the same run on the same machine.

Sections, in order (see bench/README.md for what each measures and how):
1. floor: fork()+_exit+waitpid in a fresh interpreter;
2. throughput: W workflows x S no-op steps, sequential and C concurrent, stepvisor fork mode,
   stepvisor spawn mode and DBOS Transact on SQLite (in-process, no isolation);
3. activation overhead: launch -> reaped (and -> result committed) of a no-op step, fork vs
   spawn vs the fork floor;
4. replay scaling: the activation of step 1, 100 and 1000 of one workflow;
5. idle scaling: supervisor RSS, idle CPU and CPU per activation with 1k vs 100k sleeping
   instances in its database;
6. create rate through the batch API;
7. core scaling: the concurrent throughput run with the whole run (supervisor, fork server,
   activations; DBOS's process) pinned to one CPU and then to two (`sched_setaffinity`, as
   `taskset` does), stepvisor beside DBOS.
Results go to <out>/suite.json and <out>/suite.md; wall-clock figures are reported, never
asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.dbos_peer import PeerFailed, PeerUnavailable, run_dbos
from bench.harness import (
    TENANT,
    BenchError,
    environment,
    guarded,
    log,
    markdown_rows,
    positive_int,
    run_workload,
    summarize,
    supervised,
    workflow_source,
    working_ms,
    workload_parser,
    write_report,
)
from bench.spawn import fork_floor
from stepvisor.client import Client

REPLAY_POINTS = (1, 100, 1000)  # step numbers (1-based) whose activations are compared
REPLAY_WINDOW = 5  # activations around each point, medianed: one activation is noise


# ---------------------------------------------------------------------------- throughput


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median steps/s (of an even number, the slower middle one), whole, with
    every round's steps/s beside it: one run on a shared 2-core machine is noise (±10%)."""
    ordered = sorted(runs, key=lambda r: r["steps_per_s"])
    pick = dict(ordered[(len(ordered) - 1) // 2])
    pick["rounds_steps_per_s"] = [r["steps_per_s"] for r in runs]
    return pick


def _dbos_run(args: argparse.Namespace, conc: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="svb-dbos-") as work:
        try:
            return run_dbos(args.workflows, args.steps, conc, Path(work), timeout=args.timeout)
        except PeerFailed as exc:
            raise BenchError(f"DBOS run failed: {exc}") from None


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Every (engine, concurrency) pair on the same workload: fork mode and DBOS `args.rounds`
    times each, interleaved so that drift of the machine hits both alike, reported as the
    median round; spawn mode (8x slower, far from the others) once."""
    runs: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, Any] = {}
    for r in range(args.rounds):
        for conc in (1, args.concurrency):
            log(f"throughput: stepvisor fork mode, concurrency {conc} (round {r + 1})")
            with supervised(conc, launch_mode="fork") as sup:
                runs.setdefault(f"stepvisor-fork/{conc}", []).append(
                    run_workload(sup, args.workflows, args.steps, args.timeout)
                )
            if args.skip_dbos or skipped:
                continue
            log(f"throughput: DBOS Transact on SQLite, concurrency {conc} (round {r + 1})")
            try:
                runs.setdefault(f"dbos/{conc}", []).append(_dbos_run(args, conc))
            except PeerUnavailable as exc:
                log(f"DBOS skipped: {exc}")
                skipped = {f"dbos/{c}": {"skipped": str(exc)} for c in (1, args.concurrency)}
    out: dict[str, Any] = {key: _median_run(rs) for key, rs in runs.items()}
    out.update(skipped)
    if not args.skip_spawn:
        for conc in (1, args.concurrency):
            log(f"throughput: stepvisor spawn mode, concurrency {conc}")
            with supervised(conc, launch_mode="spawn") as sup:
                out[f"stepvisor-spawn/{conc}"] = run_workload(
                    sup, args.workflows, args.steps, args.timeout
                )
    return out


# ---------------------------------------------------------------------------- core scaling


@contextlib.contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    """This process, and every process it starts meanwhile, on `cpus` only (as `taskset`)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def core_scaling(args: argparse.Namespace) -> dict[str, Any]:
    """Steps/s at `args.concurrency` on one CPU and on two, per engine, the median of
    `args.rounds` interleaved rounds. An engine whose work is spread over processes can use the
    second CPU; one bound by a GIL cannot."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {"skipped": "needs two CPUs"}
    seen: dict[str, dict[str, list[float]]] = {}
    dbos = not args.skip_dbos
    for r in range(args.rounds):
        for n in (1, 2):
            on = set(cpus[:n])
            log(
                f"core scaling: stepvisor fork, concurrency {args.concurrency}, CPUs {on} ({r + 1})"
            )
            with pinned(on), supervised(args.concurrency) as sup:
                run = run_workload(sup, args.workflows, args.steps, args.timeout)
            seen.setdefault("stepvisor-fork", {}).setdefault(str(n), []).append(run["steps_per_s"])
            if not dbos:
                continue
            log(f"core scaling: DBOS, concurrency {args.concurrency}, CPUs {on} (round {r + 1})")
            with pinned(on):
                try:
                    peer = _dbos_run(args, args.concurrency)
                except (PeerUnavailable, BenchError) as exc:
                    log(f"DBOS skipped: {exc}")
                    dbos = False
                    seen.pop("dbos", None)
                    continue
            seen.setdefault("dbos", {}).setdefault(str(n), []).append(peer["steps_per_s"])
    out: dict[str, Any] = {}
    for engine, by_cpus in seen.items():
        runs: dict[str, Any] = {n: statistics.median(v) for n, v in by_cpus.items()}
        runs["rounds"] = by_cpus
        if "1" in runs and "2" in runs:
            runs["ratio"] = round(runs["2"] / runs["1"], 2)
        out[engine] = runs
    return out


# ---------------------------------------------------------------------------- replay scaling


def _long_workflow(steps: int) -> str:
    return textwrap.dedent(f"""\
        from stepvisor import workflow


        @workflow("long")
        def long(event, step):
            for i in range({steps}):
                step.do(f"s{{i}}", lambda: i)
            return {steps}
    """)


def replay_scaling(timeout_s: float, rounds: int) -> dict[str, Any]:
    """`rounds` workflows of max(REPLAY_POINTS) steps, one after another on one supervisor in
    fork mode; the activation that runs step k replays k-1 journal entries first. Each point is
    the median over the activations up to it in every round: one round's five swung the ratio
    between 1.16x and 1.65x."""
    steps = max(REPLAY_POINTS)
    by_round: list[dict[int, dict[str, Any]]] = []
    with supervised(1) as sup, Client(sup.endpoint, timeout_s=60.0) as c:
        c.deploy(TENANT, _long_workflow(steps), filename="long.py")
        for r in range(rounds):
            iid = f"long{r}"
            log(f"replay: one workflow of {steps} no-op steps (fork mode, round {r + 1})")
            c.create(TENANT, "long", id=iid)
            st = c.wait(TENANT, iid, timeout_s=timeout_s)
            if st["status"] != "complete":
                raise BenchError(
                    f"the {steps}-step workflow ended {st['status']}: {st.get('error')}"
                )
            acts = c.history(TENANT, iid)["activations"]
            by_round.append({a["seq"]: a for a in acts if a.get("seq") is not None})
    points: dict[str, Any] = {}
    for k in REPLAY_POINTS:
        seqs = range(max(0, k - REPLAY_WINDOW), k) if k > 1 else range(REPLAY_WINDOW)
        window = [by_seq[s] for by_seq in by_round for s in seqs if s in by_seq]
        points[str(k)] = {
            "seqs": list(seqs),
            "activations": len(window),
            "total_ms": statistics.median(working_ms(a) or 0.0 for a in window),
            "exec_ms": statistics.median(a["exec_ms"] for a in window),
            "cpu_ms": statistics.median(a["cpu_ms"] for a in window),
        }
    first, last = points["1"], points[str(steps)]
    return {
        "steps": steps,
        "rounds": rounds,
        "points": points,
        "ratio_total": round(last["total_ms"] / first["total_ms"], 2),
        "ratio_exec": round(last["exec_ms"] / first["exec_ms"], 2),
    }


# ---------------------------------------------------------------------------- idle scaling

_SLEEPER = textwrap.dedent("""\
    from stepvisor import workflow


    @workflow("sleeper")
    def sleeper(event, step):
        step.sleep("nap", "30 days")
        return "woke"
""")

_INSTANCE_COLS = (
    "tenant, workflow, version, status, params, output, error, wake_at, lease, pause_requested, "
    "failures, activations, steps, created_at, updated_at"
)
_JOURNAL_COLS = (
    "tenant, seq, kind, name, status, attempts, result, error, until, event_type, retry_limit, "
    "retry_delay_s, backoff, timeout_s, started_at, finished_at, duration_ms"
)


def _clone_sleepers(db: Path, template: str, count: int) -> None:
    """Copy one sleeping instance (its row and its journal) `count - 1` times, with the
    supervisor stopped: the state a supervisor would have after that many real sleeps."""
    conn = sqlite3.connect(db)
    with conn:
        for table, cols, key in (
            ("instances", _INSTANCE_COLS, "id"),
            ("journal", _JOURNAL_COLS, "instance"),
        ):
            conn.execute(
                f"WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < ?) "
                f"INSERT INTO {table} ({key}, {cols}) "
                f"SELECT 'idle' || k, {cols} FROM {table}, n WHERE {key} = ?",
                (count - 1, template),
            )
    conn.close()


def _check_sleepers(db: Path, n: int) -> None:
    conn = sqlite3.connect(db)
    try:
        (count,) = conn.execute(
            "SELECT count(*) FROM instances WHERE status = 'waiting' AND wake_at IS NOT NULL"
        ).fetchone()
    finally:
        conn.close()
    if count != n:
        raise BenchError(f"expected {n} sleeping instances, found {count}")


def idle_scaling(sizes: list[int], timeout_s: float, rounds: int) -> dict[str, Any]:
    """For each size: N sleeping instances in the database, then a fresh supervisor start, its
    RSS and CPU while idle, and its CPU per activation while 40 x 10 no-op steps run beside
    them, `rounds` times, the sizes' runs interleaved so that the machine's drift hits both
    alike; the median round is reported (one round of each swung the ratio from 0.93x to
    1.22x)."""
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        sups = {}
        for n in sizes:
            log(f"idle: {n} sleeping instances")
            sup = stack.enter_context(supervised(2))
            with Client(sup.endpoint, timeout_s=60.0) as c:
                c.deploy(TENANT, _SLEEPER, filename="sleeper.py")
                c.create(TENANT, "sleeper", id="template")
                _wait_status(c, "template", "waiting", timeout_s)
            sup.stop()
            _clone_sleepers(sup.state / "stepvisor.db", "template", n)
            sup.start()
            _check_sleepers(sup.state / "stepvisor.db", n)
            sups[n] = sup
        for n, sup in sups.items():
            assert sup.proc is not None
            proc = psutil.Process(sup.proc.pid)
            time.sleep(1.0)  # a measurement window, not a wait for a condition
            cpu0, t0 = _cpu_ns(proc.pid), time.perf_counter()
            time.sleep(3.0)
            cpu1, idle_s = _cpu_ns(proc.pid), time.perf_counter() - t0
            out[str(n)] = {
                "sleeping": n,
                "rss_idle_mib": round(proc.memory_info().rss / 2**20, 2),
                "idle_cpu_ms_per_s": round(max(0.0, (cpu1 - cpu0) / 1e6 / idle_s), 3),
                "rounds": [],
            }
        for r in range(rounds):
            for n, sup in sups.items():
                log(f"idle: {n} sleeping instances, 40 x 10 steps beside them (round {r + 1})")
                run = run_workload(sup, 40, 10, timeout_s, prefix=f"r{r}w")
                out[str(n)]["rounds"].append(run)
        for n, sup in sups.items():
            assert sup.proc is not None
            entry = out[str(n)]
            runs = entry.pop("rounds")
            entry["rss_after_work_mib"] = round(
                psutil.Process(sup.proc.pid).memory_info().rss / 2**20, 2
            )
            per_act = [run["cpu"]["supervisor_ms_per_activation"] for run in runs]
            entry["supervisor_ms_per_activation"] = statistics.median(per_act)
            entry["rounds_supervisor_ms_per_activation"] = per_act
            entry["steps_per_s"] = statistics.median(run["steps_per_s"] for run in runs)
    return out


def _cpu_ns(pid: int) -> int:
    """CPU time of a process in ns (/proc/PID/schedstat: finer than the clock ticks of stat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def _wait_status(c: Client, instance: str, status: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (st := c.status(TENANT, instance))["status"] != status:
        if st["status"] in ("errored", "terminated", "complete") or time.monotonic() > deadline:
            raise BenchError(f"instance {instance} is {st['status']}, expected {status}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------- create rate


def create_rate(count: int, timeout_s: float) -> dict[str, Any]:
    """`count` one-step instances through create_batch in batches of 10,000, timed per call
    (the supervisor keeps launching them meanwhile, one at a time)."""
    log(f"create rate: {count} instances via create_batch")
    with supervised(1) as sup, Client(sup.endpoint, timeout_s=120.0) as c:
        c.deploy(TENANT, workflow_source(1), filename="one.py")
        calls: list[float] = []
        for start in range(0, count, 10_000):
            ids = [(f"c{k:07d}", None) for k in range(start, min(count, start + 10_000))]
            t0 = time.perf_counter()
            made = c.create_batch(TENANT, "noop", ids)
            calls.append(time.perf_counter() - t0)
            if sum(1 for r in made if r["created"]) != len(ids):
                raise BenchError("create_batch did not create every instance")
        total = sum(calls)
    return {
        "instances": count,
        "batches": len(calls),
        "seconds": round(total, 3),
        "per_s": round(count / total, 1),
    }


# ---------------------------------------------------------------------------- report


def _p(s: dict[str, Any], q: str) -> str:
    return "n/a" if not s.get("n") else f"{s[q]:.1f}"


def markdown(res: dict[str, Any]) -> str:
    cfg, env, tp = res["config"], res["environment"], res["throughput"]
    floor = res["floor_fork_ms"]
    w, s = cfg["workflows"], cfg["steps"]
    parts = [
        "# stepvisor benchmark\n",
        f"{res['started_at']} · Python {env['python']} · {env['platform']} · "
        f"{env['cpu_count']} CPUs · commit {env['git_commit']}"
        f"{' (dirty)' if env['git_dirty'] else ''} · `python -m bench` · every isolation "
        'layer the host has (`auto`), `synchronous = "acked"`, fork_spares 2 · cgroup moves: '
        f"{env.get('cgroup_moves', 'not recorded')}\n",
        f"## Throughput: {w} workflows x {s} no-op steps\n",
    ]
    dbos1 = tp.get("dbos/1", {}).get("steps_per_s")
    rows: list[tuple[str, ...]] = [
        ("engine", "concurrency", "steps/s", "x DBOS (same concurrency)", "wall", "rounds")
    ]
    order = ("stepvisor-fork", "stepvisor-spawn", "dbos")
    for key, run in sorted(tp.items(), key=lambda kv: order.index(kv[0].split("/")[0])):
        engine, c = key.split("/")
        if "skipped" in run:
            rows.append((engine, c, "skipped", run["skipped"][:60], "", ""))
            continue
        peer = tp.get(f"dbos/{c}", {}).get("steps_per_s")
        ratio = f"{run['steps_per_s'] / peer:.2f}x" if peer else "n/a"
        rounds = ", ".join(f"{x:.1f}" for x in run.get("rounds_steps_per_s", []))
        rows.append(
            (engine, c, f"{run['steps_per_s']:.1f}", ratio, f"{run['wall_s']:.2f} s", rounds)
        )
    parts.append(markdown_rows(rows) + "\n")
    parts.append(
        f"Fork mode and DBOS: the median of {cfg.get('rounds', 1)} interleaved rounds (its "
        "wall time and every figure below that comes from a throughput run are that round's); "
        "spawn mode: one round.\n"
    )
    if dbos1 is None:
        parts.append("DBOS was not measured (install it: `pip install dbos`).\n")
    parts.append("## Activation overhead (no-op step, sequential: launch -> reaped)\n")
    rows = [("", "p50 ms", "p95 ms", "p99 ms", "p50 / fork floor", "to result committed p50")]
    rows.append(
        (
            "fork()+_exit+waitpid floor",
            _p(floor, "p50"),
            _p(floor, "p95"),
            _p(floor, "p99"),
            "1",
            "",
        )
    )
    for mode in ("fork", "spawn"):
        run = tp.get(f"stepvisor-{mode}/1")
        if run is None:
            continue
        t = run["activation"]["total_ms"]
        rows.append(
            (
                f"stepvisor {mode} mode",
                _p(t, "p50"),
                _p(t, "p95"),
                _p(t, "p99"),
                f"{t['p50'] / floor['p50']:.1f}x",
                _p(run["committed_ms"], "p50") if run.get("committed_ms") else "n/a",
            )
        )
    parts.append(markdown_rows(rows) + "\n")
    fork1 = tp.get("stepvisor-fork/1")
    if fork1 and fork1.get("phases"):
        ph = fork1["phases"]
        parts.append(
            "Where a sequential fork-mode activation's time goes (the record's `phases`, p50 ms): "
            + ", ".join(f"{name} {v['p50']:.2f}" for name, v in ph.items())
            + ".\n"
        )
    loops = {
        conc: run["loop_per_activation"]
        for conc in (1, 8)
        if (run := tp.get(f"stepvisor-fork/{conc}")) and run.get("loop_per_activation")
    }
    if loops:
        parts.append(
            "The supervisor's loop per fork-mode activation (`stepvisor stats`' `loop`): "
            + "; ".join(
                f"concurrency {conc}: {lp['iterations']} iterations, {lp['commits']} commits, "
                f"{lp['syncs']} log syncs"
                for conc, lp in loops.items()
            )
            + ".\n"
        )
    faults = {
        conc: run["faults_per_activation"]
        for conc in (1, 8)
        if (run := tp.get(f"stepvisor-fork/{conc}")) and "faults_per_activation" in run
    }
    if faults:
        parts.append(
            "Page faults per fork-mode activation (its copy-on-write after the fork, mostly; "
            "the supervisor's reaped children): "
            + "; ".join(f"concurrency {conc}: {n}" for conc, n in faults.items())
            + ".\n"
        )
    rp = res["replay"]
    parts.append(
        f"## Replay scaling: {rp.get('rounds', 1)} workflows of {rp['steps']} steps, fork mode\n"
    )
    rows = [("activation of step", "total ms", "exec ms", "CPU ms")]
    for k, pt in rp["points"].items():
        rows.append((k, f"{pt['total_ms']:.2f}", f"{pt['exec_ms']:.2f}", f"{pt['cpu_ms']:.2f}"))
    parts.append(markdown_rows(rows) + "\n")
    parts.append(
        f"Step {rp['steps']} / step 1: total {rp['ratio_total']}x, exec {rp['ratio_exec']}x "
        f"(median of the {REPLAY_WINDOW} activations up to each step in each of "
        f"{rp.get('rounds', 1)} runs).\n"
    )
    idle = res["idle"]
    parts.append("## Idle scaling: sleeping instances in the database\n")
    rows = [
        (
            "sleeping",
            "RSS idle MiB",
            "RSS after work MiB",
            "idle CPU ms/s",
            "sup CPU ms/act",
            "rounds",
        )
    ]
    for v in idle.values():
        each = v.get("rounds_supervisor_ms_per_activation", [])
        rows.append(
            (
                f"{v['sleeping']:,}",
                f"{v['rss_idle_mib']:.1f}",
                f"{v['rss_after_work_mib']:.1f}",
                f"{v['idle_cpu_ms_per_s']:.2f}",
                f"{v['supervisor_ms_per_activation']:.2f}",
                ", ".join(f"{x:.2f}" for x in each),
            )
        )
    parts.append(markdown_rows(rows) + "\n")
    if len(idle) == 2:
        a, b = idle.values()
        rss = b["rss_after_work_mib"] / a["rss_after_work_mib"]
        cpu = b["supervisor_ms_per_activation"] / a["supervisor_ms_per_activation"]
        parts.append(
            f"{b['sleeping']:,} vs {a['sleeping']:,}: RSS {rss:.2f}x, "
            f"supervisor CPU per activation {cpu:.2f}x.\n"
        )
    cr = res["create"]
    parts.append(
        f"## Create rate\n\n{cr['instances']:,} instances in {cr['batches']} `create_batch` calls: "
        f"{cr['per_s']:,.0f} creations/s ({cr['seconds']:.2f} s).\n"
    )
    cores = res.get("cores", {})
    if "skipped" not in cores and cores:
        parts.append(
            f"## Core scaling: {w} x {s} no-op steps, concurrency {cfg['concurrency']}, "
            "pinned to 1 then 2 CPUs\n"
        )
        rows = [("engine", "steps/s on 1 CPU", "on 2 CPUs", "2 / 1", "rounds (1 CPU; 2 CPUs)")]
        for engine, runs in cores.items():
            each = runs.get("rounds", {})
            rows.append(
                (
                    engine,
                    f"{runs.get('1', 0):.1f}",
                    f"{runs.get('2', 0):.1f}",
                    f"{runs['ratio']:.2f}x" if "ratio" in runs else "n/a",
                    "; ".join(", ".join(f"{x:.1f}" for x in each.get(n, [])) for n in ("1", "2")),
                )
            )
        parts.append(markdown_rows(rows) + "\n")
    parts.append("## Against the targets\n")
    rows = [("target", "measured", "met")]
    for name, value, met in targets(res):
        rows.append((name, value, "yes" if met else "**no**"))
    parts.append(markdown_rows(rows) + "\n")
    return "\n".join(parts)


def targets(res: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The performance targets stepvisor holds itself to, against this run's figures."""
    out: list[tuple[str, str, bool]] = []
    tp = res["throughput"]
    fork1 = tp.get("stepvisor-fork/1")
    if fork1:
        c = fork1["committed_ms"]
        out.append(
            (
                "activation launch -> result committed p50 <= 3 ms",
                f"{c['p50']:.1f} ms",
                c["p50"] <= 3,
            )
        )
        out.append(
            (
                "activation launch -> result committed p99 <= 6 ms",
                f"{c['p99']:.1f} ms",
                c["p99"] <= 6,
            )
        )
        cpu = fork1["activation"]["cpu_ms"]["p50"]
        out.append(("activation CPU (rusage) p50 <= 2 ms", f"{cpu:.1f} ms", cpu <= 2))
    for key, run in tp.items():
        engine, conc = key.split("/")
        peer = tp.get(f"dbos/{conc}", {}).get("steps_per_s")
        if engine == "stepvisor-fork" and peer:
            ratio = run["steps_per_s"] / peer
            out.append(
                (f"throughput >= 1.0x DBOS, concurrency {conc}", f"{ratio:.2f}x", ratio >= 1.0)
            )
        if engine == "stepvisor-fork":
            sup = run["cpu"]["supervisor_ms_per_activation"]
            out.append(
                (
                    f"supervisor CPU <= 1 ms per activation, concurrency {conc}",
                    f"{sup:.2f} ms",
                    sup <= 1.0,
                )
            )
    cores = res.get("cores", {}).get("stepvisor-fork", {})
    if "ratio" in cores:
        peer = res["cores"].get("dbos", {}).get("ratio")
        beside = f" (DBOS {peer:.2f}x)" if peer else ""
        out.append(
            (
                "steps/s on 2 CPUs >= 1.8x on 1 CPU",
                f"{cores['ratio']:.2f}x{beside}",
                cores["ratio"] >= 1.8,
            )
        )
    rp = res["replay"]
    out.append(
        (
            f"step-{rp['steps']} activation <= 1.5x step-1",
            f"{rp['ratio_total']:.2f}x",
            rp["ratio_total"] <= 1.5,
        )
    )
    idle = list(res["idle"].values())
    if len(idle) == 2:
        a, b = idle
        rss = b["rss_after_work_mib"] / a["rss_after_work_mib"]
        cpu = b["supervisor_ms_per_activation"] / a["supervisor_ms_per_activation"]
        out.append(
            (
                f"RSS growth {a['sleeping']:,} -> {b['sleeping']:,} sleeping <= 1.1x",
                f"{rss:.2f}x",
                rss <= 1.1,
            )
        )
        out.append(
            (
                f"scheduling CPU growth {a['sleeping']:,} -> {b['sleeping']:,} <= 1.1x",
                f"{cpu:.2f}x",
                cpu <= 1.1,
            )
        )
    per_s = res["create"]["per_s"]
    out.append((">= 2,000 creations/s via create_batch", f"{per_s:,.0f}/s", per_s >= 2000))
    return out


# ---------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = workload_parser(
        "python -m bench",
        __doc__,
        workflows=100,
        steps=10,
        concurrency=8,
        outputs="suite.json and suite.md",
        timeout_s=900.0,
    )
    p.add_argument("--skip-spawn", action="store_true", help="leave out spawn mode (slow)")
    p.add_argument("--skip-dbos", action="store_true", help="leave out the DBOS peer")
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="runs of each fork-mode and DBOS throughput and core-scaling figure, interleaved; "
        "the median is reported (default 3)",
    )
    p.add_argument(
        "--idle",
        type=positive_int,
        nargs=2,
        default=[1_000, 100_000],
        metavar=("SMALL", "LARGE"),
        help="sleeping instances for the idle-scaling comparison (default 1000 100000)",
    )
    p.add_argument(
        "--creates",
        type=positive_int,
        default=50_000,
        help="instances created for the create rate (default 50000)",
    )
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    env = environment()
    log("floor: fork()+_exit+waitpid x200")
    floor = summarize(fork_floor(200))
    res: dict[str, Any] = {
        "benchmark": "suite",
        "started_at": started,
        "config": {
            "workflows": args.workflows,
            "steps": args.steps,
            "concurrency": args.concurrency,
            "idle": args.idle,
            "creates": args.creates,
            "rounds": args.rounds,
        },
        "environment": env,
        "floor_fork_ms": floor,
    }
    res["throughput"] = throughput(args)
    res["replay"] = replay_scaling(args.timeout, args.rounds)
    res["idle"] = idle_scaling(list(args.idle), args.timeout, args.rounds)
    res["create"] = create_rate(args.creates, args.timeout)
    res["cores"] = core_scaling(args)
    return res


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    status, res = guarded(lambda: run(args))
    if res is None:
        return status
    write_report(args.out, "suite", res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
