"""The activation's one connection to the supervisor: a ZMTP DEALER peer of its sandbox ROUTER
(`supervisor.sandbox_server`), whose routing id is the token. Spoken over a plain blocking Unix
socket (see `protocol.zmtp` for why not libzmq): no thread, no Context, nothing of a parent's
state."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TypeVar

from protocol import zmtp
from protocol.codec import decode_to_activation, encode
from protocol.launch import ExitCode
from protocol.messages import Ack

# What one message from the supervisor may be: an Activate carries code, journal and events,
# a compatibility check many journals; anything larger is not our supervisor talking.
MAX_INBOUND_BYTES = 256 * 1024 * 1024

T = TypeVar("T")


class Channel:
    def __init__(self, endpoint: str, token: str, *, timeout_s: float = 30.0) -> None:
        if not endpoint.startswith("ipc://"):
            raise ValueError(f"an activation reaches its supervisor over ipc:// only: {endpoint}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout_s)
        self.sock.connect(endpoint.removeprefix("ipc://"))
        self.token = token  # our routing id: what the supervisor knows this activation by
        # Our side of the handshake goes out with the first message, in one write, without
        # waiting for the supervisor's: its server reads a peer's bytes in order, so the Hello
        # is there when it accepts the connection, and one loop iteration takes both. (A libzmq
        # ROUTER would drop a message that arrives before it has sent its READY.)
        self.handshake = zmtp.greeting() + zmtp.ready(b"DEALER", token.encode())
        self.greeted = False  # the supervisor's greeting and READY have been read

    def send(self, msg: object) -> None:
        """Send one message; a supervisor that has gone, or stopped reading for the timeout,
        ends the activation as one that never heard back would."""
        code = ExitCode.NO_ACK if self.greeted else ExitCode.NO_ACTIVATE
        data = zmtp.frame(encode(msg))
        if self.handshake:
            data, self.handshake = self.handshake + data, b""
        self._guard(lambda: self.sock.sendall(data), code)

    def recv(self, exit_code: int) -> object:
        return decode_to_activation(self._guard(self._message, exit_code))

    @staticmethod
    def _guard(read: Callable[[], T], exit_code: int) -> T:
        try:
            return read()
        except (OSError, EOFError, zmtp.ZmtpError):  # timed out, closed, or not our supervisor
            os._exit(exit_code)

    def wait_ack(self) -> None:
        reply = self.recv(ExitCode.NO_ACK)
        if not isinstance(reply, Ack) or not reply.ok:
            os._exit(ExitCode.REFUSED)

    def _greet(self) -> None:
        zmtp.check_greeting(self._exact(zmtp.GREETING_BYTES))
        flags, body = self._frame()
        if not flags & zmtp.COMMAND or zmtp.command_name(body) != b"READY":
            raise zmtp.ZmtpError("the peer did not say READY")
        self.greeted = True

    def _message(self) -> bytes:
        if self.handshake:  # nothing sent yet: the supervisor waits for our side first
            self.sock.sendall(self.handshake)
            self.handshake = b""
        if not self.greeted:
            self._greet()
        while True:
            flags, body = self._frame()
            if flags & zmtp.COMMAND:
                continue  # a heartbeat or another command: nothing we act on
            if flags & zmtp.MORE:
                raise zmtp.ZmtpError("a message of more than one frame")
            return body

    def _frame(self) -> tuple[int, bytes]:
        flags = self._exact(1)[0]
        n = zmtp.size(flags, self._exact(zmtp.size_bytes(flags)))
        if n > MAX_INBOUND_BYTES:
            raise zmtp.ZmtpError(f"a frame of {n} bytes")
        return flags, self._exact(n)

    def _exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise EOFError("the supervisor closed the connection")
            got += k
        return bytes(buf)
