"""Compatibility checks: instances' journals replayed against code in a sandbox, up to the first
command not journaled yet, so a change of code is known safe or not before any instance runs it.

Three requests use them: `deploy --check` (the tenant's in-flight and recent instances against new
code, deploying nothing), `upgrade` (in-flight instances moved to another version where their
check passes) and `replay` (one instance, step by step). A plan is made when the request arrives;
the check activation (an inspection with `replays`) answers with a `CheckResult` per instance, and
`conclude` turns them into the reply, and, for an upgrade, into new pins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import MAX_CHECK_INSTANCES, MAX_CHECK_JOURNAL_BYTES
from protocol.messages import CheckResult, Replay
from supervisor import engine
from supervisor import journal as j
from supervisor.journal.db import Db, Row

RECENT_S = 86_400.0  # deploy --check also replays instances that finished this recently
Purpose = Literal["deploy", "upgrade", "replay"]


@dataclass
class CheckPlan:
    """What one check activation replays, and what its instances looked like when planned."""

    purpose: Purpose
    version: str  # the code checked
    replays: list[Replay] = field(default_factory=list)
    planned: dict[str, Row] = field(default_factory=dict)  # instance id → its row then
    steps: dict[str, int] = field(default_factory=dict)  # instance id → journal length then
    more: bool = False  # candidates were left out (over MAX_CHECK_INSTANCES or the byte budget)


def plan(conn: Db, tenant: str, purpose: Purpose, version: str, rows: list[Row]) -> CheckPlan:
    """A plan replaying `rows` (instances) until MAX_CHECK_INSTANCES of them, or
    MAX_CHECK_JOURNAL_BYTES of journal, are taken; the rest set `more`."""
    p = CheckPlan(purpose, version)
    budget = MAX_CHECK_JOURNAL_BYTES
    for row in rows:
        size = j.state_bytes(conn, tenant, row["id"]) + len(row["params"])
        if len(p.replays) >= MAX_CHECK_INSTANCES or size > budget:
            p.more = True
            continue
        budget -= size
        journal = j.journal_entries(conn, tenant, row["id"])
        p.replays.append(
            Replay(
                instance=row["id"],
                workflow=row["workflow"],
                params=bytes(row["params"]),
                created_at=float(row["created_at"]),
                journal=journal,
            )
        )
        p.planned[row["id"]] = row
        p.steps[row["id"]] = len(journal)
    return p


def results_of(p: CheckPlan, reported: list[CheckResult]) -> dict[str, CheckResult]:
    """The check activation's results, held to the plan: tenant code ran beside it and may have
    said anything, so each must name a planned instance once and have replayed no more entries
    than it was given. A planned instance with no result is said to have failed."""
    out: dict[str, CheckResult] = {}
    for r in reported:
        if r.instance not in p.steps or r.instance in out:
            raise ProtocolError(
                ErrorCode.DEPLOY_FAILED,
                f"the check reported instance {r.instance!r} twice, or unasked",
            )
        if r.replayed > p.steps[r.instance]:
            raise ProtocolError(
                ErrorCode.DEPLOY_FAILED,
                f"the check reported {r.replayed} entries replayed for {r.instance!r}, "
                f"which has {p.steps[r.instance]}",
            )
        out[r.instance] = r
    for instance in p.steps:
        out.setdefault(
            instance,
            CheckResult(
                instance=instance, verdict="fails", replayed=0, message="the check reported nothing"
            ),
        )
    return out


def conclude(
    conn: Db,
    tenant: str,
    p: CheckPlan,
    workflows: list[str],
    results: dict[str, CheckResult],
    now: float,
) -> dict[str, Any]:
    """The reply to the request that planned the check; an upgrade re-pins here."""
    checked = []
    for instance, row in p.planned.items():
        r = results[instance]
        view = {
            "instance": instance,
            "workflow": row["workflow"],
            "status": row["status"],
            "pinned": row["version"],
            "verdict": r.verdict,
            "replayed": r.replayed,
            "steps": p.steps[instance],
            "message": r.message,
        }
        if p.purpose == "deploy" and r.verdict == "not_in_code":
            continue  # the new code does not define its workflow: deploying it changes nothing
        if p.purpose == "upgrade":
            view["upgrade"] = (
                engine.upgrade(conn, tenant, instance, row["version"], p.version, r.replayed, now)
                if r.verdict == "compatible" and r.replayed == p.steps[instance]
                else "refused"
            )
        checked.append(view)
    report: dict[str, Any] = {
        "tenant": tenant,
        "version": p.version,
        "workflows": workflows,
        "checked": checked,
        "compatible": all(c["verdict"] == "compatible" for c in checked),
        "more": p.more,
    }
    if p.purpose == "deploy":
        report["deployed"] = False
    return report
