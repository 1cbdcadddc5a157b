"""Spawn-mode activation benchmark: a real supervisor, against process floors measured in this run.

One run does, in order:
1. floors on this machine, now: fork()+_exit+waitpid, `python -I -c pass`, and
   `python -I -c "import zmq, msgspec, cloudpickle"` (what every activation imports at least);
2. a real `stepvisor serve` (launch_mode spawn) in a temp dir; deploy a workflow of N no-op
   steps for tenant "bench"; create W instances with one create_batch; wait until all complete;
3. per-activation timings from every instance's history;
4. a Markdown table of the figures and their ratios to the floors, also written with the raw
   numbers to <out>/spawn.md and <out>/spawn.json;
5. SIGTERM to the supervisor and removal of the temp dir, also on error or interrupt.

Wall-clock figures are reported, never asserted: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

from bench.harness import (
    BenchError,
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

IMPORTS = "import zmq, msgspec, cloudpickle"
# The same kind of clean environment the launcher gives an activation (supervisor/launcher.py).
FLOOR_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "MALLOC_ARENA_MAX": "2",
}


# ---------------------------------------------------------------------------- floors


# Runs in a fresh `python -I` so the fork is bare: this process has imported zmq, psutil and
# stepvisor, and fork() copies page tables in proportion to the parent's mappings.
_FORK_SCRIPT = """
import json, os, sys, time
runs, warmup = int(sys.argv[1]), int(sys.argv[2])
out = []
for k in range(warmup + runs):
    t0 = time.perf_counter_ns()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    if k >= warmup:
        out.append((time.perf_counter_ns() - t0) / 1e6)
