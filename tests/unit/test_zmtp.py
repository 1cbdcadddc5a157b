"""The ZMTP framing an activation speaks, byte for byte against the spec (rfc 23, ZMTP 3.0)."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import zmtp


def test_the_greeting_is_version_3_null_as_client() -> None:
    g = zmtp.greeting()
    assert len(g) == zmtp.GREETING_BYTES == 64
    assert g[0] == 0xFF and g[9] == 0x7F and g[10:12] == b"\x03\x00"
    assert g[12:32] == b"NULL" + b"\x00" * 16 and g[32] == 0  # as-server: no
    zmtp.check_greeting(g)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda g: g[:63], "not a ZMTP greeting"),
        (lambda g: b"\x00" + g[1:], "not a ZMTP greeting"),
        (lambda g: g[:10] + b"\x02\x00" + g[12:], "too old"),
        (lambda g: g[:12] + b"CURVE".ljust(20, b"\x00") + g[32:], "other than NULL"),
    ],
)
def test_a_greeting_we_cannot_speak_with_is_refused(change, why: str) -> None:
    with pytest.raises(zmtp.ZmtpError, match=why):
        zmtp.check_greeting(change(zmtp.greeting()))


def test_ready_names_the_socket_type_and_the_routing_id() -> None:
    f = zmtp.ready(b"DEALER", b"tok")
    assert f[0] == zmtp.COMMAND and f[1] == len(f) - 2
    body = f[2:]
    assert zmtp.command_name(body) == b"READY"
    assert body[6:] == (
        b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
        + b"\x08Identity" + struct.pack(">I", 3) + b"tok"
    )  # fmt: skip


@given(st.binary(max_size=70_000), st.sampled_from([0, zmtp.MORE, zmtp.COMMAND]))
def test_a_frame_reads_back_as_written(body: bytes, flags: int) -> None:
    f = zmtp.frame(body, flags)
    n = zmtp.size_bytes(f[0])
    assert n == (8 if len(body) > 255 else 1)
    assert zmtp.size(f[0], f[1 : 1 + n]) == len(body)
    assert f[1 + n :] == body and f[0] & ~zmtp.LONG == flags


def test_reserved_flags_and_nameless_commands_are_errors() -> None:
    with pytest.raises(zmtp.ZmtpError, match="reserved"):
        zmtp.size_bytes(0x80)
    with pytest.raises(zmtp.ZmtpError, match="without a name"):
        zmtp.command_name(b"\x05REA")


@given(st.binary(min_size=1, max_size=300), st.binary(max_size=300))
def test_a_ready_commands_properties_read_back(socket_type: bytes, identity: bytes) -> None:
    f = zmtp.ready(socket_type, identity)
    props = zmtp.properties(f[1 + zmtp.size_bytes(f[0]) :])
    assert props[b"Socket-Type"] == socket_type
    assert props.get(b"Identity", b"") == identity


@given(st.binary(max_size=64))
def test_truncated_properties_are_errors_not_crashes(tail: bytes) -> None:
    """Whatever follows a READY's name parses or is a ZmtpError: never another exception."""
    with contextlib.suppress(zmtp.ZmtpError):
        zmtp.properties(b"\x05READY" + tail)
