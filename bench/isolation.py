"""Isolation-layer benchmark: what each layer adds to an activation's cold start, in one run.

Configurations, each a fresh real supervisor (`launch_mode = "spawn"`) in its own temp dir:
- all off: every `[isolation]` layer "off" (the baseline);
- all on: every layer "required" (the supervisor refuses to start without it);
- all on except X, for each layer X: X "off", the others "required".
The cost of X is (all on) - (all on except X): what turning X on adds to a fully isolated
activation. Each configuration runs the same workload (W workflows x N no-op steps at
concurrency C), and its per-activation timings come from every instance's history. The
configurations run in `--rounds` rounds, in reverse order every other round, so slow drift of
the machine cancels out; each figure is the median over rounds of that round's percentile.

Wall-clock figures are reported, never asserted: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

from bench.harness import (
    BenchError,
    Supervisor,
    environment,
    guarded,
    log,
    markdown_rows,
    positive_int,
    run_workload,
    supervised,
    workload_parser,
    write_report,
)

LAYERS = ("uid", "cgroup", "network", "landlock", "seccomp", "disk")
METRICS = ("cold_start_ms", "exec_ms", "total_ms", "cpu_ms")
QUANTILES = ("p50", "p95")
SUP_CPU = "supervisor_cpu_ms_per_activation"
ALL_OFF, ALL_ON = "all_off", "all_on"
# Activations with sandbox uids must reach the sockets under the temp dir; and the temp dir is
# the supervisor's cwd, so on its sys.path (`python -m`), which the uid layer requires to be
# readable by others (supervisor/isolation.py `unreadable_by_others`): 0o711 is not enough.
DIR_MODE = 0o755
# Where in an activation's life each layer acts (sandbox_host/__main__.py, supervisor/daemon.py).
# The supervisor stamps "launch" and "reaped" with the time its loop iteration began, so work it
# does earlier in the iteration that launches an activation counts in that one's cold start.
WHERE = {
    "uid": "supervisor: chown of the scratch dir; activation: setgroups + setresgid + setresuid "
    "(and RLIMIT_NPROC) before Hello",
    "cgroup": "supervisor: mkdir + cgroup.procs write in each controller's hierarchy before the "
    "token is sent, and kill + rmdir at reap; a reap usually shares its loop iteration with the "
    "next launch, so the teardown shows in the next activation's cold start, not in its own total",
    "network": "activation: unshare(CLONE_NEWNET) before Hello; the kernel tears the namespace "
    "down after exit, on CPU time no activation is charged for",
    "landlock": "activation: ruleset (the interpreter's paths, the scratch dir) built before "
    "Hello, then every path lookup is checked",
    "seccomp": "activation: filter installed once Activate arrives, after Hello: it can show in "
    "exec, not in cold start",
    "disk": "supervisor: mount(2) of the tenant's tmpfs at its first launch in a supervisor's "
    "life only; scratch dirs are then made and removed on tmpfs, not the runtime dir's file system",
}


def without(layer: str) -> str:
    return f"all_on_except_{layer}"


def configurations() -> dict[str, dict[str, str]]:
    """Configuration key → the `[isolation]` table (layer → mode)."""
    on = dict.fromkeys(LAYERS, "required")
    configs = {ALL_OFF: dict.fromkeys(LAYERS, "off"), ALL_ON: on}
    for layer in LAYERS:
        configs[without(layer)] = {**on, layer: "off"}
    return configs


def label(key: str) -> str:
    if key.startswith("all_on_except_"):
        return f"all on except {key.removeprefix('all_on_except_')}"
    return key.replace("_", " ")


# ---------------------------------------------------------------------------- one configuration


def enabled_layers(sup: Supervisor) -> dict[str, str]:
    """Layer → detail, for every layer the supervisor says (in its log) it enabled."""
    return {e["layer"]: e.get("detail", "") for e in sup.log_events("isolation.layer")}


def run_config(
    key: str, modes: dict[str, str], args: argparse.Namespace, workflows: int
) -> dict[str, Any]:
    with supervised(
        args.concurrency, modes, dir_mode=DIR_MODE, launch_mode="spawn", synchronous="full"
    ) as sup:
        layers = enabled_layers(sup)
        expected = {name for name, mode in modes.items() if mode != "off"}
        if set(layers) != expected:
            raise BenchError(
                f"configuration {label(key)}: the supervisor enabled {sorted(layers)}, "
                f"expected {sorted(expected)}; last lines of its log:\n{sup.log_tail()}"
            )
        result = run_workload(sup, workflows, args.steps, args.timeout)
    if result["activations_recorded"] != result["activations_expected"] or set(
        result["outcomes"]
    ) - {"ok"}:
        log(
            f"note: {label(key)}: activation outcomes {result['outcomes']} "
            f"({result['activations_recorded']} recorded, "
            f"{result['activations_expected']} expected)"
        )
    return {
        "config": key,
        "isolation": modes,
        "layers_enabled": layers,
        "supervisor_config": sup.config_text,
        "supervisor_exit_status": sup.exit_status,
        "run": result,
    }


# ---------------------------------------------------------------------------- aggregation

# (metric, quantile) pairs summarised and costed: per-activation records, and the supervisor's own
# CPU per activation (its side of a layer: chown, cgroup mkdir/write/rmdir).
FIGURES = [(m, q) for m in METRICS for q in QUANTILES] + [(SUP_CPU, "value")]


def figure(run: dict[str, Any], metric: str, q: str) -> float | None:
    if metric == SUP_CPU:
        return run["cpu"]["supervisor_ms_per_activation"]
    return run["activation"][metric].get(q)


def _median(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return round(statistics.median(xs), 3) if xs else None


def by_round(runs: list[dict[str, Any]], key: str, metric: str, q: str) -> list[float | None]:
    return [
        figure(r["run"], metric, q)
        for r in sorted(runs, key=lambda r: r["round"])
        if r["config"] == key
    ]


def summarize_configs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration: each figure as the median over rounds, and the rounds' values."""
    out: dict[str, Any] = {}
    for key in configurations():
        mine = [r for r in runs if r["config"] == key]
        entry: dict[str, Any] = {
            "rounds": len(mine),
            "steps_per_s": _median([r["run"]["steps_per_s"] for r in mine]),
            "wall_s": _median([r["run"]["wall_s"] for r in mine]),
        }
        for metric, q in FIGURES:
            rounds = by_round(runs, key, metric, q)
            entry.setdefault(metric, {})[q] = _median(rounds)
            entry[metric][f"{q}_rounds"] = rounds
        out[key] = entry
    return out


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _cost(summary: dict[str, Any], runs: list[dict[str, Any]], hi: str, lo: str) -> dict[str, Any]:
    """(hi) - (lo) for every figure: in ms, as a ratio to all off, and round by round."""
    out: dict[str, Any] = {}
    for metric, q in FIGURES:
        ms = _diff(summary[hi][metric][q], summary[lo][metric][q])
        ref = summary[ALL_OFF][metric][q]
        rounds = by_round(runs, hi, metric, q), by_round(runs, lo, metric, q)
        out.setdefault(metric, {})[q] = {
            "ms": ms,
            "ratio_to_all_off": None if ms is None or not ref else round(ms / ref, 4),
            "rounds_ms": [_diff(a, b) for a, b in zip(*rounds, strict=True)],
        }
    return out


