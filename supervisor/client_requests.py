"""Client requests from the local ipc:// socket and, when configured, the remote tcp:// one.

A request's peer is its ROUTER identity tagged with the socket it came on (b"L" local, b"R"
remote), so a reply, even a deferred one, goes back the way its request came. The local socket
is guarded by its file permissions and acts as admin; a remote request acts for the key it was
sent with (see `remote_api.authorize`).

The supervisor owns one `Clients`: it reads the sockets, hands each request to its handler in
`api` (the supervisor is the handlers' `api.Host`) and queues every reply in the outbox.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import zmq

from protocol.codec import decode_request, encode, request_id
from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import MAX_REPLY_BYTES
from protocol.messages import ErrorInfo, Reply
from supervisor import api
from supervisor import journal as j
from supervisor.activation_messages import MAX_BAD_FRAMES, MAX_MESSAGES_PER_TICK
from supervisor.cluster import Node
from supervisor.journal.db import Db
from supervisor.outbox import Outbox
from supervisor.remote_api import ADMIN, RemoteApi, authorize

LOCAL, REMOTE = b"L", b"R"


class Clients:
    def __init__(
        self,
        host: api.Host,
        conn: Db,
        outbox: Outbox,
        local: zmq.Socket[bytes],
        remote: RemoteApi | None,
        node: Node,
        log: Any,
        known: Callable[[str], bool],
        add_tenant: Callable[[str], None],
    ) -> None:
        """`known(tenant)`: whether the supervisor has the tenant in its list already;
        `add_tenant`: tell it of a tenant a request made (the first deploy, say)."""
        self.host = host
        self.conn = conn
        self.outbox = outbox
        self.local = local
        self.remote = remote
        self.node = node
        self.log = log
        self.known = known
        self.add_tenant = add_tenant
        self.bad_peers: dict[bytes, int] = {}

    def drain(self, sock: zmq.Socket[bytes], tag: bytes, now: float) -> None:
        """Handle the requests waiting on `sock` (LOCAL or REMOTE, as `tag` says)."""
        for _ in range(MAX_MESSAGES_PER_TICK):
            if not int(sock.get(zmq.EVENTS)) & zmq.POLLIN:
                return  # asked, not tried: a failed receive raises, and that costs more
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            peer = tag + frames[0].bytes
            if self.bad_peers.get(peer, 0) >= MAX_BAD_FRAMES:
                continue
            if len(frames) != 2:
                error = ProtocolError(ErrorCode.MALFORMED, "expected one frame per request")
                self._bad_client(peer, 0, error)
                continue
            body = frames[1].bytes
            try:
                req = decode_request(body)
            except ProtocolError as exc:
                self._bad_client(peer, request_id(body), exc)
                continue
            principal = ADMIN if tag == LOCAL else self._principal(frames[1])
            if principal is None:
                why = "this key was revoked; ask for a new one (stepvisor keys new)"
                self.reply(peer, req.rid, error=ProtocolError(ErrorCode.FORBIDDEN, why))
                continue
            try:
                req = authorize(principal, req)
            except ProtocolError as exc:
                self.log.warning(
                    "api.forbidden", tenant=principal or None, request=type(req).__name__
                )
                self.reply(peer, req.rid, error=exc)
                continue
            self._dispatch(peer, req, now)

    def reply(
        self, peer: bytes, rid: int, result: object = None, error: ProtocolError | None = None
    ) -> None:
        """Answer a client request, now or later (a deploy's, once its inspection reports);
        `peer` is its tagged identity."""
        info = (
            None
            if error is None
            else ErrorInfo(
                type=error.code.value, code=error.code.value, message=error.message[:60_000]
            )
        )
        frame = encode(Reply(rid=rid, ok=error is None, result=result, error=info))
        if len(frame) > MAX_REPLY_BYTES:  # the client could not decode it: say so instead
            why = f"the reply is {len(frame)} bytes; a client reads at most {MAX_REPLY_BYTES}"
            self.log.warning("api.reply_too_large", bytes=len(frame))
            frame = encode(
                Reply(
                    rid=rid,
                    ok=False,
                    error=ErrorInfo(type="TOO_LARGE", code="TOO_LARGE", message=why),
                )
            )
        sock = self.remote.sock if peer[:1] == REMOTE and self.remote is not None else self.local
        self.outbox.acknowledge(
            functools.partial(sock.send_multipart, [peer[1:], frame], zmq.NOBLOCK)
        )

    def _principal(self, frame: zmq.Frame) -> str | None:
        assert self.remote is not None
        try:
            public = frame.get("User-Id")  # what our ZAP handler put there: the client's key
        except zmq.ZMQError:
            return None
        return self.remote.principal(str(public))

    def _bad_client(self, peer: bytes, rid: int, exc: ProtocolError) -> None:
        if len(self.bad_peers) > 10_000:
            self.bad_peers.clear()
        self.bad_peers[peer] = self.bad_peers.get(peer, 0) + 1
        self.log.warning("api.bad_request", code=exc.code.value, error=exc.message[:500])
        self.reply(peer, rid, error=exc)

    def _dispatch(self, peer: bytes, req: Any, now: float) -> None:
        handler = api.HANDLERS[type(req)]
        # A savepoint per request: a request that fails changes nothing, the others still commit.
        self.conn.execute("SAVEPOINT request")
        try:
            result = handler(self.host, req, peer, now)
        except ProtocolError as exc:
            self.conn.execute("ROLLBACK TO request")
            self.reply(peer, req.rid, error=exc)
        except j.CONTENDED as exc:
            # Another node's transaction held what this request needed (a deadlock, or a lock
            # held past lock_timeout): nothing of it is kept, and the client may retry.
            self.conn.execute("ROLLBACK TO request")
            self.log.warning("api.contended", request=type(req).__name__, error=str(exc)[:300])
            why = "another node holds what this request needs; retry it"
            self.reply(peer, req.rid, error=ProtocolError(ErrorCode.UNAVAILABLE, why))
        except Exception as exc:
            self.conn.execute("ROLLBACK TO request")
            self.log.exception("api.internal_error", request=type(req).__name__)
            self.reply(
                peer,
                req.rid,
                error=ProtocolError(ErrorCode.INTERNAL, f"internal error: {exc!r}"),
            )
        else:
            tenant = getattr(req, "tenant", None)
            if tenant and not self.known(tenant) and j.tenant_exists(self.conn, tenant):
                self.add_tenant(tenant)
            if type(req) in api.WAKES_WORK:
                self.node.wake_others = True
            if result is not api.DEFERRED:
                self.reply(peer, req.rid, result)
        finally:
            self.conn.execute("RELEASE request")
