"""What every benchmark shares: a real supervisor in a temp dir, the no-op workload, statistics
and atomic report writing. `bench.spawn` and `bench.isolation` build on it."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil

from stepvisor.client import Client, StepVisorError
from supervisor.activation import PHASES
from supervisor.isolation import cgroup_moves

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
TENANT = "bench"
WORKFLOW = "noop"
T = TypeVar("T")
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


# ---------------------------------------------------------------------------- supervisor


class Supervisor:
    """`python -m stepvisor.cli serve --config FILE` in `base`, logging to base/supervisor.log.

    `isolation` (layer → "auto" | "required" | "off") adds an `[isolation]` table; without it the
    supervisor uses its defaults."""

    def __init__(
        self,
        base: Path,
        concurrency: int,
        isolation: Mapping[str, str] | None = None,
        launch_mode: str = "fork",
        synchronous: str = "acked",
        server: str = "",
        extra: str = "",
        slots: int | None = None,
    ) -> None:
        """`concurrency`: the tenant's max_concurrent, and the node's max_activations unless
        `slots` says otherwise; `server`: more [server] lines; `extra`: more tables, at the end."""
        self.base = base
        self.state = base / "state"
        self.run_dir = base / "run"
        self.config_path = base / "stepvisor.toml"
        self.log_path = base / "supervisor.log"
        self.endpoint = f"ipc://{self.run_dir / 'api.sock'}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_status: int | None = None
        self.config_text = (
            textwrap.dedent(f"""\
            [server]
            state_dir = {json.dumps(str(self.state))}
            runtime_dir = {json.dumps(str(self.run_dir))}
            launch_mode = "{launch_mode}"
            max_activations = {concurrency if slots is None else slots}
            synchronous = "{synchronous}"
            hello_timeout_s = 30
            drain_timeout_s = 10
        """)
            + textwrap.dedent(server)
            + textwrap.dedent(f"""
            [defaults]
            max_concurrent = {concurrency}
        """)
        )
        if isolation is not None:
            self.config_text += "\n[isolation]\n" + "".join(
                f"{name} = {json.dumps(mode)}\n" for name, mode in isolation.items()
            )
        self.config_text += textwrap.dedent(extra)
        self.config_path.write_text(self.config_text)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log at {self.log_path}: {exc.strerror})"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The supervisor's structured log lines (JSON) whose `event` is `event`."""
        out = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        rec = json.loads(line)
                        if rec.get("event") == event:
                            out.append(rec)
        return out

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

    def remove_leftover_cgroups(self) -> int:
        """After the supervisor is gone: kill what is left in the cgroups it made (only a
        supervisor that could not shut down cleanly leaves any) and remove them. Returns how
        many directories were removed."""
        name = "stepvisor-" + hashlib.sha256(str(self.state).encode()).hexdigest()[:8]
        own: dict[str, str] = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            for ctrl in ctrls.split(",") if ctrls else [""]:
                own[ctrl] = path
        root = Path("/sys/fs/cgroup")
        bases = {root / own.get("", "/").lstrip("/") / name}  # v2: the supervisor's own cgroup
        bases |= {
            root / c / own[c].lstrip("/") / name for c in ("memory", "pids", "cpu") if c in own
        }
        removed = 0
        for base in sorted(b for b in bases if b.is_dir()):
            dirs = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for d in [*dirs, base]:
                deadline = time.monotonic() + 10.0
                while True:
                    with contextlib.suppress(OSError):
                        for pid in (d / "cgroup.procs").read_text().split():
                            with contextlib.suppress(OSError):
                                os.kill(int(pid), signal.SIGKILL)
                    try:
                        d.rmdir()
                        removed += 1
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            log(f"could not remove cgroup {d}")
                            break
                        time.sleep(0.01)
        return removed


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def supervised(
    concurrency: int,
    isolation: Mapping[str, str] | None = None,
    dir_mode: int | None = 0o711,
    launch_mode: str = "fork",
    synchronous: str = "acked",
) -> Iterator[Supervisor]:
    """A started supervisor in a fresh /tmp/svb-* directory (chmod `dir_mode`: sandbox uids must
    reach the sockets inside, as in production). On the
    way out, even on error or SIGTERM: stop it, remove any cgroup it left, delete the directory.
    The supervisor's exit status is left in `exit_status`."""
    base = Path(tempfile.mkdtemp(prefix="svb-", dir="/tmp"))
    if dir_mode is not None:
        base.chmod(dir_mode)
    sup = Supervisor(base, concurrency, isolation, launch_mode, synchronous)
    failed = True
    try:
        log(f"starting supervisor in {base}")
        sup.start()
        yield sup
        failed = False
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let cleanup finish
        try:
            sup.exit_status = rc = sup.stop()
            if rc not in (None, 0):
                log(f"supervisor exited with status {rc}")
            if failed and sup.proc is not None:
                log(f"last lines of the supervisor log:\n{sup.log_tail()}")
            if sup.proc is not None and (left := sup.remove_leftover_cgroups()):
                log(f"removed {left} cgroup directories the supervisor left behind")
        finally:
            shutil.rmtree(base, ignore_errors=True)
            signal.signal(signal.SIGTERM, _raise_exit)


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
    client: Client, sup: Supervisor, ids: Sequence[str], timeout_s: float, poll_s: float = 0.1
) -> float:
    """Wait until every instance in `ids` is complete; fail fast on one that errored. Returns
    when the last of them completed (epoch seconds, as the supervisor recorded it): a run's
    wall time must not depend on when a poll happened to look.

    Asks for one instance's status at a time, the first not yet seen complete: the supervisor's
    CPU is measured, and listing every complete instance on each poll cost it ~8% of it."""
    deadline = time.monotonic() + timeout_s
    last_report = time.monotonic()
    done = 0
    last = 0.0
    while True:
        while done < len(ids):
            st = client.status(TENANT, ids[done])
            if st["status"] in ("errored", "terminated"):
                raise BenchError(
                    f"instance {ids[done]} is {st['status']}: {json.dumps(st.get('error'))[:2000]}"
                )
            if st["status"] != "complete":
                break
            last = max(last, dt.datetime.fromisoformat(st["updated_at"]).timestamp())
            done += 1
        if done == len(ids):
            return last
        now = time.monotonic()
        if not sup.alive():
            raise BenchError(
                f"supervisor died with {done}/{len(ids)} instances complete; "
                f"last lines of its log:\n{sup.log_tail()}"
            )
        if now - last_report >= 10.0:
            last_report = now
            log(f"{done}/{len(ids)} instances complete")
        if now > deadline:
            raise BenchError(
                f"only {done}/{len(ids)} instances complete after {timeout_s:g} s "
                f"(raise --timeout, or lower --workflows/--steps)"
            )
        time.sleep(poll_s)


