"""`Client`: the platform's handle on a stepvisor supervisor over ZeroMQ."""

from __future__ import annotations

import builtins
import itertools
import json
import os
import socket
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import cloudpickle
import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol.codec import decode_reply, dump_json, encode
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    TERMINAL_STATUSES,
    BatchItem,
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
    JournalEntry,
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
from stepvisor.sdk import WORKFLOW_ATTR


class StepVisorError(Exception):
    """An error reply from the supervisor (or a client-side timeout), with its code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _json(value: Any, what: str) -> bytes:
    try:
        return dump_json(value, what=what)
    except ProtocolError as exc:
        raise StepVisorError(exc.code.value, exc.message) from None


def default_endpoint() -> str:
    if env := os.environ.get("STEPVISOR_SOCKET"):
        return env if "://" in env else f"ipc://{env}"
    from supervisor.config import default_api_endpoint

    return default_api_endpoint()


def load_credentials(source: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """A remote API key file (`stepvisor keys new TENANT --out FILE`), or its contents."""
    if isinstance(source, dict):
        creds = source
    else:
        try:
            creds = json.loads(Path(source).read_text())
        except (OSError, ValueError) as exc:
            raise StepVisorError(
                ErrorCode.AUTH.value, f"cannot read credentials {source}: {exc}"
            ) from None
    missing = [k for k in ("server_key", "public", "secret") if not creds.get(k)]
    if missing:
        raise StepVisorError(
            ErrorCode.AUTH.value, f"credentials lack {', '.join(missing)} (see stepvisor keys new)"
        )
    return creds


_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
)


class Client:
    """Talks to the supervisor's API socket. Not thread-safe: use one per thread.

    `credentials` (a key file or its contents; default $STEPVISOR_CREDENTIALS) are for the remote
    tcp:// API, which speaks CURVE: the connection is encrypted and the key decides which tenant
    the client may act for. The key file's `endpoint` is used when no endpoint is given."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout_s: float = 60.0,
        credentials: str | os.PathLike[str] | dict[str, Any] | None = None,
    ) -> None:
        source = credentials or os.environ.get("STEPVISOR_CREDENTIALS")
        self.credentials = load_credentials(source) if source else None
        from_key = (self.credentials or {}).get("endpoint")
        self.endpoint = endpoint or from_key or default_endpoint()
        self.timeout_s = timeout_s
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._shaken = False  # a handshake succeeded on this socket
        self._rids = itertools.count(1)

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            if self.endpoint.startswith("ipc://"):
                _check_listening(self.endpoint)
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.credentials is not None:
                sock.curve_serverkey = self.credentials["server_key"].encode()
                sock.curve_publickey = self.credentials["public"].encode()
                sock.curve_secretkey = self.credentials["secret"].encode()
            if self.endpoint.startswith("tcp://"):
                # A refused handshake is silent otherwise: the call would just time out.
                self._monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
                self._shaken = False
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            if self._monitor is not None:
                self._sock.disable_monitor()
                self._monitor.close(linger=0)
                self._monitor = None
            self._sock.close(linger=0)
            self._sock = None

    def _check_handshake(self) -> None:
        """Raise AUTH when the remote API refused (or dropped) us during the handshake."""
        assert self._monitor is not None
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._shaken = True
            elif event != zmq.EVENT_DISCONNECTED or not self._shaken:
                self.close()
                if self.credentials is None:
                    why = "it needs a CURVE key (credentials=..., $STEPVISOR_CREDENTIALS)"
                else:
                    why = "this key is unknown or revoked there, or the server key is wrong"
                raise StepVisorError(
                    ErrorCode.AUTH.value,
                    f"the supervisor at {self.endpoint} refused the connection: {why}",
                )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, make: Callable[[int], object], timeout_s: float | None = None) -> Any:
        """Send one request built by `make(rid)` and return its result, or raise StepVisorError."""
        rid = next(self._rids)
        sock = self._socket()
        sock.send(encode(make(rid)))
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            ready = dict(poller.poll(int(left * 1000) + 1)) if left > 0 else {}
            if self._monitor is not None and self._monitor in ready:
                self._check_handshake()
                if sock not in ready:
                    continue
            if sock not in ready:
                self.close()  # a late reply must not be read as the answer to the next call
                raise StepVisorError(
                    ErrorCode.TIMEOUT.value, f"no reply from the supervisor at {self.endpoint}"
                )
            reply = decode_reply(sock.recv())
            if reply.rid != rid:
                continue  # a stale reply to an earlier, abandoned call
            if not reply.ok:
                err = reply.error
                raise StepVisorError(
                    err.code or err.type if err else "INTERNAL",
                    err.message if err else "unknown error",
                )
            return reply.result

    # -- code

    def deploy(
        self,
        tenant: str,
        code: str | os.PathLike[str] | Callable[..., Any],
        *,
        filename: str | None = None,
        check: bool = False,
    ) -> dict[str, Any]:
        """Deploy a workflow file (path or source text) or one `@workflow` function by value.

        `check`: deploy nothing; replay the tenant's in-flight (and recently finished) instances
        of the workflows the code defines against it, in a sandbox, and report for each whether
        its journal holds up (`verdict`: compatible, nondeterministic, fails)."""
        if callable(code):
            name = getattr(code, WORKFLOW_ATTR, None)
            if name is None:
                raise TypeError("deploy() needs a function decorated with @workflow")
            module = getattr(code, "__module__", None)
            if module and module != "__main__":
                mod = __import__(module, fromlist=["_"])
                if isinstance(mod, types.ModuleType):
                    cloudpickle.register_pickle_by_value(mod)
            try:
                blob = cloudpickle.dumps(code)
            finally:
                if module and module != "__main__":
                    cloudpickle.unregister_pickle_by_value(mod)
            fname = filename or f"{name}.pickle"
            return self.call(
                lambda rid: Deploy(
                    rid=rid, tenant=tenant, filename=fname, pickled=blob, check=check
                )
            )
        if isinstance(code, Path) or (
            isinstance(code, str) and "\n" not in code and code.endswith(".py")
        ):
            path = Path(code)
            source = path.read_bytes()
            fname = filename or path.name
        else:
            source = str(code).encode()
            fname = filename or "workflows.py"
        return self.call(
            lambda rid: Deploy(rid=rid, tenant=tenant, filename=fname, source=source, check=check)
        )

    def workflows(self, tenant: str) -> dict[str, Any]:
        """The deployed version of each workflow, and every code version with its workflows,
        deploy time and the instances pinned to it (live and all)."""
        return self.call(lambda rid: ListWorkflows(rid=rid, tenant=tenant))

    def upgrade(
        self,
        tenant: str,
        workflow: str,
        ids: builtins.list[str] | None = None,
        *,
        version: str | None = None,
    ) -> dict[str, Any]:
        """Move in-flight instances of `workflow` (`ids`, or all of them not on the version
        yet, up to 100 a call: `more` says to call again) to `version` (default: the deployed
        one), each only where its journal replays against that code. Each checked instance
        says `upgrade`: upgraded, refused (the check failed), busy (it moved on meanwhile:
        call again), changed or ended."""
        return self.call(
            lambda rid: Upgrade(rid=rid, tenant=tenant, workflow=workflow, ids=ids, version=version)
        )

    def replay(self, tenant: str, id: str, *, version: str | None = None) -> dict[str, Any]:
        """Replay one instance's journal in a sandbox against its code (or `version`): how
        many entries held up, and the verdict."""
        return self.call(lambda rid: CheckReplay(rid=rid, tenant=tenant, id=id, version=version))

    def journal(self, tenant: str, id: str) -> dict[str, Any]:
        """What replaying the instance needs: workflow, version, params (JSON bytes), creation
        time, and its journal as `JournalEntry`s."""
        out = self.call(lambda rid: GetJournal(rid=rid, tenant=tenant, id=id))
        out["journal"] = msgspec.convert(out["journal"], builtins.list[JournalEntry])
        return out

    # -- instances

    def create(
        self, tenant: str, workflow: str, params: Any = None, *, id: str | None = None
    ) -> dict[str, Any]:
        data = _json(params, "params")
        return self.call(
            lambda rid: Create(rid=rid, tenant=tenant, workflow=workflow, id=id, params=data)
        )

    def create_batch(
        self, tenant: str, workflow: str, items: Iterable[tuple[str, Any]]
    ) -> list[dict[str, Any]]:
        batch = [BatchItem(id=i, params=_json(p, "params")) for i, p in items]
        return self.call(
            lambda rid: CreateBatch(rid=rid, tenant=tenant, workflow=workflow, items=batch)
        )

    def status(self, tenant: str, id: str) -> dict[str, Any]:
        return self.call(lambda rid: GetStatus(rid=rid, tenant=tenant, id=id))

    def list(self, tenant: str, status: str | None = None, limit: int = 1000) -> list[Any]:
        return self.call(
            lambda rid: ListInstances(
                rid=rid,
                tenant=tenant,
                status=status,  # type: ignore[arg-type]
                limit=limit,
            )
        )

    def history(self, tenant: str, id: str) -> dict[str, Any]:
        return self.call(lambda rid: GetHistory(rid=rid, tenant=tenant, id=id))

    def send_event(self, tenant: str, id: str, type: str, payload: Any = None) -> dict[str, Any]:
        data = _json(payload, "event payload")
        return self.call(
            lambda rid: SendEvent(rid=rid, tenant=tenant, id=id, type=type, payload=data)
        )

    def control(
        self, tenant: str, id: str, op: str, *, from_step: str | None = None
    ) -> dict[str, Any]:
        return self.call(
            lambda rid: Control(rid=rid, tenant=tenant, id=id, op=op, from_step=from_step)  # type: ignore[arg-type]
        )

    def pause(self, tenant: str, id: str) -> dict[str, Any]:
        return self.control(tenant, id, "pause")

    def resume(self, tenant: str, id: str) -> dict[str, Any]:
        return self.control(tenant, id, "resume")

    def terminate(self, tenant: str, id: str) -> dict[str, Any]:
        return self.control(tenant, id, "terminate")

    def restart(self, tenant: str, id: str, *, from_step: str | None = None) -> dict[str, Any]:
        """Run it again from the start, or from the first step (sleep, wait) called
        `from_step`, keeping the journal before it."""
        return self.control(tenant, id, "restart", from_step=from_step)

    def delete(self, tenant: str, id: str) -> dict[str, Any]:
        return self.control(tenant, id, "delete")

    def ping(self, timeout_s: float | None = None) -> bool:
        return bool(self.call(lambda rid: Ping(rid=rid), timeout_s=timeout_s))

    # -- operations

    def stats(self, tenant: str | None = None) -> dict[str, Any]:
        """Live figures: the last minute's activations (rate, cold start and step-exec
        percentiles, failures by outcome), instances by status, fork servers; per tenant."""
        return self.call(lambda rid: GetStats(rid=rid, tenant=tenant))

    def usage(
        self, tenant: str | None = None, since: float | None = None, *, hourly: bool = False
    ) -> builtins.list[dict[str, Any]]:
        """Durable usage per tenant (per tenant and UTC hour with `hourly`) from the hour
        holding `since` (epoch seconds) on: activations, steps, failures, CPU and wall ms,
        peak and summed peak memory (KiB), memory x time (KiB s), and the most scratch disk one
        activation held at its exit (KiB)."""
        return self.call(lambda rid: GetUsage(rid=rid, tenant=tenant, since=since, hourly=hourly))

    def nodes(self) -> builtins.list[dict[str, Any]]:
        """The supervisor nodes sharing the database (one, on the embedded SQLite): state
        (up, lapsed, fenced, stopped), last heartbeat's age, steps running, leases held."""
        return self.call(lambda rid: ListNodes(rid=rid))

    def info(self) -> dict[str, Any]:
        """The supervisor's pid, config file, state dir, log file or journal unit."""
        return self.call(lambda rid: GetInfo(rid=rid))

    def gc(self) -> dict[str, Any]:
        """Run retention now until nothing expired is left: {instances, inspections} deleted
        (`inspections`: records of activations that ran no instance's step: deploy checks and
        prepared activations stopped unused)."""
        total = {"instances": 0, "inspections": 0}
        while True:
            done = self.call(lambda rid: CollectGarbage(rid=rid))
            for key in total:
                total[key] += done[key]
            if not done["more"]:
                return total

    def new_key(self, tenant: str | None) -> dict[str, Any]:
        """A remote API key pair for `tenant` (None: admin): {tenant, public, secret,
        server_key}. The secret is not kept by the supervisor: store it now."""
        return self.call(lambda rid: CreateKey(rid=rid, tenant=tenant))

    def list_keys(self) -> builtins.list[dict[str, Any]]:
        """Every remote API key: public half, tenant (or admin), created, revoked."""
        return self.call(lambda rid: ListKeys(rid=rid))

    def revoke_key(self, public: str) -> dict[str, Any]:
        """Stop accepting a key, on open connections too."""
        return self.call(lambda rid: RevokeKey(rid=rid, public=public))

    def reload(self) -> dict[str, Any]:
        """Make the supervisor re-read its config file: {path, changes: {key: {old, new}}}.
        An invalid file raises CONFIG and the supervisor keeps the config it has."""
        return self.call(lambda rid: Reload(rid=rid))

    def wait(
        self,
        tenant: str,
        id: str,
        *,
        timeout_s: float = 300.0,
        statuses: Iterable[str] = TERMINAL_STATUSES,
        poll_s: float = 0.05,
    ) -> dict[str, Any]:
        """Poll until the instance reaches one of `statuses`; raise TIMEOUT after `timeout_s`."""
        wanted = set(statuses)
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.status(tenant, id)
            if st["status"] in wanted:
                return st
            if time.monotonic() > deadline:
                raise StepVisorError(
                    ErrorCode.TIMEOUT.value,
                    f"instance {id!r} still {st['status']} after {timeout_s} s: "
                    f"{json.dumps(st)[:500]}",
                )
            time.sleep(poll_s)


def _check_listening(endpoint: str) -> None:
    """Fail now, not after the call's timeout, when nobody listens at an ipc:// endpoint: no
    socket file, or one a killed supervisor left behind (ZeroMQ would queue the request and
    wait). One connect(2) on the socket file tells."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(endpoint.removeprefix("ipc://"))
    except FileNotFoundError:
        why = "no socket there: is `stepvisor serve` running? (--socket or STEPVISOR_SOCKET)"
        raise StepVisorError(ErrorCode.UNAVAILABLE.value, f"{endpoint}: {why}") from None
    except ConnectionRefusedError:
        why = "nothing listens on the socket (a supervisor that was killed left it)"
        raise StepVisorError(ErrorCode.UNAVAILABLE.value, f"{endpoint}: {why}") from None
    except OSError as exc:
        raise StepVisorError(ErrorCode.UNAVAILABLE.value, f"{endpoint}: {exc.strerror}") from None
    finally:
        probe.close()
