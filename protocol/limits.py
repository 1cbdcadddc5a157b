"""Sizes and shapes every peer agrees on. Checked before decoding and again before storing."""

from __future__ import annotations

import re

PROTOCOL_VERSION = 1

MIB = 1024 * 1024
MAX_PAYLOAD_BYTES = 1 * MIB  # instance params, step result, event payload, workflow output (JSON)
MAX_CODE_BYTES = 8 * MIB  # one deployed source file or pickled function
MAX_CLIENT_FRAME_BYTES = 16 * MIB  # one client request (a batch create may carry many params)
MAX_SANDBOX_FRAME_BYTES = 2 * MIB  # one message from an activation
MAX_NAME_CHARS = 256  # step names, workflow names, event types
MAX_ERROR_CHARS = 64 * 1024  # error message + traceback kept per failure
MAX_BATCH_ITEMS = 10_000

# \Z, not $: `$` also matches before a trailing newline.
INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,99}\Z")
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
