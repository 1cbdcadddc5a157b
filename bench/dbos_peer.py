"""The peer our benchmark compares against: DBOS Transact (``pip install dbos``, >= 3) on SQLite.

Same workload as ``python -m bench``: W workflows, each running S no-op steps (step ``i`` returns
``i``), with C workflows in flight at once (C = 1: one after another).

DBOS keeps process-global state (a singleton, a registry of decorated functions, background
threads), so it always runs in a **separate child process**: ``run_dbos`` launches
``python -m bench.dbos_peer --child ...`` from the repository root and parses the JSON the child
prints as the last line of its stdout. The parent never imports ``dbos``; ``python`` may be any
interpreter that has it (e.g. a scratch venv holding only ``dbos``). This module imports nothing
from the stepvisor packages nor from ``bench.harness``, so it runs in such a venv as is.

What the child does
-------------------
1. Configures DBOS with a fresh SQLite system database, ``<workdir>/dbos.sqlite``
   (``system_database_url="sqlite:///..."``; stale copies left by a previous run in the same
   workdir are removed first), ``log_level="WARNING"`` (DBOS logs to stderr), no Conductor key
   (DBOS 3.x starts no admin HTTP server and opens no port; Conductor only runs with a key, and
   ``DBOS__*`` environment variables are dropped from the child's environment so it cannot pick
   up a cloud/Conductor setup by accident).
2. Registers ``@DBOS.step() noop_step(i) -> i`` and ``@DBOS.workflow() noop_workflow(steps)``
   that calls it ``steps`` times and returns the sum of the results, then ``DBOS.launch()``.
3. Runs one untimed warm-up workflow, then the W timed ones, then verifies (see below), then
   ``DBOS.destroy()``.

How concurrency is achieved (``--mode``)
----------------------------------------
* ``start_workflow`` (default): every workflow is started with ``DBOS.start_workflow(wf, S)``
  (it runs on DBOS's own executor thread pool) and awaited with ``handle.get_result()`` (an
  in-memory future, no database polling). C = 1 does this in a plain loop; C = N drives it from a
  ``ThreadPoolExecutor(max_workers=N)``, so exactly N workflows are in flight until the last N.
  This is how DBOS documents running workflows in the background, and it measures the engine
  itself: no polling interval sits in the critical path. Per-workflow latency is
  ``start_workflow`` -> ``get_result`` returned, measured with ``time.perf_counter``.
* ``queue``: DBOS's own concurrency control, ``DBOS.register_queue("bench",
  worker_concurrency=N, polling_interval_sec=P)``, all W workflows enqueued at once with
  ``DBOS.enqueue_workflow`` and awaited with ``handle.get_result(polling_interval_sec=P)``. The
  queue worker is a poller (DBOS's default interval is 1 s; we use ``P`` = 0.01 s by default), so
  throughput depends on ``P``. Enqueue -> result would mostly be time spent waiting in the
  queue (and DBOS's SQLite timestamps have 1 s resolution before Python 3.12), so the per-workflow
  latency reported in this mode is the workflow body's own run time (see below).

Every result also carries ``workflow_body_ms``: the time from the workflow function's first line
to its return, measured inside it: S step executions and S step checkpoints, without the workflow
status insert/update around them.

Wall time runs from just before the first timed workflow is started/enqueued to the moment the
last result is in hand (``time.perf_counter``); steps/s = W * S / wall. Percentiles use linear
interpolation between closest ranks.

Verification (failing loudly, non-zero exit, no JSON)
----------------------------------------------------
* every workflow returned ``sum(range(S))``;
* after ``DBOS.destroy()``, reading ``dbos.sqlite`` with ``sqlite3``: every timed workflow has a
  ``workflow_status`` row with status ``SUCCESS``, and exactly S ``operation_outputs`` rows whose
  ``function_id`` set is 1..S, all named after the step function, so DBOS really recorded each
  step durably (one checkpoint per step);
* ``DBOS.list_workflow_steps`` agrees for the first timed workflow (outputs 0..S-1).

The JSON also records the SQLite settings DBOS's own connections run with (``journal_mode``,
``synchronous``, ``busy_timeout``), read through DBOS's engine after launch.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DB_NAME = "dbos.sqlite"
APP_NAME = "stepvisor-bench-peer"
QUEUE_NAME = "bench"
MODES = ("start_workflow", "queue")
DEFAULT_QUEUE_POLL_S = 0.01
MIN_MAJOR = 3
INSTALL_HINT = (
    "install it with `{python} -m pip install dbos` (DBOS Transact >= 3, SQLite built in)"
)
_PROBE = "import dbos, importlib.metadata as m, sys; sys.stdout.write(m.version('dbos'))"


class PeerUnavailable(Exception):
    """``dbos`` (>= 3) is not importable by the interpreter asked to run the peer."""


class PeerFailed(Exception):
    """The DBOS child ran but did not produce a verified result; the message says why."""


# ---------------------------------------------------------------------------- shared helpers


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on sorted input."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    xs = sorted(s * 1000.0 for s in seconds)
    return {f"p{q}": round(percentile(xs, q), 3) for q in (50, 95, 99)}


def _child_env() -> dict[str, str]:
    """The caller's environment minus DBOS's own knobs (cloud mode, Conductor, app version)."""
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("DBOS")}


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------- parent side


def dbos_version(python: str | None = None) -> str:
    """The ``dbos`` version importable by ``python``; raises PeerUnavailable if there is none."""
    exe = python or sys.executable
    hint = INSTALL_HINT.format(python=exe)
    try:
        probe = subprocess.run(
            [exe, "-c", _PROBE],
            cwd=ROOT,
            env=_child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PeerUnavailable(f"cannot run {exe} to look for dbos ({e}); {hint}") from e
    if probe.returncode != 0:
        why = _tail(probe.stderr, 1) or f"exit status {probe.returncode}"
        raise PeerUnavailable(f"dbos is not importable by {exe} ({why}); {hint}")
    version = probe.stdout.strip()
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_MAJOR:
        raise PeerUnavailable(
            f"{exe} has dbos {version!r}, the peer needs >= {MIN_MAJOR}; "
            f"upgrade with `{exe} -m pip install -U dbos`"
        )
    return version


def run_dbos(
    workflows: int,
    steps: int,
    concurrency: int,
    workdir: Path,
    python: str | None = None,
    timeout: float = 600,
    *,
    mode: str = "start_workflow",
    queue_poll_s: float = DEFAULT_QUEUE_POLL_S,
) -> dict[str, Any]:
    """Run the workload on DBOS in a child ``python -m bench.dbos_peer --child`` and return its
    verified result (see the module docstring). Raises PeerUnavailable if ``python`` (default:
    this interpreter) cannot import ``dbos`` >= 3, PeerFailed if the child fails or times out."""
    if workflows < 1 or steps < 1 or concurrency < 1:
        raise ValueError("workflows, steps and concurrency must all be >= 1")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    exe = python or sys.executable
    dbos_version(exe)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        exe,
        "-m",
        "bench.dbos_peer",
        "--child",
        "--workflows",
        str(workflows),
        "--steps",
        str(steps),
        "--concurrency",
        str(concurrency),
        "--workdir",
        str(workdir),
        "--mode",
        mode,
        "--queue-poll-s",
        repr(queue_poll_s),
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        raise PeerFailed(
            f"DBOS child timed out after {timeout:g} s (killed); stderr tail:\n{_tail(err or '')}"
        ) from e
    if proc.returncode != 0:
        raise PeerFailed(
            f"DBOS child exited with status {proc.returncode}; stderr tail:\n{_tail(proc.stderr)}"
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise PeerFailed(f"DBOS child printed no result; stderr tail:\n{_tail(proc.stderr)}")
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise PeerFailed(f"DBOS child's last stdout line is not JSON: {lines[-1][:200]!r}") from e
    return result


# ---------------------------------------------------------------------------- child side


def _fresh_db(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / DB_NAME
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return db


def _verify_db(db: Path, ids: Sequence[str], steps: int, step_name: str) -> dict[str, int]:
    """Check, with plain sqlite3 after DBOS is gone, that every workflow and step is recorded."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        status = dict(conn.execute("SELECT workflow_uuid, status FROM workflow_status").fetchall())
        rows: dict[str, list[tuple[int, str]]] = {}
        for wid, fid, name in conn.execute(
            "SELECT workflow_uuid, function_id, function_name FROM operation_outputs"
        ):
            rows.setdefault(wid, []).append((fid, name))
        total_rows = conn.execute("SELECT COUNT(*) FROM operation_outputs").fetchone()[0]
    finally:
        conn.close()
    problems: list[str] = []
    for wid in ids:
        if status.get(wid) != "SUCCESS":
            problems.append(f"{wid}: workflow_status is {status.get(wid)!r}, not 'SUCCESS'")
            continue
        got = rows.get(wid, [])
        fids = sorted(fid for fid, _ in got)
        names = {name for _, name in got}
        if fids != list(range(1, steps + 1)) or not all(step_name in n for n in names):
            problems.append(
                f"{wid}: {len(got)} operation_outputs rows, function_ids {fids[:5]}..., "
                f"names {sorted(names)[:3]}; expected {steps} rows of {step_name}"
            )
    if problems:
        raise PeerFailed(
            f"{len(problems)} of {len(ids)} workflows not durably recorded as expected:\n"
            + "\n".join(problems[:10])
        )
    return {"workflow_rows": len(status), "operation_output_rows": int(total_rows)}


