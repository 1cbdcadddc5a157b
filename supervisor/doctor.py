"""`stepvisor doctor`: what this host and config give each isolation layer, verified by starting a
real probe activation with the full sandbox and asking it what it can do."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import structlog

from protocol.codec import decode_from_activation, encode, load_json
from protocol.limits import MAX_SANDBOX_FRAME_BYTES
from protocol.messages import Ack, Activate, FailCmd, Hello, StepResult, StepStarted
from supervisor import dirs, disk, isolation, launcher
from supervisor.config import Config, Paths, resolve_paths
from supervisor.journal import pg_schema
from supervisor.journal.db import safe_url
from supervisor.sandbox_server import SandboxServer

PROBE_TENANT = "_doctor"  # not a valid tenant name: never collides with a real one
PROBE_SOURCE = """
import ctypes, os, resource, socket, sys
from stepvisor import workflow

def _try(fn):
    try:
        fn()
        return "allowed"
    except OSError as exc:
        return exc.strerror

def _user_namespace():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

@workflow("probe")
def probe(event, step):
    def look():
        p = event.payload
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        tcp = lambda: socket.create_connection(("127.0.0.1", p["port"]), timeout=2).close()
        return {
            "uid": os.getuid(), "gid": os.getgid(),
            "no_new_privs": status.get("NoNewPrivs", "").strip(),
            "seccomp": status.get("Seccomp", "").strip(),
            "cgroup": open("/proc/self/cgroup").read(),
            "interfaces": [l.split(":")[0].strip() for l in open("/proc/self/net/dev")][2:],
            "ipc_namespace": os.readlink("/proc/self/ns/ipc"),
            "read_canary": _try(lambda: open(p["canary"]).read()),
            "read_private": _try(lambda: open(p["private"]).read()),
            "unix_socket": _try(lambda: socket.socket(socket.AF_UNIX).close()),
            "dgram_pair": _try(lambda: [s.close() for s in socket.socketpair(
                socket.AF_UNIX, socket.SOCK_DGRAM)]),
            "user_namespace": _try(_user_namespace),
            "tcp_loopback": _try(tcp),
            "rlimit_as_mib": resource.getrlimit(resource.RLIMIT_AS)[0] >> 20,
            "rlimit_cpu_s": resource.getrlimit(resource.RLIMIT_CPU)[0],
            "scratch_mib": (lambda v: v.f_blocks * v.f_frsize >> 20)(os.statvfs(".")),
            "cwd": os.getcwd(), "executable": sys.executable,
        }
    return step.do("look", look)
"""


def _effective(name: str, facts: dict[str, Any], on: bool) -> tuple[bool, str]:
    """Whether the probe's observations show the layer in force."""
    if "error" in facts:
        return False, facts["error"]
    if name == "uid":
        return facts["uid"] != os.geteuid() and facts["read_private"] != "allowed", (
            f"ran as uid {facts['uid']}; a root-only file: {facts['read_private']}"
        )
    if name == "cgroup":
        inside = isolation.CGROUP_NAME_PREFIX in facts["cgroup"]
        return inside, "in its tenant cgroup" if inside else "not in a stepvisor cgroup"
    if name == "network":
        ifaces = facts["interfaces"]
        private_ipc = facts["ipc_namespace"] != os.readlink("/proc/self/ns/ipc")
        ipc = "a private IPC namespace" if private_ipc else "the host's IPC namespace"
        return ifaces == ["lo"] and private_ipc, f"interfaces {ifaces}; {ipc}"
    if name == "landlock":
        blocked = facts["read_canary"] != "allowed"
        return blocked, f"a world-readable file outside its paths: {facts['read_canary']}"
    if name == "seccomp":
        denied = ("unix_socket", "dgram_pair", "user_namespace")
        return facts["seccomp"] == "2" and all(facts[k] != "allowed" for k in denied), (
            f"Seccomp mode {facts['seccomp']}; new socket: {facts['unix_socket']}; "
            f"datagram socketpair: {facts['dgram_pair']}; "
            f"user namespace: {facts['user_namespace']}; TCP to loopback: {facts['tcp_loopback']}"
        )
    if name == "disk":
        size, want = facts["scratch_mib"], facts["disk_mib"]
        return size == want, f"its scratch is on a {size} MiB file system (disk_mib {want})"
    return False, "unknown layer"


