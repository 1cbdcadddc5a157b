"""The commands that change code under running instances: `deploy --check`, `workflows`,
`upgrade`, `replay`. Each prints a readable report (or JSON with --json) and exits 1 when
something would break, so `stepvisor deploy T F --check && stepvisor deploy T F` is safe."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from protocol.messages import Activate, CheckResult, FailCmd, Replay
from stepvisor import render
from stepvisor.commands import EXIT_ERROR, EXIT_USAGE, Handler, _client, _print

MARK = {"compatible": "ok", "nondeterministic": "BREAKS", "fails": "FAILS"}


def deploy(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.deploy(args.tenant, args.file, check=args.check)
    if not args.check:
        names = ", ".join(r["workflows"])
        _print(args, r, f"deployed {names} for {r['tenant']} as version {r['version']}")
        return 0
    _print(args, r, check_report(r, f"{args.file} (version {r['version']}, not deployed)"))
    return 0 if r["compatible"] else EXIT_ERROR


def check_report(r: dict[str, Any], what: str) -> str:
    rows = r["checked"]
    lines = [f"checked {len(rows)} instance(s) of {args_list(r['workflows'])} against {what}"]
    for c in rows:
        lines.append(
            f"  {MARK.get(c['verdict'], c['verdict']):<7} {c['instance']:<24} {c['status']:<10}"
            f" {c['replayed']}/{c['steps']} entries  {render.visible(c['message'])}"
            + (f"  [{c['upgrade']}]" if "upgrade" in c else "")
        )
    if r.get("more"):
        lines.append("  (more instances qualified than one check replays: the rest were not)")
    broken = [c for c in rows if c["verdict"] != "compatible"]
    lines.append(f"{len(broken)} would break" if broken else "every instance replays against it")
    return "\n".join(lines)


def args_list(names: list[str]) -> str:
    return ", ".join(names) or "no workflow"


def workflows(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.workflows(args.tenant)
    lines = [f"{'VERSION':<17} {'DEPLOYED AT':<30} {'LIVE':>6} {'ALL':>6}  FILE  WORKFLOWS"]
    for v in r["versions"]:
        names = [f"{n}*" if n in v["current"] else n for n in v["workflows"]]
        lines.append(
            f"{v['version']:<17} {v['deployed_at']:<30} {v['live_instances']:>6}"
            f" {v['instances']:>6}  {v['filename']}  {', '.join(names)}"
        )
    lines.append("(* deployed: new instances of it run this version)")
    _print(args, r, "\n".join(lines))
    return 0


def upgrade(args: argparse.Namespace) -> int:
    """`upgrade TENANT ID... WORKFLOW` or `upgrade TENANT --all WORKFLOW`."""
    *ids, workflow = args.targets
    if args.all == bool(ids):
        print("error USAGE: give the instance ids or --all (not both)", file=sys.stderr)
        return EXIT_USAGE
    checked: list[dict[str, Any]] = []
    with _client(args) as c:
        if args.all:
            version = args.to or c.workflows(args.tenant)["deployments"].get(workflow)
            ids = [
                i["id"]
                for status in ("queued", "running", "paused", "waiting")
                for i in c.list(args.tenant, status, 100_000)
                if i["workflow"] == workflow and i["version"] != version
            ]
        r: dict[str, Any] = {}
        for start in range(0, max(len(ids), 1), 100):
            batch = ids[start : start + 100]
            if not batch and args.all:
                break
            r = c.upgrade(args.tenant, workflow, batch, version=args.to)
            checked += r["checked"]
    report = dict(r, checked=checked, more=False) if r else {"checked": [], "workflows": []}
    moved = sum(c.get("upgrade") == "upgraded" for c in checked)
    human = check_report(report, f"version {report.get('version', '-')}") if checked else ""
    human += f"\nupgraded {moved} of {len(checked)}"
    _print(args, report, human.strip())
    return 0 if moved == len(checked) else EXIT_ERROR


def replay(args: argparse.Namespace) -> int:
    """One instance, entry by entry: in a sandbox against deployed code, or here against FILE."""
    with _client(args) as c:
        h = c.history(args.tenant, args.id)
        if args.file is None:
            (result,) = c.replay(args.tenant, args.id, version=args.version)["checked"]
            where = f"version {args.version or h['instance']['version']}, in a sandbox"
        else:
            data = c.journal(args.tenant, args.id)
            result = _as_view(replay_here(Path(args.file), args.tenant, data), data)
            where = f"{args.file}, in this process"
    lines = [f"replaying {args.tenant}/{args.id} ({h['instance']['workflow']}) against {where}"]
    for e in h["entries"][: result["replayed"]]:
        outcome = e["status"] if e["result"] is None else render.visible(_short(e["result"]))
        lines.append(
            f"  replayed #{e['seq']:<4} {e['kind']:<10} {render.visible(e['name'])}: {outcome}"
        )
    lines.append(
        f"{MARK.get(result['verdict'], result['verdict'])}: {render.visible(result['message'])}"
    )
    _print(args, result, "\n".join(lines))
    return 0 if result["verdict"] == "compatible" else EXIT_ERROR


def replay_here(path: Path, tenant: str, data: dict[str, Any]) -> CheckResult:
    """Replay the journal against the user's own file in this process, as a sandbox would."""
    from sandbox_host.runtime import in_this_process

    act = Activate(
        mode="check",
        tenant=tenant,
        filename=path.name,
        code_kind="source",
        code=path.read_bytes(),
        now=time.time(),
        replays=[
            Replay(
                instance=data["instance"],
                workflow=data["workflow"],
                params=data["params"],
                created_at=data["created_at"],
                journal=data["journal"],
            )
        ],
    )
    last = in_this_process(act)
    if isinstance(last, FailCmd):
        err = last.error
        return CheckResult(
            instance=data["instance"],
            verdict="fails",
            replayed=0,
            message=f"{path} fails to load: {err.type}: {err.message}",
        )
    return last.results[0]  # type: ignore[union-attr]


def _as_view(r: CheckResult, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "instance": r.instance,
        "workflow": data["workflow"],
        "status": data["status"],
        "pinned": data["version"],
        "verdict": r.verdict,
        "replayed": r.replayed,
        "steps": len(data["journal"]),
        "message": r.message,
    }


def _short(value: Any, limit: int = 60) -> str:
    import json

    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


COMMANDS: dict[str, Handler] = {
    "deploy": deploy,
    "workflows": workflows,
    "upgrade": upgrade,
    "replay": replay,
}
