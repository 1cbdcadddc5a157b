"""`stepvisor doctor`: what this host and config give each isolation layer, verified by starting a
real probe activation with the full sandbox and asking it what it can do."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from protocol.codec import decode_from_activation, encode, load_json
from protocol.messages import Ack, Activate, FailCmd, Hello, StepResult, StepStarted
from supervisor import isolation, launcher
from supervisor.config import Config, Paths, resolve_paths

PROBE_TENANT = "_doctor"  # not a valid tenant name: never collides with a real one
PROBE_SOURCE = """
import os, resource, socket
from stepvisor import workflow

def _try(fn):
    try:
        fn()
        return "allowed"
    except OSError as exc:
        return exc.strerror

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
            "tcp_loopback": _try(tcp),
            "rlimit_as_mib": resource.getrlimit(resource.RLIMIT_AS)[0] >> 20,
            "rlimit_cpu_s": resource.getrlimit(resource.RLIMIT_CPU)[0],
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
        return facts["seccomp"] == "2" and facts["unix_socket"] != "allowed", (
            f"Seccomp mode {facts['seccomp']}; new socket: {facts['unix_socket']}; "
            f"TCP to loopback: {facts['tcp_loopback']}"
        )
    return False, "unknown layer"


def _probe(
    cfg: Config, layers: dict[str, isolation.Layer], cgroups: isolation.Cgroups | None, base: Path
) -> dict[str, Any]:
    """Launch one activation exactly as the supervisor would, and collect what it observes."""
    run_dir = base / "run"
    run_dir.mkdir(mode=0o755)
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
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(paths.sandbox_endpoint)
    os.chmod(run_dir / "sandbox.sock", 0o666)
    limits = cfg.defaults
    on = {name: layer.enabled for name, layer in layers.items()}
    uid = cfg.isolation.sandbox_uid_range[1] if on["uid"] else None
    gid = cfg.isolation.sandbox_gid_base if on["uid"] else None
    aid = os.getpid()
    scratch = launcher.make_scratch(paths, aid, uid, gid)
    proc = None
    try:
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
            if not router.poll(500):
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    return {"error": f"probe exited with {proc.returncode}: {err[-1500:]}"}
                continue
            ident, frame = router.recv_multipart()
            msg = decode_from_activation(frame)
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
                router.send_multipart([ident, encode(act)])
            elif isinstance(msg, StepStarted):
                router.send_multipart([ident, encode(Ack())])
            elif isinstance(msg, StepResult):
                router.send_multipart([ident, encode(Ack())])
                if not msg.ok:
                    return {"error": f"probe step failed: {msg.error}"}
                facts: dict[str, Any] = load_json(msg.value or b"{}")
                return facts
            elif isinstance(msg, FailCmd):
                return {"error": f"probe failed: {msg.error.type}: {msg.error.message}"}
        return {"error": "the probe activation did not report within 30 s"}
    finally:
        if proc is not None:
            launcher.kill_group(proc.pid)
            proc.wait()
        if cgroups is not None:
            cgroups.kill(PROBE_TENANT, aid)
            for d in {b / PROBE_TENANT for b in cgroups.bases.values()}:
                with contextlib.suppress(OSError):
                    d.rmdir()
            for b in set(cgroups.bases.values()):
                with contextlib.suppress(OSError):  # busy while a supervisor uses it: fine
                    b.rmdir()
        router.close()
        ctx.term()
        server.close()


def _path_report(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    kind = "socket" if stat.S_ISSOCK(st.st_mode) else "dir" if path.is_dir() else "file"
    return f"{path}: {kind}, mode {st.st_mode & 0o777:o}, uid {st.st_uid}"


def run(cfg: Config) -> tuple[dict[str, Any], bool]:
    """Check the host and config; returns the report and whether every wanted layer is in force."""
    paths = resolve_paths(cfg)
    report: dict[str, Any] = {
        "interpreter": paths.python,
        "running_as_uid": os.geteuid(),
        "state_dir": _path_report(paths.state_dir),
        "database": _path_report(paths.db),
        "api_socket": _path_report(Path(paths.api_endpoint.removeprefix("ipc://"))),
        "sandbox_socket": _path_report(Path(paths.sandbox_endpoint.removeprefix("ipc://"))),
        "landlock_abi": isolation.landlock_abi(),
    }
    try:
        layers, cgroups = isolation.resolve(cfg, paths.state_dir)
    except isolation.IsolationError as exc:
        report["error"] = str(exc)
        cfg_loose = msgspec.structs.replace(
            cfg,
            isolation=msgspec.structs.replace(
                cfg.isolation, **{n: "auto" for n in isolation.LAYERS}
            ),
        )
        layers, cgroups = isolation.resolve(cfg_loose, paths.state_dir)
    report["cgroup"] = cgroups.describe() if cgroups else "none"
    base = Path(tempfile.mkdtemp(prefix="svdoc-", dir="/tmp"))
    base.chmod(0o711)
    try:
        facts = _probe(cfg, layers, cgroups, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report["probe"] = facts
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
    for key in (
        "interpreter",
        "running_as_uid",
        "landlock_abi",
        "cgroup",
        "state_dir",
        "database",
        "api_socket",
        "sandbox_socket",
    ):
        lines.append(f"{key + ':':<16} {report[key]}")
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