def cpu_ms(before: Any, after: Any, *fields: str) -> float:
    return round(float(sum(getattr(after, f) - getattr(before, f) for f in fields)) * 1000, 1)


def reaped_faults(pid: int) -> int:
    """Minor page faults of the children `pid` has reaped (`cminflt` in /proc/PID/stat): for the
    supervisor, its activations'. A count, unlike CPU time it hardly depends on how fast the
    machine runs, and most of an activation's kernel time goes to faults (copy-on-write after
    the fork)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[8])


def working_ms(record: dict[str, Any]) -> float | None:
    """An activation record's launch -> reaped, less the time a prepared activation waited for
    its step (the `parked` phase): the process's own time, whenever it was launched."""
    total = record.get("total_ms")
    if total is None:
        return None
    return round(float(total) - ((record.get("phases") or {}).get("parked") or 0.0), 3)


def waited_ms(phases: dict[str, float]) -> float:
    """From a step's launch, or from when a prepared activation was given the step, to its
    result committed. One given its step before it said Hello counts from its own launch."""
    ahead = ("launch", "setup", "connect", "parked") if phases.get("parked", 0.0) > 0 else ()
    return round(sum(v for k, v in phases.items() if k != "reap" and k not in ahead), 3)


def run_workload(
    sup: Supervisor, workflows: int, steps: int, timeout_s: float, prefix: str = "w"
) -> dict[str, Any]:
    """Deploy the no-op workflow, create `workflows` instances with one create_batch, wait until
    all are complete, and read every instance's activation records. `prefix`: of the instance
    ids, new ones for each run on the same supervisor."""
    with Client(sup.endpoint, timeout_s=60.0) as client:
        log(f"deploying workflow {WORKFLOW!r} ({steps} no-op steps) for tenant {TENANT!r}")
        deployed = client.deploy(TENANT, workflow_source(steps), filename="bench_noop.py")
        if WORKFLOW not in deployed.get("workflows", []):
            raise BenchError(f"deploy did not register {WORKFLOW!r}: {deployed}")
        ids = [f"{prefix}{k:06d}" for k in range(workflows)]
        assert sup.proc is not None
        sproc = psutil.Process(sup.proc.pid)
        loop0 = client.stats().get("loop")
        cpu0, me0 = sproc.cpu_times(), psutil.Process().cpu_times()
        faults0 = reaped_faults(sproc.pid)
        log(f"creating {workflows} instances (create_batch) and waiting for completion")
        t0, t0_epoch = time.perf_counter(), time.time()
        created = client.create_batch(TENANT, WORKFLOW, [(i, None) for i in ids])
        t_created = time.perf_counter()
        if sum(1 for r in created if r["created"]) != workflows:
            raise BenchError(
                f"create_batch created {sum(r['created'] for r in created)} of "
                f"{workflows} instances"
            )
        wall = wait_complete(client, sup, ids, timeout_s) - t0_epoch
        cpu1, me1 = sproc.cpu_times(), psutil.Process().cpu_times()
        faults1 = reaped_faults(sproc.pid)
        loop1 = client.stats().get("loop")
        log(f"all {workflows} complete in {wall:.2f} s; reading {workflows} histories")

        records: list[dict[str, Any]] = []
        for i in ids:
            records.extend(client.history(TENANT, i)["activations"])
        prepared = client.stats().get("prepared")  # made, given a step, stopped unused
    activations = workflows * (steps + 1)
    timed = [r["phases"] for r in records if r.get("phases")]
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
        "prepared": prepared,
        # the supervisor loop's iterations, commits and log syncs per activation (the bench's
        # own status polls are in it: a few per second)
        "loop_per_activation": {k: round((loop1[k] - loop0[k]) / activations, 2) for k in loop0}
        if loop0 and loop1
        else None,
        # page faults of the activations reaped during the run, per activation
        "faults_per_activation": round((faults1 - faults0) / activations, 1),
        "outcomes": dict(outcomes),
        # total_ms without a prepared activation's wait for its step (see `working_ms`)
        "activation": {
            f: summarize([working_ms(r) if f == "total_ms" else r.get(f) for r in records])
            for f in ACTIVATION_FIELDS
        },
        # where launch -> reaped went (the activation record's phases; see supervisor.activation)
        "phases": {name: summarize([p[name] for p in timed]) for name in PHASES} if timed else {},
        # launch -> result committed: what the instance waits for (reaping overlaps its next step);
        # a prepared activation counts from when its step was given to it
        "committed_ms": summarize([waited_ms(p) for p in timed]),
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