def _probe(
    cfg: Config,
    layers: dict[str, isolation.Layer],
    cgroups: isolation.Cgroups | None,
    base: Path,
    run_dir: Path,
) -> dict[str, Any]:
    """Launch one activation exactly as the supervisor would, with its interpreter, from a
    directory inside its runtime dir, and collect what it observes."""
    real = resolve_paths(cfg)
    paths = Paths(
        state_dir=base,
        runtime_dir=run_dir,
        db=base / "none.db",
        api_endpoint="ipc://unused",
        sandbox_endpoint=f"ipc://{run_dir}/sandbox.sock",
        python=real.python,
    )
    canary = base / "canary.txt"  # world-readable: only Landlock keeps a sandbox from it
    canary.write_text("canary")
    canary.chmod(0o644)
    private = base / "private" / "secret.txt"  # root-only: only a uid change keeps it out
    private.parent.mkdir(mode=0o700)
    private.write_text("secret")
    server = socket.create_server(("127.0.0.1", 0))
    router = SandboxServer(
        run_dir / "sandbox.sock",
        mode=0o666,
        max_message=2 * MAX_SANDBOX_FRAME_BYTES,
        max_queued=16,
        log=structlog.get_logger(),
    )
    limits = cfg.defaults
    on = {name: layer.enabled for name, layer in layers.items()}
    uid = cfg.isolation.sandbox_uid_range[1] if on["uid"] else None
    gid = cfg.isolation.sandbox_gid_base if on["uid"] else None
    aid = os.getpid()
    space = disk.ScratchSpace(launcher.scratch_root(paths), quota=on["disk"])
    proc = None
    try:
        space.prepare(PROBE_TENANT, limits.disk_mib)
        scratch = launcher.make_scratch(paths, PROBE_TENANT, aid, uid, gid)
        if cgroups is not None:
            cgroups.tenant(PROBE_TENANT, limits)
        proc = launcher.spawn(paths, limits, launcher.sandbox_for(on, limits, scratch, uid, gid))
        if cgroups is not None:
            cgroups.add(PROBE_TENANT, aid, proc.pid)
        token = "doctor" + os.urandom(13).hex()
        launcher.send_token(proc, token)
        params = msgspec.json.encode(
            {"port": server.getsockname()[1], "canary": str(canary), "private": str(private)}
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not router.pending:
                select.select([router.fileno()], [], [], 0.5)
            router.pump()
            received = router.receive()
            if received is None:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    return {"error": f"probe exited with {proc.returncode}: {err[-1500:]}"}
                continue
            ident, frames = received
            if len(frames) != 1:
                return {"error": "the probe sent a message of several frames"}
            msg = decode_from_activation(frames[0])
            if isinstance(msg, Hello):
                act = Activate(
                    mode="run",
                    tenant=PROBE_TENANT,
                    filename="probe.py",
                    code_kind="source",
                    code=PROBE_SOURCE.encode(),
                    instance="probe",
                    workflow="probe",
                    params=params,
                    now=time.time(),
                )
                router.send(ident, encode(act))
            elif isinstance(msg, StepStarted):
                router.send(ident, encode(Ack()))
            elif isinstance(msg, StepResult):
                router.send(ident, encode(Ack()))
                if not msg.ok:
                    return {"error": f"probe step failed: {msg.error}"}
                facts: dict[str, Any] = load_json(msg.value or b"{}")
                return {**facts, "disk_mib": limits.disk_mib}
            elif isinstance(msg, FailCmd):
                return {"error": f"probe failed: {msg.error.type}: {msg.error.message}"}
        return {"error": "the probe activation did not report within 30 s"}
    finally:
        if proc is not None:
            launcher.kill_group(proc.pid)
            proc.wait()
        if cgroups is not None:
            cgroups.kill(PROBE_TENANT, aid)  # which keeps its emptied cgroup for reuse:
            cgroups.drop(PROBE_TENANT)  # remove it, and the probe tenant's directories
            for b in set(cgroups.bases.values()):
                with contextlib.suppress(OSError):  # busy while a supervisor uses it: fine
                    b.rmdir()
        space.close()
        router.close()
        server.close()


def _database_report(cfg: Config, db: Path) -> tuple[str, str | None]:
    """Which backend, and whether it answers: SQLite's file, or the PostgreSQL server's version,
    schema version and nodes (connecting, without migrating anything)."""
    url = cfg.server.database
    if not url:
        return "sqlite " + _path_report(db), None
    where = f"postgresql {safe_url(url)}"
    try:
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
            version = conn.info.server_version

            def one(sql: str) -> Any:
                row = conn.execute(sql).fetchone()
                return None if row is None else row[0]

            schema = nodes = 0
            if one("SELECT to_regclass('schema_version') IS NOT NULL"):
                schema = one("SELECT MAX(version) FROM schema_version") or 0
            if one("SELECT to_regclass('nodes') IS NOT NULL"):
                nodes = one("SELECT COUNT(*) FROM nodes WHERE stopped_at IS NULL")
    except psycopg.Error as exc:
        why = f"{where}: cannot connect: {str(exc).strip()}"
        return why, f"server.database: {why}"
    return (
        f"{where}: server {version // 10000}.{version % 10000}, schema {schema} of "
        f"{len(pg_schema.MIGRATIONS)}, {nodes} node(s) not stopped"
    ), None


def _path_report(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    kind = "socket" if stat.S_ISSOCK(st.st_mode) else "dir" if path.is_dir() else "file"
    return f"{path}: {kind}, mode {st.st_mode & 0o777:o}, uid {st.st_uid}"


def _runs_as(cfg: Config, refused: list[str] | None) -> str:
    """Who tenant code runs as under this config: the fail-closed decision. `refused`: the
    layers for which the supervisor would refuse to start, if it would."""
    if refused is not None:
        as_root = "uid" in refused and os.geteuid() == 0
        why = "tenant code never runs as root" if as_root else "see error"
        return f"nothing: the supervisor refuses to start ({why})"
    if os.geteuid() != 0:
        return f"uid {os.geteuid()}, the supervisor's own (sandbox uids need root)"
    if cfg.isolation.uid == "off":
        return 'root, without capabilities ([isolation] uid = "off"; not recommended)'
    low, high = cfg.isolation.sandbox_uid_range
    return f"a sandbox uid in {low}-{high} per activation"


def _interpreters(cfg: Config, python: str) -> tuple[dict[str, str], list[str]]:
    """Each interpreter the daemon would run, looked at in full; errors for those it would
    refuse (a tenant's interpreter that sandbox uids cannot run, see `isolation`)."""
    seen = {python: "the server's"}
    if cfg.defaults.python:
        seen.setdefault(cfg.defaults.python, "defaults.python")
    for tenant, over in cfg.tenants.items():
        if over.python:
            seen.setdefault(over.python, f"tenants.{tenant}.python")
    enforced = os.geteuid() == 0 and cfg.isolation.uid != "off"
    report: dict[str, str] = {}
    errors: list[str] = []
    for path, key in seen.items():
        if os.geteuid() != 0:
            report[path] = "not checked (no sandbox uids without root)"
            continue
        why = isolation.interpreter_blocked(path)
        report[path] = why or "usable by sandbox uids"
        if why and enforced and path != python:  # the server's own: `resolve` says it
            errors.append(f"`{key}`: " + isolation.not_root_fix(path, why))
    return report, errors


def _spare_forks(python: str) -> str:
    """How the fork server makes its spares with this interpreter: asked of a child of ours,
    whose own probe forks one process that becomes our child (reaped at our exit)."""
    code = "from sandbox_host.sibling import probe; print(probe() is not None)"
    try:
        r = subprocess.run(
            [python, "-I", "-c", code], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown: {exc}"
    if r.stdout.strip() == "True":
        return "once each (clone with CLONE_PARENT)"
    if r.stdout.strip() == "False":
        return "twice each (through a middle process): sibling forks are unavailable here"
    return f"unknown: {r.stderr.strip()[-300:]}"


def _probe_dir(paths: Paths, cfg: Config, uid_on: bool) -> tuple[Path | None, str | None]:
    """A directory for the probe's socket and scratch inside the daemon's runtime dir, made or
    checked as `serve` does: what keeps sandbox uids from it there shows."""
    mode = 0o755 if os.geteuid() == 0 else 0o711 if cfg.server.api_group else 0o700
    try:
        dirs.ensure_private_dir(
            paths.runtime_dir,
            mode,
            "server.runtime_dir",
            follow_symlink=bool(cfg.server.runtime_dir),
        )
        if uid_on and (why := isolation.runtime_unreachable(paths.runtime_dir)):
            return None, why
        run_dir = paths.runtime_dir / f"doctor-{os.getpid()}"
        run_dir.mkdir(mode=0o755)
        run_dir.chmod(0o755)
    except dirs.UnsafeDir as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot make {exc.filename}: {exc.strerror}"
    return run_dir, None


def run(cfg: Config) -> tuple[dict[str, Any], bool]:
    """Check the host and config; returns the report and whether every wanted layer is in force."""
    paths = resolve_paths(cfg)
    db_report, db_error = _database_report(cfg, paths.db)
    report: dict[str, Any] = {
        "interpreter": paths.python,
        "running_as_uid": os.geteuid(),
        "state_dir": _path_report(paths.state_dir),
        "database": db_report,
        "api_socket": _path_report(Path(paths.api_endpoint.removeprefix("ipc://"))),
        "sandbox_socket": _path_report(Path(paths.sandbox_endpoint.removeprefix("ipc://"))),
        "landlock_abi": isolation.landlock_abi(),
    }
    errors = []
    if db_error:
        errors.append(db_error)
    refused: list[str] | None = None
    try:
        layers, cgroups = isolation.resolve(cfg, paths.state_dir, paths.python)
    except isolation.IsolationError as exc:
        errors.append(str(exc))
        refused = exc.layers
        # Probe what the host gives anyway; a layer at fault is left out.
        modes = {n: "off" if n in exc.layers else "auto" for n in isolation.LAYERS}
        cfg_loose = msgspec.structs.replace(
            cfg, isolation=msgspec.structs.replace(cfg.isolation, **modes)
        )
        layers, cgroups = isolation.resolve(cfg_loose, paths.state_dir, paths.python)
    report["tenant_code_runs_as"] = _runs_as(cfg, refused)
    report["interpreters"], bad = _interpreters(cfg, paths.python)
    errors += bad
    report["cgroup"] = cgroups.describe() if cgroups else "none"
    if cgroups is not None:
        report["cgroup_moves"] = isolation.cgroup_moves()
    if cfg.server.launch_mode == "fork":
        report["spare_forks"] = _spare_forks(paths.python)
    run_dir, why = _probe_dir(paths, cfg, layers["uid"].enabled)
    report["runtime_dir"] = _path_report(paths.runtime_dir)  # as the probe found or made it
    base = Path(tempfile.mkdtemp(prefix="svdoc-", dir="/tmp"))
    base.chmod(0o711)
    try:
        facts = {"error": why} if run_dir is None else _probe(cfg, layers, cgroups, base, run_dir)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
    report["probe"] = facts
    if errors:
        report["error"] = "; ".join(errors)
    ok = "error" not in report and "error" not in facts
    rows = []
    for name, layer in layers.items():
        effective, seen = _effective(name, facts, layer.enabled) if layer.enabled else (False, "")
        wanted = getattr(cfg.isolation, name)
        if layer.enabled and not effective:
            ok = False
        rows.append(
            {
                "layer": name,
                "mode": wanted,
                "available": layer.available,
                "enabled": layer.enabled,
                "effective": effective,
                "detail": seen or layer.detail,
            }
        )
    report["layers"] = rows
    return report, ok


def render(report: dict[str, Any]) -> str:
    lines = [f"{'layer':<9} {'mode':<9} {'available':<10} {'enabled':<8} {'effective':<10} detail"]
    for r in report["layers"]:
        yes = {True: "yes", False: "no"}
        lines.append(
            f"{r['layer']:<9} {r['mode']:<9} {yes[r['available']]:<10} "
            f"{yes[r['enabled']]:<8} {yes[r['effective']]:<10} {r['detail']}"
        )
    lines.append("")
    lines.append(f"{'tenant code:':<16} runs as {report['tenant_code_runs_as']}")
    for key in (
        "interpreter",
        "running_as_uid",
        "landlock_abi",
        "cgroup",
        "cgroup_moves",
        "spare_forks",
        "state_dir",
        "runtime_dir",
        "database",
        "api_socket",
        "sandbox_socket",
    ):
        if key in report:
            lines.append(f"{key + ':':<16} {report[key]}")
    for python, verdict in report["interpreters"].items():
        lines.append(f"{'python:':<16} {python}: {verdict}")
    probe = report["probe"]
    if "error" in probe:
        lines.append(f"probe failed:    {probe['error']}")
    else:
        lines.append(
            f"probe limits:    address space {probe['rlimit_as_mib']} MiB, "
            f"CPU {probe['rlimit_cpu_s']} s, no_new_privs {probe['no_new_privs']}"
        )
    if "error" in report:
        lines.append(f"error:           {report['error']}")
    return "\n".join(lines)


def main(cfg: Config, as_json: bool) -> int:
    report, ok = run(cfg)
    if as_json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        print(render(report))
    return 0 if ok else 1
