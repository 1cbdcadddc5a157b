"""The wire between clients, the supervisor and activations: typed messages, one codec, error codes.

Pure code: no I/O, no sockets. Everything that crosses a process boundary is defined here once.
"""

from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION", "ErrorCode", "ProtocolError"]