def _sqlite_settings(engine: Any) -> dict[str, Any]:
    """PRAGMAs as seen by a connection from DBOS's own engine (its connect hook applied)."""
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        for pragma in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys"):
            out[pragma] = conn.exec_driver_sql(f"PRAGMA {pragma}").scalar()
    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    out["synchronous"] = names.get(out["synchronous"], out["synchronous"])
    out["isolation_level"] = "IMMEDIATE (set by DBOS on connect)"
    return out


def run_child(
    workflows: int,
    steps: int,
    concurrency: int,
    workdir: Path,
    mode: str = "start_workflow",
    queue_poll_s: float = DEFAULT_QUEUE_POLL_S,
) -> dict[str, Any]:
    """Run the workload in this process (it must be a fresh one: DBOS is a singleton)."""
    import importlib.metadata

    from dbos import DBOS, DBOSConfig

    version = importlib.metadata.version("dbos")
    db = _fresh_db(workdir.resolve())
    url = f"sqlite:///{db}"
    config: DBOSConfig = {
        "name": APP_NAME,
        "system_database_url": url,
        "log_level": "WARNING",
        "application_version": f"{APP_NAME}-{version}",
    }
    instance = DBOS(config=config)

    @DBOS.step()
    def noop_step(i: int) -> int:
        return i

    body_s: dict[str, float] = {}

    @DBOS.workflow()
    def noop_workflow(n: int) -> int:
        start = time.perf_counter()
        total = 0
        for i in range(n):
            total += noop_step(i)
        body_s[str(DBOS.workflow_id)] = time.perf_counter() - start
        return total

    expected = sum(range(steps))
    DBOS.launch()
    try:
        sqlite_settings = _sqlite_settings(instance._sys_db.engine)  # no public accessor
        ids, latencies, results, wall = _timed_run(
            DBOS, noop_workflow, workflows, steps, concurrency, mode, queue_poll_s
        )
        bad = [(wid, r) for wid, r in zip(ids, results, strict=True) if r != expected]
        if bad:
            raise PeerFailed(f"{len(bad)} workflows returned a wrong result, e.g. {bad[:3]}")
        listed = DBOS.list_workflow_steps(ids[0])
        outputs = [s["output"] for s in sorted(listed, key=lambda s: s["function_id"])]
        if outputs != list(range(steps)):
            raise PeerFailed(f"list_workflow_steps({ids[0]}) gave outputs {outputs[:10]}...")
        missing = [wid for wid in ids if wid not in body_s]
        if missing:
            raise PeerFailed(f"{len(missing)} workflow bodies never ran here, e.g. {missing[:3]}")
        body = [body_s[wid] for wid in ids]
        if mode == "queue":
            latencies = body
    finally:
        DBOS.destroy(destroy_registry=True)
    counts = _verify_db(db, ids, steps, noop_step.__name__)
    return {
        "version": version,
        "workflows": workflows,
        "steps": steps,
        "concurrency": concurrency,
        "mode": mode,
        "queue_poll_s": queue_poll_s if mode == "queue" else None,
        "wall_s": round(wall, 6),
        "steps_per_s": round(workflows * steps / wall, 3),
        "workflows_per_s": round(workflows / wall, 3),
        "workflow_ms": latency_summary(latencies),
        "workflow_ms_basis": (
            "workflow body: first step started -> last step checkpointed (in-process)"
            if mode == "queue"
            else "DBOS.start_workflow called -> handle.get_result() returned"
        ),
        "workflow_body_ms": latency_summary(body),
        "db": "sqlite",
        "db_file": db.name,  # in a temporary directory, removed after the run
        "db_bytes": db.stat().st_size,
        "sqlite": sqlite_settings,
        "verified": {"results": workflows, **counts},
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }


