"""ZMTP 3.0 (ZeroMQ RFC 23), the part activations and the supervisor speak to each other: DEALER
peers with the NULL mechanism and a routing id, a ROUTER, single-frame messages. Pure: bytes in,
bytes out.

An activation talks to the supervisor's ROUTER with this rather than through libzmq, because a
libzmq Context starts an I/O thread: in a process that lives for one step, making the Context,
starting that thread and connecting through it cost about 1 ms of latency and 2 ms of CPU (every
later munmap then also shoots down the TLB of the thread's CPU), and a tenant's process is
simpler to confine with no second thread in it. The supervisor's end is `supervisor.sandbox_server`
for the same reason on its side; the wire is the same, and any libzmq DEALER can speak to it.
"""

from __future__ import annotations

import struct

SIGNATURE_HEAD = b"\xff" + b"\x00" * 8  # then 0x7f; bytes 1-8 are padding any peer may set
GREETING_BYTES = 64
MORE, LONG, COMMAND = 0x01, 0x02, 0x04


class ZmtpError(Exception):
    """The peer said something that is not ZMTP 3 from a ROUTER."""


def greeting() -> bytes:
    """Signature, version 3.0, the NULL mechanism, as-client, filler."""
    return SIGNATURE_HEAD + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32


def check_greeting(data: bytes) -> None:
    if len(data) != GREETING_BYTES or data[0] != 0xFF or data[9] != 0x7F:
        raise ZmtpError("not a ZMTP greeting")
    if data[10] < 3:
        raise ZmtpError(f"ZMTP {data[10]}.{data[11]} is too old: 3.0 or later is needed")
    if data[12:32].rstrip(b"\x00") != b"NULL":
        raise ZmtpError("the peer wants a security mechanism other than NULL")


def frame(body: bytes, flags: int = 0) -> bytes:
    """One frame: a short one carries its size in a byte, a long one in eight."""
    return frame_head(len(body), flags) + body


def frame_head(size: int, flags: int = 0) -> bytes:
    """What comes before a frame's body of `size` bytes."""
    if size > 255:
        return bytes([flags | LONG]) + struct.pack(">Q", size)
    return bytes([flags, size])


def ready(socket_type: bytes, identity: bytes) -> bytes:
    """The READY command frame: our socket type and the routing id the ROUTER files us under."""
    body = b"\x05READY" + _property(b"Socket-Type", socket_type)
    if identity:
        body += _property(b"Identity", identity)
    return frame(body, COMMAND)


def _property(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


def size_bytes(flags: int) -> int:
    """How many bytes after the flags byte hold the frame's size."""
    if flags & ~(MORE | LONG | COMMAND):
        raise ZmtpError(f"reserved frame flags set: {flags:#x}")
    return 8 if flags & LONG else 1


def size(flags: int, data: bytes) -> int:
    return struct.unpack(">Q", data)[0] if flags & LONG else data[0]


def properties(body: bytes) -> dict[bytes, bytes]:
    """The metadata of a READY command frame's body (name byte, name, properties)."""
    name = command_name(body)
    pos, found = 1 + len(name), {}
    while pos < len(body):
        n = body[pos]
        if pos + 1 + n + 4 > len(body):
            raise ZmtpError("a truncated property")
        key = body[pos + 1 : pos + 1 + n]
        (size,) = struct.unpack(">I", body[pos + 1 + n : pos + 5 + n])
        pos += 5 + n
        if pos + size > len(body):
            raise ZmtpError("a truncated property value")
        found[key] = body[pos : pos + size]
        pos += size
    return found


def command_name(body: bytes) -> bytes:
    if not body or len(body) < 1 + body[0]:
        raise ZmtpError("a command frame without a name")
    return body[1 : 1 + body[0]]
