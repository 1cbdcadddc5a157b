"""The optional remote API: a tcp:// ROUTER socket secured with ZeroMQ CURVE.

Every remote client has a key pair of its own (`stepvisor keys new TENANT`); the supervisor keeps
the public halves in its database, each bound to one tenant or marked admin. A connection is
authenticated once, at its CURVE handshake, by the ZAP handler below; then every request is
authorized against the key it came with, so a revoked key stops working on open connections too.

ZAP (ZeroMQ RFC 27) is spoken here directly rather than through pyzmq's Authenticator: that one
is a coroutine or a thread, while this is a few frames the loop answers in passing, and it sees
the peer's address for the log.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.auth
from zmq.utils import monitor as zmq_monitor
from zmq.utils import z85

from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    CollectGarbage,
    CreateKey,
    GetInfo,
    GetStats,
    GetUsage,
    ListKeys,
    ListNodes,
    Ping,
    Reload,
    RevokeKey,
)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks; fixed by RFC 27
REFUSALS_LOGGED = 20  # refused connections logged a minute; more are counted
DOMAIN = b"stepvisor-api"
ADMIN = ""  # the principal of an admin key; a tenant key's principal is its tenant
ADMIN_ONLY = (CollectGarbage, CreateKey, GetInfo, ListKeys, ListNodes, Reload, RevokeKey)
OWN_TENANT_BY_DEFAULT = (GetStats, GetUsage)  # a tenant key asking for "all" gets its own
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def server_keypair(state_dir: Path) -> tuple[bytes, bytes]:
    """The supervisor's CURVE key pair (Z85), made on first use under state_dir/curve."""
    folder = state_dir / "curve"
    folder.mkdir(mode=0o700, exist_ok=True)
    secret_file = folder / "server.key_secret"
    if not secret_file.exists():
        zmq.auth.create_certificates(folder, "server")
        secret_file.chmod(0o600)
    public, secret = zmq.auth.load_certificate(secret_file)
    assert secret is not None
    return public, secret


def authorize(principal: str, req: Any) -> Any:
    """The request as it may run for `principal`, or FORBIDDEN. Admin keys (and the local ipc
    socket, whose file permissions guard it) may do anything; a tenant key only what names its
    own tenant, and `stats`/`usage` without a tenant mean its own."""
    if principal == ADMIN or isinstance(req, Ping):
        return req
    if isinstance(req, ADMIN_ONLY):
        raise ProtocolError(ErrorCode.FORBIDDEN, f"{type(req).__name__} needs an admin key")
    tenant = getattr(req, "tenant", None)
    if tenant is None and isinstance(req, OWN_TENANT_BY_DEFAULT):
        return msgspec.structs.replace(req, tenant=principal)
    if tenant != principal:
        raise ProtocolError(
            ErrorCode.FORBIDDEN,
            f"this key acts for tenant {principal!r} only, not {tenant!r}",
        )
    return req


class RemoteApi:
    """The tcp:// socket, its ZAP handler and its handshake monitor, polled by the loop."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, state_dir: Path, log: Any) -> None:
        self.log = log
        self.keys: dict[str, str] = {}  # public key (Z85) → principal; see `load_keys`
        self.public, secret = server_keypair(state_dir)
        self.zap = ctx.socket(zmq.REP)
        self.zap.bind(ZAP_ENDPOINT)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 32 << 20)
        self.sock.curve_server = True
        self.sock.curve_secretkey = secret
        self.sock.curve_publickey = self.public
        self.sock.zap_domain = DOMAIN
        self.monitor = self.sock.get_monitor_socket(_HANDSHAKE_FAILED)
        self.sock.bind(endpoint)
        self.endpoint: str = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)  # port * resolved
        # Refusals are logged, but anyone who reaches the port can cause them: at most
        # REFUSALS_LOGGED a minute, the rest counted in one line.
        self.refusals_window = 0.0
        self.refusals_logged = 0
        self.refusals_dropped = 0

    def _refused(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self.refusals_window >= 60.0:
            if self.refusals_dropped:
                self.log.warning("api.refusals_not_logged", count=self.refusals_dropped)
            self.refusals_window, self.refusals_logged, self.refusals_dropped = now, 0, 0
        if self.refusals_logged < REFUSALS_LOGGED:
            self.refusals_logged += 1
            self.log.warning(event, **fields)
        else:
            self.refusals_dropped += 1

    def load_keys(self, rows: list[Any]) -> None:
        self.keys = {
            r["public"]: ADMIN if r["tenant"] is None else r["tenant"]
            for r in rows
            if r["revoked_at"] is None
        }

    def principal(self, public: str | None) -> str | None:
        """Whom a request's key acts for; None when the key is unknown or revoked."""
        return None if public is None else self.keys.get(public)

    def on_zap(self) -> None:
        """Answer every pending ZAP request: only CURVE, only known keys."""
        while True:
            try:
                msg = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.zap.send_multipart(self._zap_reply(msg))

    def _zap_reply(self, msg: list[bytes]) -> list[bytes]:
        if len(msg) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism, *creds = msg
        peer = address.decode("ascii", "replace")
        if version != b"1.0":
            return [b"1.0", request_id, b"500", b"unknown ZAP version", b"", b""]
        if mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != 32:
            self._refused("api.auth_denied", address=peer, reason="not CURVE")
            return [version, request_id, b"400", b"CURVE only", b"", b""]
        public = z85.encode(creds[0]).decode()
        principal = self.principal(public)
        if principal is None:
            self._refused("api.auth_denied", address=peer, key=public, reason="unknown key")
            return [version, request_id, b"400", b"unknown or revoked key", b"", b""]
        self.log.info("api.auth_accepted", address=peer, key=public, tenant=principal or None)
        return [version, request_id, b"200", b"OK", public.encode(), b""]

    def on_monitor(self) -> None:
        """Log handshakes that failed before ZAP was asked (wrong server key, no CURVE)."""
        while True:
            try:
                event = zmq_monitor.recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._refused(
                "api.handshake_failed",
                endpoint=str(event.get("endpoint", b""), "ascii", "replace"),
                reason=_EVENT_NAMES.get(int(event["event"]), str(event["event"])),
                errno=event.get("value"),
            )

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        for sock in (self.monitor, self.sock, self.zap):
            sock.close(linger=0)


_EVENT_NAMES: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error (no CURVE, or a wrong server key)",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused by authentication",
}
