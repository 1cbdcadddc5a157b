"""Sizes and shapes every peer agrees on. Checked before decoding and again before storing."""

from __future__ import annotations

import re

PROTOCOL_VERSION = 1

MIB = 1024 * 1024
MAX_PAYLOAD_BYTES = 1 * MIB  # instance params, step result, event payload, workflow output (JSON)
# A received event is journaled wrapped as {"type", "timestamp", "payload"}: the payload limit
# applies to what the user sent, and the journaled result may be larger by the wrapper (a type
# of MAX_NAME_CHARS characters, each escaped to at most 6 bytes, and a timestamp).
EVENT_WRAPPER_BYTES = 4096
MAX_RESULT_BYTES = MAX_PAYLOAD_BYTES + EVENT_WRAPPER_BYTES  # one journaled step or wait result
MAX_CODE_BYTES = 8 * MIB  # one deployed source file or pickled function
MAX_CLIENT_FRAME_BYTES = 16 * MIB  # one client request (a batch create may carry many params)
MAX_REPLY_BYTES = 4 * MAX_CLIENT_FRAME_BYTES  # one reply a client decodes
MAX_SANDBOX_FRAME_BYTES = 2 * MIB  # one message from an activation
MAX_NAME_CHARS = 256  # step names, workflow names, event types
MAX_ERROR_CHARS = 64 * 1024  # error message + traceback kept per failure
MAX_BATCH_ITEMS = 10_000
MAX_WORKFLOWS = 1000  # workflows one deployed file may define
# Every number on the wire is finite and in a range the supervisor can store, compare and print
# (a datetime ends at year 9999, about 2.5e11 s): NaN fails every bound, infinity the upper one.
MAX_EPOCH_S = 1e11  # latest instant a sleep may end (year 5138), epoch seconds UTC
MAX_TIMEOUT_S = 366 * 86_400.0  # longest step timeout, event wait or retry delay: a year
MAX_MONOTONIC_S = 1e10  # CLOCK_MONOTONIC readings (three centuries of uptime)
MAX_ATTEMPTS = 1_000_000  # attempts of one step
# A compatibility check (deploy --check, upgrade, replay) replays at most this many instances'
# journals, of at most this many bytes together, in one activation.
MAX_CHECK_INSTANCES = 100
MAX_CHECK_JOURNAL_BYTES = 32 * MIB

# \Z, not $: `$` also matches before a trailing newline.
INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,99}\Z")
# A workflow name: printable on one line, and no comma (a code version lists its names joined
# by commas).
WORKFLOW_NAME_RE = re.compile(r"^[^,\x00-\x1f\x7f]{1,256}\Z")
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