def _timed_run(
    dbos: Any,
    wf: Callable[[int], int],
    workflows: int,
    steps: int,
    concurrency: int,
    mode: str,
    queue_poll_s: float,
) -> tuple[list[str], list[float], list[int], float]:
    """One untimed warm-up, then the timed workflows. Returns ids, latencies (s), results, wall."""
    if mode == "queue":
        dbos.register_queue(
            QUEUE_NAME, worker_concurrency=concurrency, polling_interval_sec=queue_poll_s
        )
        # Warm-up through the queue also waits out the queue manager noticing the new queue.
        dbos.enqueue_workflow(QUEUE_NAME, wf, steps).get_result(polling_interval_sec=queue_poll_s)
        t0 = time.perf_counter()
        handles = [dbos.enqueue_workflow(QUEUE_NAME, wf, steps) for _ in range(workflows)]
        results = [h.get_result(polling_interval_sec=queue_poll_s) for h in handles]
        wall = time.perf_counter() - t0
        return [h.get_workflow_id() for h in handles], [], results, wall

    def one(_: int) -> tuple[str, float, int]:
        start = time.perf_counter()
        handle = dbos.start_workflow(wf, steps)
        result: int = handle.get_result()
        return handle.get_workflow_id(), time.perf_counter() - start, result

    one(-1)  # warm-up, untimed
    t0 = time.perf_counter()
    if concurrency == 1:
        done = [one(i) for i in range(workflows)]
    else:
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench") as pool:
            done = list(pool.map(one, range(workflows)))
    wall = time.perf_counter() - t0
    return [d[0] for d in done], [d[1] for d in done], [d[2] for d in done], wall


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.dbos_peer",
        description="Benchmark DBOS Transact on SQLite with the stepvisor bench workload.",
    )
    p.add_argument("--child", action="store_true", help="run DBOS in this process (internal)")
    p.add_argument("--workflows", type=int, default=100)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temp dir, removed after")
    p.add_argument("--mode", choices=MODES, default="start_workflow")
    p.add_argument("--queue-poll-s", type=float, default=DEFAULT_QUEUE_POLL_S)
    p.add_argument("--python", default=None, help="interpreter with dbos (parent mode)")
    args = p.parse_args(argv)
    if args.workflows < 1 or args.steps < 1 or args.concurrency < 1:
        p.error("--workflows, --steps and --concurrency must all be >= 1")
    if args.child:
        if args.workdir is None:
            p.error("--child needs --workdir")
        result = run_child(
            args.workflows, args.steps, args.concurrency, args.workdir, args.mode, args.queue_poll_s
        )
    else:
        import shutil
        import tempfile

        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dbos-peer-"))
        try:
            result = run_dbos(
                args.workflows,
                args.steps,
                args.concurrency,
                workdir,
                python=args.python,
                mode=args.mode,
                queue_poll_s=args.queue_poll_s,
            )
        except (PeerUnavailable, PeerFailed) as e:
            print(f"dbos_peer: {e}", file=sys.stderr)
            return 1
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