print(json.dumps(out))
"""


def fork_floor(runs: int, warmup: int = 10) -> list[float]:
    """fork() + os._exit(0) in the child + waitpid, in ms, timed inside a fresh interpreter."""
    r = subprocess.run(
        [sys.executable, "-I", "-c", _FORK_SCRIPT, str(runs), str(warmup)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=FLOOR_ENV,
        close_fds=True,
        check=False,
        timeout=120,
    )
    if r.returncode != 0:
        raise BenchError(
            f"fork floor exited {r.returncode}: {r.stderr.decode(errors='replace')[-2000:]}"
        )
    samples = json.loads(r.stdout)
    if len(samples) != runs:
        raise BenchError(f"fork floor returned {len(samples)} samples, expected {runs}")
    return [float(x) for x in samples]


def spawn_floor(argv: list[str], runs: int, warmup: int = 3) -> list[float]:
    """Popen(argv) + wait, in ms, with a clean environment and closed fds, like an activation."""
    check = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=FLOOR_ENV,
        close_fds=True,
        check=False,
    )
    if check.returncode != 0:
        raise BenchError(
            f"floor command {argv!r} exited {check.returncode}: "
            f"{check.stderr.decode(errors='replace')[-2000:]}"
        )
    out = []
    for k in range(warmup + runs):
        t0 = time.perf_counter_ns()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=FLOOR_ENV,
            close_fds=True,
        )
        rc = proc.wait()
        dt = (time.perf_counter_ns() - t0) / 1e6
        if rc != 0:
            raise BenchError(f"floor command {argv!r} exited {rc}")
        if k >= warmup:
            out.append(dt)
    return out


def measure_floors(
    fork_runs: int = 200, python_runs: int = 50, import_runs: int = 30
) -> dict[str, Any]:
    exe = sys.executable  # as is: no symlink resolution, no shim; the supervisor uses the same
    log(f"floor: fork()+_exit+waitpid x{fork_runs}")
    fork = summarize(fork_floor(fork_runs))
    log(f"floor: {exe} -I -c pass x{python_runs}")
    bare = summarize(spawn_floor([exe, "-I", "-c", "pass"], python_runs))
    log(f"floor: {exe} -I -c {IMPORTS!r} x{import_runs}")
    imports = summarize(spawn_floor([exe, "-I", "-c", IMPORTS], import_runs))
    return {"fork_exit_wait_ms": fork, "python_pass_ms": bare, "python_imports_ms": imports}


# ---------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 2)


def compute_ratios(floors: dict[str, Any], run: dict[str, Any], concurrency: int) -> dict[str, Any]:
    fork = floors["fork_exit_wait_ms"]["p50"]
    bare = floors["python_pass_ms"]["p50"]
    imp = floors["python_imports_ms"]["p50"]
    act = run["activation"]
    cold = act["cold_start_ms"].get("p50")
    total = act["total_ms"].get("p50")
    cpu = act["cpu_ms"].get("p50")
    # If an activation cost nothing beyond a bare interpreter importing the wire libraries, the
    # cores (or the concurrency cap, if lower) could sustain this many activations per second.
    ideal = min(concurrency, os.cpu_count() or 1) * 1000 / imp
    return {
        "python_pass_p50_over_fork_p50": ratio(bare, fork),
        "python_imports_p50_over_python_pass_p50": ratio(imp, bare),
        "cold_start_p50_over_python_pass_p50": ratio(cold, bare),
        "cold_start_p50_over_python_imports_p50": ratio(cold, imp),
        "total_p50_over_python_pass_p50": ratio(total, bare),
        "total_p50_over_python_imports_p50": ratio(total, imp),
        "total_p95_over_python_pass_p95": ratio(
            act["total_ms"].get("p95"), floors["python_pass_ms"]["p95"]
        ),
        "activation_cpu_p50_over_python_imports_p50": ratio(cpu, imp),
        "import_floor_activations_per_s": round(ideal, 2),
        "activations_per_s_over_import_floor_rate": ratio(run["activations_per_s"], ideal),
    }


def _ms(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f} ms" if x < 1 else f"{x:.1f} ms"


def _x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def _dist(s: dict[str, Any], p99: bool = True) -> str:
    if not s.get("n"):
        return "n/a"
    parts = [f"p50 {_ms(s['p50'])}", f"p95 {_ms(s['p95'])}"]
    if p99:
        parts.append(f"p99 {_ms(s['p99'])}")
    return " · ".join(parts)


def markdown_table(res: dict[str, Any]) -> str:
    fl, run, rt, cfg = res["floors"], res["run"], res["ratios"], res["config"]
    act = run["activation"]
    ncpu = res["environment"]["cpu_count"]
    rss = act["max_rss_kib"]
    rows = [
        ("Measure", "Value", "Ratio"),
        (
            f"floor: fork()+_exit(0)+waitpid (n={fl['fork_exit_wait_ms']['n']})",
            _dist(fl["fork_exit_wait_ms"], p99=False),
            "reference",
        ),
        (
            f"floor: `python -I -c pass` (n={fl['python_pass_ms']['n']})",
            _dist(fl["python_pass_ms"], p99=False),
            f"p50 = {_x(rt['python_pass_p50_over_fork_p50'])} fork",
        ),
        (
            f'floor: `python -I -c "{IMPORTS}"` (n={fl["python_imports_ms"]["n"]})',
            _dist(fl["python_imports_ms"], p99=False),
            f"p50 = {_x(rt['python_imports_p50_over_python_pass_p50'])} bare python",
        ),
        (
            f"activation cold start, launch→hello (n={act['cold_start_ms'].get('n', 0)})",
            _dist(act["cold_start_ms"]),
            f"p50 = {_x(rt['cold_start_p50_over_python_pass_p50'])} bare python, "
            f"{_x(rt['cold_start_p50_over_python_imports_p50'])} import floor",
        ),
        ("activation exec, hello→result", _dist(act["exec_ms"]), ""),
        (
            "activation total, launch→reaped",
            _dist(act["total_ms"]),
            f"p50 = {_x(rt['total_p50_over_python_pass_p50'])} bare python, "
            f"{_x(rt['total_p50_over_python_imports_p50'])} import floor; "
            f"p95 = {_x(rt['total_p95_over_python_pass_p95'])} bare python p95",
        ),
        (
            "activation CPU (user+sys)",
            _dist(act["cpu_ms"]),
            f"p50 = {_x(rt['activation_cpu_p50_over_python_imports_p50'])} import floor (wall)",
        ),
        (
            "activation peak RSS",
            f"p50 {rss['p50'] / 1024:.1f} MiB · max {rss['max'] / 1024:.1f} MiB"
            if rss.get("n")
            else "n/a",
            "",
        ),
        (
            f"wall, {cfg['workflows']} workflows x {cfg['steps']} steps, concurrency "
            f"{cfg['concurrency']}",
            f"{run['wall_s']:.2f} s",
            "",
        ),
        ("steps/s", f"{run['steps_per_s']:.1f}", ""),
        (
            f"activations/s ({run['activations_expected']} activations)",
            f"{run['activations_per_s']:.1f}",
            f"{_x(rt['activations_per_s_over_import_floor_rate'])} import-floor rate "
            f"({rt['import_floor_activations_per_s']:.1f}/s = "
            f"min(concurrency, {ncpu} CPUs) / import p50)",
        ),
        ("supervisor CPU per activation", _ms(run["cpu"]["supervisor_ms_per_activation"]), ""),
        (
            "CPU utilisation (supervisor + activations)",
            f"{run['cpu']['utilisation_of_all_cpus'] * 100:.0f}% of {ncpu} CPUs",
            "",
        ),
    ]
    return markdown_rows(rows)


def render_markdown(res: dict[str, Any]) -> str:
    env, cfg, run = res["environment"], res["config"], res["run"]
    head = (
        f"# stepvisor spawn-mode benchmark\n\n"
        f"{res['started_at']} · Python {env['python']} · {env['platform']} · "
        f"{env['cpu_count']} CPUs · commit {env['git_commit']}"
        f"{' (dirty)' if env['git_dirty'] else ''}\n\n"
        f"`python -m bench.spawn --workflows {cfg['workflows']} --steps {cfg['steps']} "
        f"--concurrency {cfg['concurrency']}` · launch_mode spawn · synchronous full · "
        f"activation outcomes {json.dumps(run['outcomes'])} "
        f"({run['activations_recorded']} recorded, {run['activations_expected']} expected)"
        f"\n\n"
    )
    return head + markdown_table(res) + "\n"


# ---------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    return workload_parser(
        "python -m bench.spawn",
        __doc__,
        workflows=100,
        steps=10,
        concurrency=8,
        outputs="spawn.json and spawn.md",
        timeout_s=900.0,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    env = environment()
    floors = measure_floors()  # first, on a quiet machine: no supervisor running yet
    with supervised(args.concurrency, launch_mode="spawn", synchronous="full") as sup:
        result = run_workload(sup, args.workflows, args.steps, args.timeout)
    rc = sup.exit_status
    res = {
        "benchmark": "spawn",
        "started_at": started,
        "config": {
            "workflows": args.workflows,
            "steps": args.steps,
            "concurrency": args.concurrency,
            "launch_mode": "spawn",
            "synchronous": "full",
            "supervisor_config": sup.config_text,
        },
        "environment": env,
        "floors": floors,
        "run": result,
        "supervisor_exit_status": rc,
    }
    res["ratios"] = compute_ratios(floors, result, args.concurrency)
    return res


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    status, res = guarded(lambda: run(args))
    if res is None:
        return status
    write_report(args.out, "spawn", res, render_markdown(res))
    if res["run"]["activations_recorded"] != res["run"]["activations_expected"] or set(
        res["run"]["outcomes"]
    ) - {"ok"}:
        log(
            f"note: activation outcomes {res['run']['outcomes']} "
            f"({res['run']['activations_recorded']} recorded)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
