"""Client requests, one handler each, dispatched from a table. Every call is scoped to one tenant.

A handler returns the reply's result, raises ProtocolError for a typed error, or returns DEFERRED
when the reply comes later (a deploy waits for its inspection activation).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from protocol.codec import load_json
from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import (
    MAX_BATCH_ITEMS,
    MAX_CHECK_INSTANCES,
    MAX_CHECK_JOURNAL_BYTES,
    MAX_REPLY_BYTES,
    MAX_RESULT_BYTES,
)
from protocol.messages import (
    TERMINAL_STATUSES,
    USAGE_FIELDS,
    CheckReplay,
    CollectGarbage,
    Control,
    Create,
    CreateBatch,
    CreateKey,
    Deploy,
    GetHistory,
    GetInfo,
    GetJournal,
    GetStats,
    GetStatus,
    GetUsage,
    ListInstances,
    ListKeys,
    ListNodes,
    ListWorkflows,
    Ping,
    Reload,
    RevokeKey,
    SendEvent,
    Upgrade,
)
from supervisor import checks, engine
from supervisor import journal as j
from supervisor.activation import DeployRequest
from supervisor.cluster import Node
from supervisor.config import Config
from supervisor.journal.db import Db, Row

DEFERRED = object()
# Results, outputs and errors one history or list reply carries, well inside what a client
# decodes.
HISTORY_BUDGET_BYTES = MAX_REPLY_BYTES // 2


class Host(Protocol):
    """What handlers need of the supervisor beyond the database."""

    conn: Db
    cfg: Config
    node: Node

    def launch_inspection(self, tenant: str, request: DeployRequest) -> None: ...

    def kill_instance_activation(self, tenant: str, instance: str, outcome: str) -> None: ...

    def reload_config(self) -> dict[str, Any]: ...

    def stats_view(self, tenant: str | None) -> dict[str, Any]: ...

    def info(self) -> dict[str, Any]: ...

    def collect_garbage(self) -> dict[str, Any]: ...

    def keys_changed(self) -> None: ...

    def server_key(self) -> str: ...


def status_view(row: Row, *, full: bool = True) -> dict[str, Any]:
    """An instance as users see it; not `full`: without its output and error traceback."""
    error = _error_view(row["error"])
    if error is not None and not full:
        error["traceback"] = ""
    return {
        "tenant": row["tenant"],
        "id": row["id"],
        "workflow": row["workflow"],
        "version": row["version"],
        "status": row["status"],
        "output": None if row["output"] is None or not full else load_json(row["output"]),
        "error": error,
        "created_at": engine.iso(row["created_at"]),
        "updated_at": engine.iso(row["updated_at"]),
        "wake_at": engine.iso(row["wake_at"]),
        "steps": row["steps"],
        "activations": row["activations"],
        "parent": row["parent"],  # the instance that started it with step.invoke, if one did
    }


def _error_view(text: str | None) -> dict[str, Any] | None:
    err = j.decode_error(text)
    if err is None:
        return None
    return {"type": err.type, "message": err.message, "traceback": err.traceback, "code": err.code}


def _result(data: bytes) -> Any:
    # A wait's result wraps an event payload of up to the payload limit: allow the wrapper.
    return load_json(data, what="journaled result", limit=MAX_RESULT_BYTES)


def _tenant(host: Host, tenant: str) -> None:
    if not j.tenant_exists(host.conn, tenant):
        raise ProtocolError(ErrorCode.UNKNOWN_TENANT, f"tenant {tenant!r} has deployed no code")


def _instance(host: Host, tenant: str, instance: str) -> Row:
    _tenant(host, tenant)
    row = j.get_instance(host.conn, tenant, instance)
    if row is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no instance {instance!r} for tenant {tenant!r}")
    return row


def _params(data: bytes, what: str) -> bytes:
    load_json(data, what=what)  # validates JSON and size
    return data


def deploy(host: Host, req: Deploy, identity: bytes, now: float) -> object:
    if host.cfg.server.require_declared_tenants and req.tenant not in host.cfg.tenants:
        raise ProtocolError(ErrorCode.UNKNOWN_TENANT, f"tenant {req.tenant!r} is not declared")
    if (req.source is None) == (req.pickled is None):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "deploy needs exactly one of source, pickled")
    kind, code = ("source", req.source) if req.source is not None else ("pickle", req.pickled)
    assert code is not None
    if kind == "source":
        try:
            code.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "source is not UTF-8") from None
    version = hashlib.sha256(kind.encode() + b"\0" + code).hexdigest()[:16]
    if req.check:  # a tenant's first file may be checked too: it has no instances to replay
        # The instances of the tenant's workflows the code may define: a definition names its
        # workflow literally (inspections are held to that), so a byte search finds them all.
        names = [d["workflow"] for d in j.deployments(host.conn, req.tenant)]
        named = [n for n in names if n.encode() in code]
        rows = j.instances_to_check(
            host.conn,
            req.tenant,
            named,
            MAX_CHECK_INSTANCES + 1,
            finished_since=now - checks.RECENT_S,
        )
        p = checks.plan(host.conn, req.tenant, "deploy", version, rows)
        host.launch_inspection(
            req.tenant, DeployRequest(identity, req.rid, kind, req.filename, code, version, p)
        )
        return DEFERRED
    existing = j.get_code(host.conn, req.tenant, version)
    if existing is not None:
        workflows = existing["workflows"].split(",")
        for name in workflows:
            j.set_deployment(host.conn, req.tenant, name, version, now)
        return {"tenant": req.tenant, "version": version, "workflows": workflows}
    request = DeployRequest(identity, req.rid, kind, req.filename, code, version)
    host.launch_inspection(req.tenant, request)
    return DEFERRED


def _code(host: Host, tenant: str, version: str, workflow: str | None = None) -> Row:
    code = j.get_code(host.conn, tenant, version)
    if code is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"tenant {tenant!r} has no code version {version}")
    if workflow is not None and workflow not in code["workflows"].split(","):
        raise ProtocolError(
            ErrorCode.UNKNOWN_WORKFLOW, f"code version {version} defines no workflow {workflow!r}"
        )
    return code


def _check(
    host: Host, tenant: str, identity: bytes, rid: int, code: Row, p: checks.CheckPlan
) -> object:
    request = DeployRequest(
        identity, rid, code["kind"], code["filename"], bytes(code["code"]), p.version, p
    )
    host.launch_inspection(tenant, request)
    return DEFERRED


def upgrade(host: Host, req: Upgrade, identity: bytes, now: float) -> object:
    _tenant(host, req.tenant)
    version = req.version or _deployed(host, req.tenant, req.workflow)
    code = _code(host, req.tenant, version, req.workflow)
    if req.ids is None:
        rows = j.instances_to_check(
            host.conn,
            req.tenant,
            [req.workflow],
            MAX_CHECK_INSTANCES + 1,
            other_than_version=version,
        )
    else:
        rows = []
        for iid in dict.fromkeys(req.ids):
            row = _instance(host, req.tenant, iid)
            if row["workflow"] != req.workflow:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"instance {iid!r} runs workflow {row['workflow']!r}, not {req.workflow!r}",
                )
            if row["status"] in TERMINAL_STATUSES:
                raise ProtocolError(ErrorCode.INVALID_STATE, f"instance {iid!r} is {row['status']}")
            rows.append(row)
    return _check(
        host,
        req.tenant,
        identity,
        req.rid,
        code,
        checks.plan(host.conn, req.tenant, "upgrade", version, rows),
    )


def replay(host: Host, req: CheckReplay, identity: bytes, now: float) -> object:
    row = _instance(host, req.tenant, req.id)
    version = req.version or row["version"]
    code = _code(host, req.tenant, version, row["workflow"])
    p = checks.plan(host.conn, req.tenant, "replay", version, [row])
    if p.more:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"instance {req.id!r} journals more than a check replays "
            f"({MAX_CHECK_JOURNAL_BYTES // (1024 * 1024)} MiB)",
        )
    return _check(host, req.tenant, identity, req.rid, code, p)


def journal(host: Host, req: GetJournal, identity: bytes, now: float) -> object:
    """What replaying the instance elsewhere needs (`stepvisor replay --file`)."""
    row = _instance(host, req.tenant, req.id)
    return {
        "instance": req.id,
        "workflow": row["workflow"],
        "version": row["version"],
        "status": row["status"],
        "params": bytes(row["params"]),
        "created_at": row["created_at"],
        "journal": j.journal_entries(host.conn, req.tenant, req.id),
    }


def workflows(host: Host, req: ListWorkflows, identity: bytes, now: float) -> object:
    _tenant(host, req.tenant)
    deployed = {d["workflow"]: d["version"] for d in j.deployments(host.conn, req.tenant)}
    out = []
    for v in j.code_versions(host.conn, req.tenant):
        names = v["workflows"].split(",")
        out.append(
            {
                "version": v["hash"],
                "filename": v["filename"],
                "kind": v["kind"],
                "bytes": v["bytes"],
                "deployed_at": engine.iso(v["created_at"]),
                "workflows": names,
                "current": sorted(n for n in names if deployed.get(n) == v["hash"]),
                "live_instances": v["live"],
                "instances": v["pinned"],
            }
        )
    return {"tenant": req.tenant, "deployments": deployed, "versions": out}


def _existing(host: Host, tenant: str, workflow: str, instance: str, params: bytes) -> Row | None:
    """The instance a create names, when it exists with the same workflow and params (a retry
    after a lost reply: the answer is the instance, whatever the cap); ALREADY_EXISTS when it
    exists with others; None when the id is new."""
    row = j.get_instance(host.conn, tenant, instance)
    if row is None:
        return None
    if row["workflow"] != workflow or bytes(row["params"]) != params:
        raise ProtocolError(
            ErrorCode.ALREADY_EXISTS,
            f"instance {instance!r} exists with another workflow or params",
        )
    return row


def _deployed(host: Host, tenant: str, workflow: str) -> str:
    _tenant(host, tenant)
    version = j.get_deployment(host.conn, tenant, workflow)
    if version is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_WORKFLOW, f"tenant {tenant!r} has no workflow {workflow!r} deployed"
        )
    return version


def _room(host: Host, tenant: str, adding: int) -> None:
    limit = host.cfg.limits_for(tenant).max_instances
    j.lock_tenant(host.conn, tenant)  # other nodes' creates wait: the limit is cluster-wide
    if j.count_live_instances(host.conn, tenant) + adding > limit:
        raise ProtocolError(
            ErrorCode.LIMIT_EXCEEDED, f"tenant {tenant!r} may have at most {limit} live instances"
        )


def _create_one(
    host: Host, tenant: str, workflow: str, version: str, instance: str, params: bytes, now: float
) -> tuple[Row, bool]:
    row = _existing(host, tenant, workflow, instance, params)
    if row is not None:
        return row, False  # same id, same request: idempotent
    engine.create(host.conn, tenant, instance, workflow, version, params, now)
    row = j.get_instance(host.conn, tenant, instance)
    assert row is not None
    return row, True


def create(host: Host, req: Create, identity: bytes, now: float) -> object:
    version = _deployed(host, req.tenant, req.workflow)
    params = _params(req.params, "params")
    instance = req.id or secrets.token_hex(8)
    if j.get_instance(host.conn, req.tenant, instance) is None:
        _room(host, req.tenant, 1)  # a retried create of an existing instance needs no room
    row, created = _create_one(host, req.tenant, req.workflow, version, instance, params, now)
    return dict(status_view(row), created=created)


def create_batch(host: Host, req: CreateBatch, identity: bytes, now: float) -> object:
    if len(req.items) > MAX_BATCH_ITEMS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"at most {MAX_BATCH_ITEMS} items per batch")
    version = _deployed(host, req.tenant, req.workflow)
    # Only new distinct ids need room: a retried batch, or an id twice in one, adds nothing.
    new = {i.id for i in req.items if j.get_instance(host.conn, req.tenant, i.id) is None}
    _room(host, req.tenant, len(new))
    out = []
    for item in req.items:
        params = _params(item.params, "params")
        row, created = _create_one(host, req.tenant, req.workflow, version, item.id, params, now)
        out.append({"id": row["id"], "created": created, "status": row["status"]})
    return out


def status(host: Host, req: GetStatus, identity: bytes, now: float) -> object:
    return status_view(_instance(host, req.tenant, req.id))


LIST_INLINE_BYTES = 64 * 1024  # an output up to this size is shown in a listing
LIST_REPLY_BYTES = 4 * 1024 * 1024  # of outputs and errors in one listing; `status` has the rest


def list_(host: Host, req: ListInstances, identity: bytes, now: float) -> object:
    """The tenant's instances. Outputs and errors are shown while they are small and the reply
    stays under LIST_REPLY_BYTES; past that, errors lose their tracebacks and outputs are left
    out with `output_omitted_bytes` (`status` shows them whole), so one listing cannot make the
    supervisor read and send gigabytes."""
    _tenant(host, req.tenant)
    budget = LIST_REPLY_BYTES
    views = []
    for row in j.list_instances(host.conn, req.tenant, req.status, req.limit, LIST_INLINE_BYTES):
        size = len(row["output"] or b"") + len(row["error"] or "")
        full = size <= budget
        budget -= size if full else 0
        view = status_view(row, full=full)
        if row["output_bytes"] and (not full or row["output"] is None):
            view["output_omitted_bytes"] = row["output_bytes"]
        views.append(view)
    return views


def history(host: Host, req: GetHistory, identity: bytes, now: float) -> object:
    inst = _instance(host, req.tenant, req.id)
    # Every result and error was accepted at its own limit, but thousands of them need not fit
    # one reply: past HISTORY_BUDGET_BYTES, results and kept attempt errors are left out, and
    # said to be (the instance's own status, output and error are always there).
    budget = HISTORY_BUDGET_BYTES
    failed: dict[int, list[dict[str, Any]]] = {}
    omitted: dict[int, int] = {}
    for a in j.attempt_errors(host.conn, req.tenant, req.id):
        budget -= len(a["error"])
        if budget < 0:
            omitted[a["seq"]] = omitted.get(a["seq"], 0) + 1
            continue
        failed.setdefault(a["seq"], []).append(
            {
                "attempt": a["attempt"],
                "error": _error_view(a["error"]),
                "failed_at": engine.iso(a["failed_at"]),
            }
        )
    entries = []
    for r in j.journal_rows(host.conn, req.tenant, req.id):
        entry = {
            "seq": r["seq"],
            "kind": r["kind"],
            "name": r["name"],
            "status": r["status"],
            "attempts": r["attempts"],
            "result": None,
            "error": _error_view(r["error"]),
            "event_type": r["event_type"],
            "child": r["child"],
            "until": engine.iso(r["until"]),
            "started_at": engine.iso(r["started_at"]),
            "finished_at": engine.iso(r["finished_at"]),
            "duration_ms": r["duration_ms"],
            "failed_attempts": failed.get(r["seq"], []),  # the newest 20, oldest first
        }
        if r["result"] is not None:
            budget -= len(r["result"])
            if budget >= 0:
                entry["result"] = _result(r["result"])
            else:
                entry["result_omitted_bytes"] = len(r["result"])
        if r["seq"] in omitted:
            entry["failed_attempts_omitted"] = omitted[r["seq"]]
        entries.append(entry)
    activations = [
        {
            "id": a["id"],
            "node": a["node"],
            "pid": a["pid"],
            "seq": a["seq"],
            "step": a["step"],
            "outcome": a["outcome"],
            "detail": a["detail"],
            "launched_at": engine.iso(a["launched_at"]),
            # prepared ahead: when its step was given to it (None: launched for its step)
            "bound_at": engine.iso(a["bound_at"]),
            "cold_start_ms": a["cold_start_ms"],
            "exec_ms": a["exec_ms"],
            "total_ms": a["total_ms"],
            "cpu_ms": a["cpu_ms"],
            "max_rss_kib": a["max_rss_kib"],
            "phases": json.loads(a["phases"]) if a["phases"] else None,
        }
        for a in j.instance_activations(host.conn, req.tenant, req.id)
    ]
    return {"instance": status_view(inst), "entries": entries, "activations": activations}


def send_event(host: Host, req: SendEvent, identity: bytes, now: float) -> object:
    inst = _instance(host, req.tenant, req.id)
    if inst["status"] in TERMINAL_STATUSES:
        raise ProtocolError(
            ErrorCode.INVALID_STATE, f"instance {req.id!r} is {inst['status']}; it takes no events"
        )
    payload = _params(req.payload, "event payload")
    event_id = j.add_event(host.conn, req.tenant, req.id, req.type, payload, now)
    delivered = engine.deliver_event(host.conn, inst, req.type, now)
    return {"event": event_id, "delivered": delivered}


def control(host: Host, req: Control, identity: bytes, now: float) -> object:
    if req.from_step is not None and req.op != "restart":
        raise ProtocolError(ErrorCode.BAD_REQUEST, "from_step goes with restart only")
    inst = _instance(host, req.tenant, req.id)
    tenant, iid = req.tenant, req.id

    def stop(instance: str) -> None:
        host.kill_instance_activation(tenant, instance, "killed_by_operator")

    if req.op == "pause":
        engine.pause(host.conn, inst, now)
    elif req.op == "resume":
        engine.resume(host.conn, inst, now)
    elif req.op == "terminate":
        engine.terminate(host.conn, inst, now, stop)
    elif req.op == "restart":
        engine.restart(host.conn, inst, now, stop, req.from_step)
    elif req.op == "delete":
        engine.delete(host.conn, inst, now, stop)
        return {"tenant": tenant, "id": iid, "deleted": True}
    row = j.get_instance(host.conn, tenant, iid)
    assert row is not None
    return status_view(row)


def ping(host: Host, req: Ping, identity: bytes, now: float) -> object:
    return {"pong": True}


def stats(host: Host, req: GetStats, identity: bytes, now: float) -> object:
    if req.tenant is not None:
        _tenant(host, req.tenant)
    return host.stats_view(req.tenant)


def usage(host: Host, req: GetUsage, identity: bytes, now: float) -> object:
    if req.tenant is not None:
        _tenant(host, req.tenant)
    rows = j.usage(host.conn, req.tenant, req.since, hourly=req.hourly)
    return [
        {
            "tenant": r["tenant"],
            "from": engine.iso(r["hour"]),
            "to": engine.iso(r["last_hour"] + 3600),
            **{f: round(r[f], 3) if isinstance(r[f], float) else r[f] for f in USAGE_FIELDS},
        }
        for r in rows
    ]


def info(host: Host, req: GetInfo, identity: bytes, now: float) -> object:
    return host.info()


def nodes(host: Host, req: ListNodes, identity: bytes, now: float) -> object:
    return [
        {
            "node": r["id"],
            "host": r["host"],
            "pid": r["pid"],
            "state": _node_state(r, now, host.cfg.server.lease_s),
            "heartbeat_age_s": round(max(0.0, now - r["heartbeat_at"]), 3),
            "started_at": engine.iso(r["started_at"]),
            "running": int(r["running"]),
            "leases": int(r["leases"]),
            "self": r["id"] == host.node.id,
        }
        for r in j.nodes(host.conn)
    ]


def _node_state(r: Row, now: float, lease_s: float) -> str:
    if r["stopped_at"] is not None:
        return "stopped"
    if r["fenced_at"] is not None:
        return "fenced"
    return "lapsed" if now - r["heartbeat_at"] > lease_s else "up"


def gc(host: Host, req: CollectGarbage, identity: bytes, now: float) -> object:
    return host.collect_garbage()


def key_new(host: Host, req: CreateKey, identity: bytes, now: float) -> object:
    if (
        req.tenant is not None
        and host.cfg.server.require_declared_tenants
        and req.tenant not in host.cfg.tenants
    ):
        raise ProtocolError(ErrorCode.UNKNOWN_TENANT, f"tenant {req.tenant!r} is not declared")
    public, secret = (k.decode() for k in zmq.curve_keypair())
    while public.startswith("-"):  # Z85 may start with "-": a command line would see an option
        public, secret = (k.decode() for k in zmq.curve_keypair())
    j.add_key(host.conn, public, req.tenant, now)
    host.keys_changed()
    return {
        "tenant": req.tenant,
        "public": public,
        "secret": secret,  # only here, only now: the supervisor keeps the public half
        "server_key": host.server_key(),
    }


def key_list(host: Host, req: ListKeys, identity: bytes, now: float) -> object:
    return [
        {
            "public": r["public"],
            "tenant": r["tenant"],
            "admin": r["tenant"] is None,
            "created_at": engine.iso(r["created_at"]),
            "revoked_at": engine.iso(r["revoked_at"]),
        }
        for r in j.api_keys(host.conn)
    ]


def key_revoke(host: Host, req: RevokeKey, identity: bytes, now: float) -> object:
    if not j.revoke_key(host.conn, req.public, now):
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no live key {req.public!r}")
    host.keys_changed()
    return {"public": req.public, "revoked": True}


def reload(host: Host, req: Reload, identity: bytes, now: float) -> object:
    return host.reload_config()


Handler = Callable[[Host, Any, bytes, float], object]
# Requests that may make an instance due: other nodes are told (LISTEN/NOTIFY) at commit.
WAKES_WORK = frozenset({Create, CreateBatch, SendEvent, Control})

HANDLERS: dict[type, Handler] = {
    Deploy: deploy,
    Upgrade: upgrade,
    CheckReplay: replay,
    GetJournal: journal,
    ListWorkflows: workflows,
    Create: create,
    CreateBatch: create_batch,
    GetStatus: status,
    ListInstances: list_,
    GetHistory: history,
    SendEvent: send_event,
    Control: control,
    Ping: ping,
    GetStats: stats,
    GetUsage: usage,
    GetInfo: info,
    CollectGarbage: gc,
    CreateKey: key_new,
    ListKeys: key_list,
    RevokeKey: key_revoke,
    Reload: reload,
    ListNodes: nodes,
}
