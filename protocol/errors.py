"""Error codes shared by the supervisor, the client and the CLI."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Every error a client or an activation can be told about. The CLI prints the code verbatim."""

    MALFORMED = "MALFORMED"  # not a decodable message of a known type
    TOO_LARGE = "TOO_LARGE"  # a frame or payload over its size limit
    BAD_REQUEST = "BAD_REQUEST"  # decodable but invalid (bad id, bad name, not JSON, ...)
    PROTOCOL_VERSION = "PROTOCOL_VERSION"  # peer speaks another protocol version
    UNKNOWN_TENANT = "UNKNOWN_TENANT"  # tenant never deployed code or is not declared
    UNKNOWN_WORKFLOW = "UNKNOWN_WORKFLOW"  # no deployment of that workflow for the tenant
    NOT_FOUND = "NOT_FOUND"  # no such instance for the tenant
    ALREADY_EXISTS = "ALREADY_EXISTS"  # instance id taken with different parameters
    INVALID_STATE = "INVALID_STATE"  # operation not allowed in the instance's status
    DEPLOY_FAILED = "DEPLOY_FAILED"  # tenant code failed to load in its sandbox
    NONDETERMINISM = "NONDETERMINISM"  # replay asked for a different step than the journal holds
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"  # a tenant limit (instances, ...) would be exceeded
    UNAVAILABLE = "UNAVAILABLE"  # supervisor draining or not reachable
    CONFIG = "CONFIG"  # the config file is invalid or changes what needs a restart
    FORBIDDEN = "FORBIDDEN"  # the client's key may not do this (another tenant's, admin only)
    AUTH = "AUTH"  # the remote API refused the connection (no key, wrong key, wrong server)
    TIMEOUT = "TIMEOUT"  # client gave up waiting for a reply
    INTERNAL = "INTERNAL"  # a bug in stepvisor; logged with details


class ProtocolError(Exception):
    """A typed error with a code and a human sentence; never a bare traceback on the wire."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
