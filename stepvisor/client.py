"""`Client`: the platform's handle on a stepvisor supervisor over ZeroMQ."""

from __future__ import annotations

import builtins
import itertools
import json
import os
import time
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import cloudpickle
import zmq

from protocol.codec import decode_reply, dump_json, encode
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    TERMINAL_STATUSES,
    BatchItem,
    CollectGarbage,
    Control,
    Create,
    CreateBatch,
    Deploy,
    GetHistory,
    GetInfo,
    GetStats,
    GetStatus,
    GetUsage,
    ListInstances,
    Ping,
    Reload,
    SendEvent,
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


class Client:
    """Talks to the supervisor's API socket. Not thread-safe: use one per thread."""

    def __init__(self, endpoint: str | None = None, *, timeout_s: float = 60.0) -> None:
        self.endpoint = endpoint or default_endpoint()
        self.timeout_s = timeout_s
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._rids = itertools.count(1)

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.endpoint)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

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
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
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
    ) -> dict[str, Any]:
        """Deploy a workflow file (path or source text) or one `@workflow` function by value."""
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
                lambda rid: Deploy(rid=rid, tenant=tenant, filename=fname, pickled=blob)
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
        return self.call(lambda rid: Deploy(rid=rid, tenant=tenant, filename=fname, source=source))

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

    def control(self, tenant: str, id: str, op: str) -> dict[str, Any]:
        return self.call(lambda rid: Control(rid=rid, tenant=tenant, id=id, op=op))  # type: ignore[arg-type]

    def pause(self, tenant: str, id: str) -> dict[str, Any]:
        return self.control(tenant, id, "pause")

    def resume(self, tenant: str, id: str) -> dict[str, Any]:
        return self.control(tenant, id, "resume")

    def terminate(self, tenant: str, id: str) -> dict[str, Any]:
        return self.control(tenant, id, "terminate")

    def restart(self, tenant: str, id: str) -> dict[str, Any]:
        return self.control(tenant, id, "restart")

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
        peak and summed peak memory (KiB), and memory x time (KiB s)."""
        return self.call(
            lambda rid: GetUsage(rid=rid, tenant=tenant, since=since, hourly=hourly)
        )

    def info(self) -> dict[str, Any]:
        """The supervisor's pid, config file, state dir, log file or journal unit."""
        return self.call(lambda rid: GetInfo(rid=rid))

    def gc(self) -> dict[str, Any]:
        """Run retention now until nothing expired is left: {instances, inspections} deleted."""
        total = {"instances": 0, "inspections": 0}
        while True:
            done = self.call(lambda rid: CollectGarbage(rid=rid))
            for key in total:
                total[key] += done[key]
            if not done["more"]:
                return total

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
