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
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from stepvisor.client import Client, StepVisorError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
TENANT = "bench"
WORKFLOW = "noop"
IMPORTS = "import zmq, msgspec, cloudpickle"
# The same kind of clean environment the launcher gives an activation (supervisor/launcher.py).
FLOOR_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "MALLOC_ARENA_MAX": "2",
}
ACTIVATION_FIELDS = ("cold_start_ms", "exec_ms", "total_ms", "cpu_ms", "max_rss_kib")


class BenchError(Exception):
    """The benchmark could not produce its figures; the message says why."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on sorted input."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "min": round(xs[0], 3),
        "p50": round(percentile(xs, 50), 3),
        "p95": round(percentile(xs, 95), 3),
        "p99": round(percentile(xs, 99), 3),
        "max": round(xs[-1], 3),
        "mean": round(sum(xs) / len(xs), 3),
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


# ---------------------------------------------------------------------------- supervisor


class Supervisor:
    """`python -m stepvisor.cli serve --config FILE` in `base`, logging to base/supervisor.log."""

    def __init__(self, base: Path, concurrency: int) -> None:
        self.base = base
        self.state = base / "state"
        self.run_dir = base / "run"
        self.config_path = base / "stepvisor.toml"
        self.log_path = base / "supervisor.log"
        self.endpoint = f"ipc://{self.run_dir / 'api.sock'}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_text = textwrap.dedent(f"""\
            [server]
            state_dir = {json.dumps(str(self.state))}
            runtime_dir = {json.dumps(str(self.run_dir))}
            launch_mode = "spawn"
            max_activations = {concurrency}
            synchronous = "full"
            hello_timeout_s = 30
            drain_timeout_s = 10

            [defaults]
            max_concurrent = {concurrency}
        """)
        self.config_path.write_text(self.config_text)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log at {self.log_path}: {exc.strerror})"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 30.0) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stepvisor.cli", "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.base,
            )
        deadline = time.monotonic() + timeout_s
        with Client(self.endpoint, timeout_s=0.5) as probe:
            while True:
                rc = self.proc.poll()
                if rc is not None:
                    raise BenchError(
                        f"supervisor exited with status {rc} before answering ping; "
                        f"last lines of its log:\n{self.log_tail()}"
                    )
                try:
                    if probe.ping(timeout_s=0.5):
                        return
                except StepVisorError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"supervisor did not answer ping within {timeout_s:g} s at "
                        f"{self.endpoint}; last lines of its log:\n{self.log_tail()}"
                    )
                time.sleep(0.05)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (the supervisor drains), then SIGKILL after `timeout_s`. Returns the status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log(f"supervisor ignored SIGTERM for {timeout_s:g} s; sending SIGKILL")
            self.proc.kill()
            return self.proc.wait()


# ---------------------------------------------------------------------------- workload


def workflow_source(steps: int) -> str:
    return textwrap.dedent(f"""\
        from stepvisor import workflow


        @workflow({WORKFLOW!r})
        def noop(event, step):
            for i in range({steps}):
                step.do(f"s{{i}}", lambda: i)
            return {steps}
    """)


def wait_complete(
    client: Client, sup: Supervisor, workflows: int, timeout_s: float, poll_s: float = 0.1
) -> None:
    """Poll list(status="complete") until all `workflows` are; fail fast on errored ones."""
    deadline = time.monotonic() + timeout_s
    last_check = last_report = time.monotonic()
    while True:
        done = len(client.list(TENANT, status="complete", limit=workflows))
        if done >= workflows:
            return
        now = time.monotonic()
        if not sup.alive():
            raise BenchError(
                f"supervisor died with {done}/{workflows} instances complete; "
                f"last lines of its log:\n{sup.log_tail()}"
            )
        if now - last_check >= 2.0:
            last_check = now
            for bad in ("errored", "terminated"):
                rows = client.list(TENANT, status=bad, limit=1)
                if rows:
                    raise BenchError(
                        f"instance {rows[0]['id']} is {bad}: "
                        f"{json.dumps(rows[0].get('error'))[:2000]}"
                    )
        if now - last_report >= 10.0:
            last_report = now
            log(f"{done}/{workflows} instances complete")
        if now > deadline:
            raise BenchError(
                f"only {done}/{workflows} instances complete after {timeout_s:g} s "
                f"(raise --timeout, or lower --workflows/--steps)"
            )
        time.sleep(poll_s)


def cpu_ms(before: Any, after: Any, *fields: str) -> float:
    return round(float(sum(getattr(after, f) - getattr(before, f) for f in fields)) * 1000, 1)


def run_workload(sup: Supervisor, workflows: int, steps: int, timeout_s: float) -> dict[str, Any]:
    with Client(sup.endpoint, timeout_s=60.0) as client:
        log(f"deploying workflow {WORKFLOW!r} ({steps} no-op steps) for tenant {TENANT!r}")
        deployed = client.deploy(TENANT, workflow_source(steps), filename="bench_noop.py")
        if WORKFLOW not in deployed.get("workflows", []):
            raise BenchError(f"deploy did not register {WORKFLOW!r}: {deployed}")
        ids = [f"w{k:06d}" for k in range(workflows)]
        assert sup.proc is not None
        sproc = psutil.Process(sup.proc.pid)
        cpu0, me0 = sproc.cpu_times(), psutil.Process().cpu_times()
        log(f"creating {workflows} instances (create_batch) and waiting for completion")
        t0 = time.perf_counter()
        created = client.create_batch(TENANT, WORKFLOW, [(i, None) for i in ids])
        t_created = time.perf_counter()
        if sum(1 for r in created if r["created"]) != workflows:
            raise BenchError(
                f"create_batch created {sum(r['created'] for r in created)} of "
                f"{workflows} instances"
            )
        wait_complete(client, sup, workflows, timeout_s)
        wall = time.perf_counter() - t0
        cpu1, me1 = sproc.cpu_times(), psutil.Process().cpu_times()
        log(f"all {workflows} complete in {wall:.2f} s; reading {workflows} histories")

        records: list[dict[str, Any]] = []
        for i in ids:
            records.extend(client.history(TENANT, i)["activations"])
    activations = workflows * (steps + 1)
    outcomes = Counter(str(r.get("outcome")) for r in records)
    sup_ms = cpu_ms(cpu0, cpu1, "user", "system")
    child_ms = cpu_ms(cpu0, cpu1, "children_user", "children_system")
    return {
        "deployed_version": deployed.get("version"),
        "create_batch_s": round(t_created - t0, 4),
        "wall_s": round(wall, 3),
        "steps_per_s": round(workflows * steps / wall, 2),
        "activations_per_s": round(activations / wall, 2),
        "activations_expected": activations,
        "activations_recorded": len(records),
        "outcomes": dict(outcomes),
        "activation": {f: summarize([r.get(f) for r in records]) for f in ACTIVATION_FIELDS},
        "cpu": {
            "supervisor_ms": sup_ms,
            "activations_ms": child_ms,  # reaped children of the supervisor during the run
            "bench_client_ms": cpu_ms(me0, me1, "user", "system"),
            "supervisor_ms_per_activation": round(sup_ms / activations, 3),
            "utilisation_of_all_cpus": round(
                (sup_ms + child_ms) / 1000 / (wall * (os.cpu_count() or 1)), 3
            ),
        },
    }


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
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for k, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain")
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def render_markdown(res: dict[str, Any]) -> str:
    env, cfg, run = res["environment"], res["config"], res["run"]
    head = (
        f"# stepvisor spawn-mode benchmark\n\n"
        f"{res['started_at']} · Python {env['python']} · {env['platform']} · "
        f"{env['cpu_count']} CPUs · commit {env['git_commit']}"
        f"{' (dirty)' if env['git_dirty'] else ''}\n\n"
        f"`python -m bench --workflows {cfg['workflows']} --steps {cfg['steps']} "
        f"--concurrency {cfg['concurrency']}` · launch_mode spawn · synchronous full · "
        f"activation outcomes {json.dumps(run['outcomes'])} "
        f"({run['activations_recorded']} recorded, {run['activations_expected']} expected)"
        f"\n\n"
    )
    return head + markdown_table(res) + "\n"


# ---------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def pos(text: str) -> int:
        n = int(text)
        if n < 1:
            raise argparse.ArgumentTypeError("must be >= 1")
        return n

    p.add_argument("--workflows", type=pos, default=100, help="instances to run (default 100)")
    p.add_argument("--steps", type=pos, default=10, help="no-op steps per workflow (default 10)")
    p.add_argument(
        "--concurrency",
        type=pos,
        default=8,
        help="tenant max_concurrent and [server] max_activations (default 8)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="directory for spawn.json and spawn.md (default bench/results)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds to wait for all instances to complete (default 900)",
    )
    return p


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    env = environment()
    floors = measure_floors()  # first, on a quiet machine: no supervisor running yet
    base = Path(tempfile.mkdtemp(prefix="svb-", dir="/tmp"))
    sup = Supervisor(base, args.concurrency)
    failed = True
    try:
        log(f"starting supervisor in {base}")
        sup.start()
        result = run_workload(sup, args.workflows, args.steps, args.timeout)
        failed = False
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let cleanup finish
        try:
            rc = sup.stop()
            if rc not in (None, 0):
                log(f"supervisor exited with status {rc}")
            if failed and sup.proc is not None:
                log(f"last lines of the supervisor log:\n{sup.log_tail()}")
        finally:
            shutil.rmtree(base, ignore_errors=True)
            signal.signal(signal.SIGTERM, _raise_exit)
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
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    try:
        res = run(args)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except StepVisorError as exc:
        print(f"bench failed: supervisor error {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # SIGTERM / SIGHUP, via _raise_exit; cleanup has run
        print(f"bench stopped by a signal (exit status {exc.code})", file=sys.stderr)
        return int(exc.code or 1)
    md = render_markdown(res)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "spawn.json", json.dumps(res, indent=2) + "\n")
    write_atomic(args.out / "spawn.md", md)
    print(md)
    if res["run"]["activations_recorded"] != res["run"]["activations_expected"] or set(
        res["run"]["outcomes"]
    ) - {"ok"}:
        log(
            f"note: activation outcomes {res['run']['outcomes']} "
            f"({res['run']['activations_recorded']} recorded)"
        )
    log(f"wrote {args.out / 'spawn.json'} and {args.out / 'spawn.md'}")
    return 0