def markdown_rows(rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with padded columns; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _checkout_relative(path: str) -> str:
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return Path(path).name


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
        # Where it sits in the checkout, not the machine's own path.
        "executable": _checkout_relative(sys.executable),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        # A host setting that moves the tail of every activation's cgroup join (see doctor)
        "cgroup_moves": cgroup_moves(),
    }


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(out: Path, name: str, res: dict[str, Any], md: str) -> None:
    """<out>/<name>.json (every number) and <out>/<name>.md (the table), written atomically; the
    table also goes to stdout."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{name}.json", json.dumps(res, indent=2) + "\n")
    write_atomic(out / f"{name}.md", md)
    print(md)
    log(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")


def guarded(body: Callable[[], T]) -> tuple[int, T | None]:
    """Run a benchmark's body with SIGTERM/SIGHUP turned into SystemExit (so every `supervised`
    block cleans up), and its failures turned into one line on stderr and an exit status.
    Returns (0, result) or (status, None)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    try:
        return 0, body()
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1, None
    except StepVisorError as exc:
        print(f"bench failed: supervisor error {exc.code}: {exc.message}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print("bench interrupted", file=sys.stderr)
        return 130, None
    except SystemExit as exc:  # SIGTERM / SIGHUP, via _raise_exit; cleanup has run
        print(f"bench stopped by a signal (exit status {exc.code})", file=sys.stderr)
        return int(exc.code or 1), None


def positive_int(text: str) -> int:
    """argparse type for counts: an integer >= 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def workload_parser(
    prog: str,
    doc: str | None,
    *,
    workflows: int,
    steps: int,
    concurrency: int,
    outputs: str,
    timeout_s: float,
) -> argparse.ArgumentParser:
    """The options every benchmark shares: the workload's size, where results go, a deadline."""
    p = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--workflows",
        type=positive_int,
        default=workflows,
        help=f"instances per run (default {workflows})",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=steps,
        help=f"no-op steps per workflow (default {steps})",
    )
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=concurrency,
        help=f"tenant max_concurrent and [server] max_activations (default {concurrency})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"directory for {outputs} (default bench/results)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=timeout_s,
        help=f"seconds to wait for a run's instances to complete (default {timeout_s:g})",
    )
    return p
