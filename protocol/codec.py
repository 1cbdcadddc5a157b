"""One codec for every socket: size check first, then msgpack decode with validation.

Decoding never raises anything but ProtocolError, so a loop that catches it cannot be crashed by
a peer.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import (
    MAX_CLIENT_FRAME_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_REPLY_BYTES,
    MAX_SANDBOX_FRAME_BYTES,
)
from protocol.messages import FromActivation, Reply, Request, ToActivation

_encoder = msgspec.msgpack.Encoder()
_json_decoder = msgspec.json.Decoder()


_request_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Request)
_reply_decoder: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)
_from_activation_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(FromActivation)
_to_activation_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(ToActivation)


def encode(msg: object) -> bytes:
    """Encode any protocol struct to msgpack bytes."""
    return _encoder.encode(msg)


def _decode(decoder: msgspec.msgpack.Decoder[Any], frame: bytes, limit: int) -> Any:
    if len(frame) > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame of {len(frame)} bytes exceeds {limit}")
    try:
        return decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"undecodable message: {exc}") from None


def decode_request(frame: bytes) -> Any:
    """Decode a client request (one of `protocol.messages.Request`)."""
    return _decode(_request_decoder, frame, MAX_CLIENT_FRAME_BYTES)


class _RequestId(msgspec.Struct):
    rid: int = 0


_rid_decoder = msgspec.msgpack.Decoder(_RequestId)


def request_id(frame: bytes) -> int:
    """The `rid` of a request that failed validation, so its error reaches the right call; 0
    when the frame is too large or not a map with an integer `rid`."""
    if len(frame) > MAX_CLIENT_FRAME_BYTES:
        return 0
    try:
        return _rid_decoder.decode(frame).rid
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
        return 0


def decode_reply(frame: bytes) -> Reply:
    result: Reply = _decode(_reply_decoder, frame, MAX_REPLY_BYTES)
    return result


def decode_from_activation(frame: bytes) -> Any:
    """Decode a message sent by an activation (one of `FromActivation`)."""
    return _decode(_from_activation_decoder, frame, MAX_SANDBOX_FRAME_BYTES)


def decode_to_activation(frame: bytes) -> Any:
    # Activate carries code + journal; the activation trusts the supervisor's size.
    return _decode(_to_activation_decoder, frame, 1 << 31)


def dump_json(value: object, *, what: str = "value") -> bytes:
    """Encode user data to JSON, enforcing JSON-compatibility and the payload size limit."""
    # stdlib json, not msgspec: it refuses bytes, datetimes and NaN instead of converting them.
    try:
        data = json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, OverflowError, ValueError, RecursionError) as exc:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"{what} is not JSON-compatible: {exc}"
        ) from None
    check_json_size(data, what=what)
    return data


def check_json_size(data: bytes, *, what: str, limit: int = MAX_PAYLOAD_BYTES) -> None:
    if len(data) > limit:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"{what} is {len(data)} bytes encoded; the limit is {limit}",
        )


def load_json(data: bytes, *, what: str = "value", limit: int = MAX_PAYLOAD_BYTES) -> Any:
    """Validate and decode JSON user data received from a peer. `limit`: MAX_RESULT_BYTES for
    a journaled result, which may wrap a payload of the full size (see limits)."""
    check_json_size(data, what=what, limit=limit)
    try:
        return _json_decoder.decode(data)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what} is not valid JSON: {exc}") from None
