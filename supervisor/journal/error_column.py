"""`ErrorInfo` as the JSON text the error columns hold."""

from __future__ import annotations

import msgspec

from protocol.messages import ErrorInfo

_error_encoder = msgspec.json.Encoder()
_error_decoder = msgspec.json.Decoder(ErrorInfo)


def encode_error(err: ErrorInfo | None) -> str | None:
    return None if err is None else _error_encoder.encode(err).decode()


def decode_error(text: str | None) -> ErrorInfo | None:
    return None if text is None else _error_decoder.decode(text)