def layer_costs(summary: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    costs = {layer: _cost(summary, runs, ALL_ON, without(layer)) for layer in LAYERS}
    costs["all_layers"] = _cost(summary, runs, ALL_ON, ALL_OFF)
    # The five marginal costs added up, against all_layers: far apart means the layers interact
    # (or the noise is larger than the costs).
    total: dict[str, Any] = {}
    for metric, q in FIGURES:
        parts = [costs[layer][metric][q]["ms"] for layer in LAYERS]
        ms = None if None in parts else round(sum(p for p in parts if p is not None), 3)
        ref = summary[ALL_OFF][metric][q]
        total.setdefault(metric, {})[q] = {
            "ms": ms,
            "ratio_to_all_off": None if ms is None or not ref else round(ms / ref, 4),
            "rounds_ms": [],
        }
    costs["sum_of_layers"] = total
    return costs


# ---------------------------------------------------------------------------- report


def _ms(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pair(entry: dict[str, Any], metric: str) -> str:
    return f"{_ms(entry[metric]['p50'])} · {_ms(entry[metric]['p95'])}"


def _delta(c: dict[str, Any], digits: int = 1) -> str:
    if c["ms"] is None:
        return "n/a"
    r = c["ratio_to_all_off"]
    return f"{c['ms']:+.{digits}f} ms ({'n/a' if r is None else f'{r:+.3f}x'})"


def _rounds(values: list[float | None], sign: str = "") -> str:
    return " / ".join("n/a" if v is None else f"{v:{sign}.1f}" for v in values) or "n/a"


def markdown_tables(res: dict[str, Any]) -> str:
    summary, costs = res["summary"], res["costs"]
    rows = [
        (
            "Configuration",
            "cold start ms p50 · p95",
            "exec ms p50 · p95",
            "total ms p50 · p95",
            "CPU ms p50",
            "supervisor CPU ms/act",
            "steps/s",
            "cold start p50 / all off",
            "cold start p50 by round",
        )
    ]
    base = summary[ALL_OFF]["cold_start_ms"]["p50"]
    for key, entry in summary.items():
        cold = entry["cold_start_ms"]["p50"]
        rows.append(
            (
                label(key),
                _pair(entry, "cold_start_ms"),
                _pair(entry, "exec_ms"),
                _pair(entry, "total_ms"),
                _ms(entry["cpu_ms"]["p50"]),
                _ms(entry[SUP_CPU]["value"], 2),
                _ms(entry["steps_per_s"]),
                "n/a" if not cold or not base else f"{cold / base:.3f}x",
                _rounds(entry["cold_start_ms"]["p50_rounds"]),
            )
        )
    cost_rows = [
        (
            "Cost of layer (ratio to all off)",
            "cold start p50",
            "cold start p95",
            "exec p50",
            "total p50",
            "total p95",
            "supervisor CPU/act",
            "cold start p50 by round",
        )
    ]
    for key in (*LAYERS, "sum_of_layers", "all_layers"):
        c = costs[key]
        name = {
            "sum_of_layers": "sum of the five above",
            "all_layers": "all five at once (all on - all off)",
        }.get(key, f"{key} (all on - all on except {key})")
        cost_rows.append(
            (
                name,
                _delta(c["cold_start_ms"]["p50"]),
                _delta(c["cold_start_ms"]["p95"]),
                _delta(c["exec_ms"]["p50"]),
                _delta(c["total_ms"]["p50"]),
                _delta(c["total_ms"]["p95"]),
                _delta(c[SUP_CPU]["value"], 2),
                _rounds(c["cold_start_ms"]["p50"]["rounds_ms"], "+"),
            )
        )
    return markdown_rows(rows) + "\n\n" + markdown_rows(cost_rows)


def render_markdown(res: dict[str, Any]) -> str:
    env, cfg = res["environment"], res["config"]
    outcomes: dict[str, int] = {}
    for r in res["runs"]:
        for k, v in r["run"]["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0) + v
    head = (
        f"# stepvisor isolation-layer benchmark\n\n"
        f"{res['started_at']} · Python {env['python']} · {env['platform']} · "
        f"{env['cpu_count']} CPUs · commit {env['git_commit']}"
        f"{' (dirty)' if env['git_dirty'] else ''} · {res['duration_s']:.0f} s\n\n"
        f"`python -m bench.isolation --workflows {cfg['workflows']} --steps {cfg['steps']} "
        f"--concurrency {cfg['concurrency']} --rounds {cfg['rounds']}` · launch_mode spawn · "
        f"synchronous full · {len(res['runs'])} supervisors · activation outcomes "
        f"{json.dumps(outcomes)}\n\n"
        f"Each figure is the median over {cfg['rounds']} rounds of that round's percentile over "
        f"{cfg['workflows'] * (cfg['steps'] + 1)} activations. "
        f"cold start = launch → Hello, exec = Hello → result, total = launch → reaped.\n\n"
    )
    notes = "\n\nWhere each layer acts:\n\n" + "".join(
        f"- **{layer}**: {WHERE[layer]}\n" for layer in LAYERS
    )
    return head + markdown_tables(res) + notes


# ---------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = workload_parser(
        "python -m bench.isolation",
        __doc__,
        workflows=30,
        steps=5,
        concurrency=2,
        outputs="isolation.json and isolation.md",
        timeout_s=300.0,
    )
    p.add_argument(
        "--rounds", type=positive_int, default=4, help="runs of every configuration (default 4)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="workflows of a discarded all-on run first, to warm caches (default 4; 0: none)",
    )
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    env = environment()
    configs = configurations()
    if args.warmup > 0:
        log(f"warm-up: all on, {args.warmup} workflows (discarded)")
        run_config(ALL_ON, configs[ALL_ON], args, args.warmup)
    runs = []
    keys = list(configs)
    for r in range(args.rounds):
        order = keys if r % 2 == 0 else keys[::-1]
        for k, key in enumerate(order):
            log(f"round {r + 1}/{args.rounds}, configuration {k + 1}/{len(order)}: {label(key)}")
            entry = run_config(key, configs[key], args, args.workflows)
            entry["round"] = r + 1
            runs.append(entry)
    summary = summarize_configs(runs)
    return {
        "benchmark": "isolation",
        "started_at": started,
        "duration_s": round(time.monotonic() - t0, 1),
        "config": {
            "workflows": args.workflows,
            "steps": args.steps,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "warmup_workflows": args.warmup,
            "launch_mode": "spawn",
            "synchronous": "full",
            "layers": list(LAYERS),
            "configurations": configs,
            "where": WHERE,
        },
        "environment": env,
        "summary": summary,
        "costs": layer_costs(summary, runs),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    status, res = guarded(lambda: run(args))
    if res is None:
        return status
    write_report(args.out, "isolation", res, render_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
