"""The supervisor's end of its activations' connections: a ZMTP 3.0 ROUTER (ZeroMQ RFC 23) for
DEALER peers with the NULL mechanism, over non-blocking Unix sockets, run by the loop's thread.

Why not libzmq's ROUTER (the client API keeps libzmq): every message of every activation went
through libzmq's I/O thread and back through its mailbox, two hand-offs between threads for each
message on a machine whose cores the activations need, and about an eighth of the supervisor's
CPU. Here a message costs the loop one read or one write. The wire is unchanged: activations
(`sandbox_host.channel`) and any libzmq DEALER speak to it.

What a peer can make it do is bounded, as libzmq's options bounded it (MAXMSGSIZE, RCVHWM):
- a frame or message over `max_message` bytes, anything that is not ZMTP 3 from a DEALER with
  the NULL mechanism, or a routing id already taken closes the connection;
- a peer with `max_queued` messages (or `max_message` bytes) waiting is not read until they
  are taken, and each is read at most `READS_PER_PUMP` times per pump;
- one that has not said READY within `handshake_s` is closed;
- at most `max_connections` are open at once, and `max_per_peer` per peer process (its uid
  when that is a sandbox uid, one per activation, else its pid): a tenant opening connections
  takes no one else's.

`admit` lets the owner refuse a routing id to a peer by its uid as the kernel reports it: the
supervisor lets only an activation's own sandbox uid speak under its token, so a token alone,
leaked, is not enough.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import resource
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol import zmtp

READ_BYTES = 256 * 1024
READS_PER_PUMP = 4  # per peer and pump: one peer's flood waits for the next tick
EVENTS_PER_PUMP = 256
GREETING, READY, OPEN = 0, 1, 2
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class _Peer:
    __slots__ = (
        "closed",
        "closing",
        "fd",
        "identity",
        "inbox",
        "inbox_bytes",
        "inbuf",
        "opened",
        "out",
        "parts",
        "parts_bytes",
        "queued",
        "reading",
        "sock",
        "state",
        "uid",
        "watched",
        "who",
    )

    def __init__(self, sock: socket.socket, uid: int, who: tuple[str, int], opened: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.uid = uid  # as the kernel saw it connect (SO_PEERCRED)
        self.who = who  # ("uid", n) or ("pid", n): what its connections are counted by
        self.opened = opened
        self.state = GREETING
        self.identity = b""
        self.inbuf = bytearray()
        self.parts: list[bytes] = []  # frames of a message still being received
        self.parts_bytes = 0
        self.inbox: deque[list[bytes]] = deque()
        self.inbox_bytes = 0
        self.out: deque[memoryview] = deque()
        self.reading = True
        self.watched = True  # registered with the server's epoll
        self.queued = False  # in the server's `ready` queue
        self.closing = False  # its last message is queued: closed once that is written
        self.closed = False


class SandboxServer:
    """Owned by the loop: `fileno()` goes in its poller; `receive` and `send` never block."""

    def __init__(
        self,
        path: Path,
        *,
        mode: int,
        max_message: int,
        max_queued: int,
        log: Any,
        max_connections: int | None = None,
        max_per_peer: int = 4,
        handshake_s: float = 5.0,
        admit: Callable[[bytes, int], str | None] | None = None,
    ) -> None:
        """`admit(routing id, peer uid)`: why a peer with this uid may not use this routing id
        (the kernel's word for its uid, not the peer's), or None."""
        self.path = path
        self.admit = admit
        self.max_message = max_message
        self.max_queued = max_queued
        # A quarter of what the process may open: the rest is for pipes, the database, logs.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_connections = max_connections or max(64, min(soft, 1 << 20) // 4)
        self.max_per_peer = max_per_peer
        self.handshake_s = handshake_s
        self.log = log
        self.own_uid = os.geteuid()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale socket of a dead supervisor; the state-dir lock is held
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.setblocking(False)
        self.listener.bind(str(path))
        path.chmod(mode)
        self.listener.listen(512)
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.accepting = True
        self.accept_again = 0.0  # after running out of descriptors: when to try again
        self.by_fd: dict[int, _Peer] = {}
        self.by_identity: dict[bytes, _Peer] = {}
        self.per_peer: dict[tuple[str, int], int] = {}
        self.handshaking: dict[_Peer, float] = {}
        self.ready: deque[_Peer] = deque()  # peers with messages waiting, in turn
        self.generated = itertools.count(1)
        self.refused = 0  # connections closed at once: over a cap, or not ZMTP
        self.refused_by: dict[str, int] = {}  # by kind

    def fileno(self) -> int:
        """Readable when a connection or the listening socket has something for `receive`."""
        return self.epoll.fileno()

    @property
    def pending(self) -> bool:
        """Messages already read wait to be taken (the poller cannot see those)."""
        return bool(self.ready)

    # ------------------------------------------------------------------ receiving

    def receive(self) -> tuple[bytes, list[bytes]] | None:
        """The next message read (routing id, frames), taking peers in turn; None when none
        waits. Reading is `pump`'s: a peer with much to say queues behind one turn each."""
        while self.ready:
            peer = self.ready.popleft()
            peer.queued = False
            if not peer.inbox:
                continue
            frames = peer.inbox.popleft()
            peer.inbox_bytes -= sum(len(f) for f in frames)
            if not peer.reading and not peer.closed and self._has_room(peer):
                self._parse(peer)  # what was read but not parsed while it was full
                if not peer.closed and self._has_room(peer):
                    peer.reading = True
                    self._watch(peer)
            if peer.inbox and not peer.queued:
                self.ready.append(peer)
                peer.queued = True
            return peer.identity, frames
        return None

    def pump(self) -> None:
        """Accept, read and write what the sockets are ready for, a bounded amount each: once
        per tick of the loop, before it takes messages."""
        for fd, events in self.epoll.poll(0, EVENTS_PER_PUMP):
            if fd == self.listener.fileno():
                self._accept()
                continue
            peer = self.by_fd.get(fd)
            if peer is None:
                continue
            if events & select.EPOLLOUT:
                self._flush(peer)
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and not peer.closed:
                self._read(peer)

    def _accept(self) -> None:
        now = time.monotonic()
        for _ in range(EVENTS_PER_PUMP):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop listening until a connection closes, rather
                    # than wake for the same pending connection at every poll.
                    self.log.warning("sandbox.accept_failed", error=str(exc))
                    self._stop_accepting()
                return
            pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            who = ("uid", uid) if uid != self.own_uid else ("pid", pid)
            if (
                len(self.by_fd) >= self.max_connections
                or self.per_peer.get(who, 0) >= self.max_per_peer
            ):
                self._refuse(sock, "too many connections", pid=pid, uid=uid)
                continue
            sock.setblocking(False)
            peer = _Peer(sock, uid, who, now)
            self.by_fd[peer.fd] = peer
            self.per_peer[who] = self.per_peer.get(who, 0) + 1
            self.handshaking[peer] = now
            self.epoll.register(peer.fd, select.EPOLLIN)
            # Our whole side of the handshake at once: a fresh socket's buffer takes it. A peer
            # gone already may have left messages to read: reading finds out that it is gone.
            with contextlib.suppress(OSError):
                sock.send(zmtp.greeting() + zmtp.ready(b"ROUTER", b""))
            # A peer writes its side as it connects: read it now, not a loop iteration later.
            self._read(peer)

    def _read(self, peer: _Peer) -> None:
        for _ in range(READS_PER_PUMP):
            if not peer.reading:
                return
            try:
                data = peer.sock.recv(READ_BYTES)
            except BlockingIOError:
                return
            except OSError:
                self._close(peer)
                return
            if not data:
                self._close(peer)
                return
            peer.inbuf += data
            self._parse(peer)
            if peer.closed:
                return
            if not self._has_room(peer) or len(peer.inbuf) > self.max_message + READ_BYTES:
                peer.reading = False  # until `receive` takes what waits
                self._watch(peer)
                return

    def _has_room(self, peer: _Peer) -> bool:
        return len(peer.inbox) < self.max_queued and peer.inbox_bytes < self.max_message

    def _parse(self, peer: _Peer) -> None:
        """Take every whole frame off the peer's input while its inbox has room."""
        buf, pos = peer.inbuf, 0
        try:
            while not peer.closed and self._has_room(peer):
                if peer.state == GREETING:
                    if len(buf) - pos < zmtp.GREETING_BYTES:
                        break
                    zmtp.check_greeting(bytes(buf[pos : pos + zmtp.GREETING_BYTES]))
                    pos += zmtp.GREETING_BYTES
                    peer.state = READY
                    continue
                if len(buf) - pos < 2:
                    break
                flags = buf[pos]
                width = zmtp.size_bytes(flags)
                if len(buf) - pos < 1 + width:
                    break
                size = zmtp.size(flags, bytes(buf[pos + 1 : pos + 1 + width]))
                if size > self.max_message - peer.parts_bytes:
                    raise zmtp.ZmtpError(f"a message of more than {self.max_message} bytes")
                end = pos + 1 + width + size
                if len(buf) < end:
                    break
                body = bytes(buf[pos + 1 + width : end])
                pos = end
                self._frame(peer, flags, body)
        except zmtp.ZmtpError as exc:
            self._refuse_peer(peer, str(exc))
            return
        del buf[:pos]

    def _frame(self, peer: _Peer, flags: int, body: bytes) -> None:
        if peer.state == READY:
            if not flags & zmtp.COMMAND or zmtp.command_name(body) != b"READY":
                raise zmtp.ZmtpError("the peer did not say READY")
            props = {k.lower(): v for k, v in zmtp.properties(body).items()}
            if props.get(b"socket-type") != b"DEALER":
                raise zmtp.ZmtpError(f"a {props.get(b'socket-type', b'?')!r} peer: DEALER only")
            identity = props.get(b"identity", b"")
            if len(identity) > 255:
                raise zmtp.ZmtpError("a routing id of more than 255 bytes")
            if not identity:  # libzmq's way: a generated id, starting with a zero byte
                identity = b"\x00" + next(self.generated).to_bytes(4, "big")
            if identity in self.by_identity:
                raise zmtp.ZmtpError("a routing id already connected")
            if self.admit is not None and (why := self.admit(identity, peer.uid)) is not None:
                self._refuse_peer(peer, why, kind="not admitted")
                return
            peer.identity, peer.state = identity, OPEN
            self.by_identity[identity] = peer
            del self.handshaking[peer]
            return
        if flags & zmtp.COMMAND:
            return  # PING and the like: no heartbeats are asked of activations
        peer.parts.append(body)
        peer.parts_bytes += len(body)
        if flags & zmtp.MORE:
            return
        if not peer.queued:
            self.ready.append(peer)
            peer.queued = True
        peer.inbox.append(peer.parts)
        peer.inbox_bytes += peer.parts_bytes
        peer.parts, peer.parts_bytes = [], 0

    # ------------------------------------------------------------------ sending

    def send(self, identity: bytes, body: bytes, *, last: bool = False) -> bool:
        """Queue one single-frame message for the peer with this routing id; False when none
        is connected (a ROUTER drops what it cannot route). `last`: close the connection once
        it is written (the peer reads it before the end)."""
        peer = self.by_identity.get(identity)
        if peer is None or peer.closed or peer.closing:
            return False
        peer.closing = last
        head = zmtp.frame_head(len(body))
        if peer.out:
            peer.out.extend((memoryview(head), memoryview(body)))
            return True
        try:
            sent = peer.sock.sendmsg([head, body])
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(peer)
            return False
        total = len(head) + len(body)
        if sent < total:
            if sent < len(head):
                peer.out.extend((memoryview(head)[sent:], memoryview(body)))
            else:
                peer.out.append(memoryview(body)[sent - len(head) :])
            self._watch(peer)
        elif last:
            self._close(peer)
        return True

    def _flush(self, peer: _Peer) -> None:
        while peer.out:
            try:
                sent = peer.sock.send(peer.out[0])
            except BlockingIOError:
                return
            except OSError:
                self._close(peer)
                return
            if sent < len(peer.out[0]):
                peer.out[0] = peer.out[0][sent:]
                return
            peer.out.popleft()
        if peer.closing:
            self._close(peer)
        else:
            self._watch(peer)

    # ------------------------------------------------------------------ connections

    def _watch(self, peer: _Peer) -> None:
        """Ask epoll for what the peer's socket is wanted for now. Nothing: out of epoll
        altogether, which would otherwise report a hang-up at every poll, unread."""
        events = (select.EPOLLIN if peer.reading else 0) | (select.EPOLLOUT if peer.out else 0)
        with contextlib.suppress(OSError):
            if not events:
                if peer.watched:
                    self.epoll.unregister(peer.fd)
            elif peer.watched:
                self.epoll.modify(peer.fd, events)
            else:
                self.epoll.register(peer.fd, events)
        peer.watched = bool(events)

    def expire(self, mono: float) -> None:
        """Close connections that have not finished their handshake in `handshake_s`; listen
        again a second after running out of descriptors, if no closed connection did."""
        if not self.accepting and mono >= self.accept_again:
            self._accept_again()
        if not self.handshaking:
            return
        late = [p for p, opened in self.handshaking.items() if mono - opened > self.handshake_s]
        for peer in late:
            self._refuse_peer(peer, "no handshake in time", kind="handshake")

    def _refuse(self, sock: socket.socket, why: str, **fields: Any) -> None:
        self._count_refused("over a cap", why, **fields)
        sock.close()

    def _refuse_peer(self, peer: _Peer, why: str, kind: str = "not ZMTP") -> None:
        self._count_refused(kind, why, token=peer.identity[:64].hex() or None, uid=peer.uid)
        self._close(peer)

    def _count_refused(self, kind: str, why: str, **fields: Any) -> None:
        """Log a refusal once for each kind, then every 1000th: a flood of one kind hides no
        other, and what a peer writes cannot make more kinds."""
        self.refused += 1
        seen = self.refused_by[kind] = self.refused_by.get(kind, 0) + 1
        if seen == 1 or seen % 1000 == 0:
            self.log.warning(
                "sandbox.connection_refused", kind=kind, reason=why, count=seen, **fields
            )

    def _close(self, peer: _Peer) -> None:
        """Close the connection. Messages it sent before are still delivered."""
        if peer.closed:
            return
        peer.closed = True
        peer.reading = False
        peer.out.clear()
        peer.inbuf.clear()
        self.handshaking.pop(peer, None)
        if self.by_identity.get(peer.identity) is peer:
            del self.by_identity[peer.identity]
        del self.by_fd[peer.fd]
        left = self.per_peer.pop(peer.who) - 1
        if left:
            self.per_peer[peer.who] = left
        if peer.watched:
            with contextlib.suppress(OSError):
                self.epoll.unregister(peer.fd)
        peer.sock.close()
        if not self.accepting:
            self._accept_again()

    def _stop_accepting(self) -> None:
        self.accepting = False
        self.accept_again = time.monotonic() + 1.0
        self.epoll.modify(self.listener.fileno(), 0)

    def _accept_again(self) -> None:
        self.accepting = True
        self.epoll.modify(self.listener.fileno(), select.EPOLLIN)

    def close(self) -> None:
        for peer in list(self.by_fd.values()):
            self._close(peer)
        self.epoll.close()
        self.listener.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
