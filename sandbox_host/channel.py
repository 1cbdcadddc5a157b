"""The activation's one socket to the supervisor: a DEALER whose routing id is its token."""

from __future__ import annotations

import os

import zmq

from protocol.codec import decode_to_activation, encode
from protocol.launch import ExitCode
from protocol.messages import Ack


class Channel:
    def __init__(self, endpoint: str, token: str, *, timeout_s: float = 30.0) -> None:
        # A fresh Context per process: nothing of a parent's zmq state is ever reused.
        self.ctx = zmq.Context(io_threads=1)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, token.encode())
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(endpoint)
        self.timeout_ms = int(timeout_s * 1000)

    def send(self, msg: object) -> None:
        self.sock.send(encode(msg))

    def recv(self, exit_code: int) -> object:
        if not self.sock.poll(self.timeout_ms, zmq.POLLIN):
            os._exit(exit_code)
        return decode_to_activation(self.sock.recv())

    def wait_ack(self) -> None:
        reply = self.recv(ExitCode.NO_ACK)
        if not isinstance(reply, Ack) or not reply.ok:
            os._exit(ExitCode.REFUSED)
