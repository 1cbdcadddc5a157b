"""Every message that crosses a process boundary, as tagged msgspec structs.

User data (params, step results, event payloads, outputs) travels as JSON bytes so its type never
drifts between peers; the supervisor validates it and stores it as-is.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

import msgspec

from protocol.limits import (
    MAX_ATTEMPTS,
    MAX_CHECK_INSTANCES,
    MAX_CODE_BYTES,
    MAX_EPOCH_S,
    MAX_ERROR_CHARS,
    MAX_MONOTONIC_S,
    MAX_NAME_CHARS,
    MAX_PAYLOAD_BYTES,
    MAX_TIMEOUT_S,
    MAX_WORKFLOWS,
)

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
# \Z, not $: `$` also matches before a trailing newline.
Tenant = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}\Z")]
InstanceId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,99}\Z")]
Json = bytes  # UTF-8 JSON text; validated by the receiver (a client hears TOO_LARGE from it)
# JSON from an activation: its runtime never sends more, so more is a protocol error.
Payload = Annotated[bytes, msgspec.Meta(max_length=MAX_PAYLOAD_BYTES)]
Code = Annotated[bytes, msgspec.Meta(max_length=MAX_CODE_BYTES)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_ERROR_CHARS)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
# Numbers from a peer are finite and bounded (NaN fails any bound, infinity the upper one), so
# what they become (deadlines, wake times, history) can always be stored, compared and printed.
EpochS = Annotated[float, msgspec.Meta(ge=0, le=MAX_EPOCH_S)]
TimeoutS = Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT_S)]
DelayS = Annotated[float, msgspec.Meta(ge=0, le=MAX_TIMEOUT_S)]
DurationMs = Annotated[float, msgspec.Meta(ge=0, le=MAX_TIMEOUT_S * 1000 * 2)]
MonotonicS = Annotated[float, msgspec.Meta(ge=0, le=MAX_MONOTONIC_S)]


class Status(enum.StrEnum):
    """An instance's status. `supervisor.engine` is the only writer of it."""

    QUEUED = "queued"  # created (or restarted), never activated
    RUNNING = "running"  # an activation holds it, or it is due for its next one
    PAUSED = "paused"
    WAITING = "waiting"  # sleeping, or waiting for an event
    ERRORED = "errored"
    TERMINATED = "terminated"
    COMPLETE = "complete"


TERMINAL_STATUSES: frozenset[str] = frozenset({Status.ERRORED, Status.TERMINATED, Status.COMPLETE})
ControlOp = Literal["pause", "resume", "terminate", "restart", "delete"]
Backoff = Literal["constant", "linear", "exponential"]


class Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="t"):
    pass


class ErrorInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """A failure as users see it: exception type, message, tenant traceback, optional code."""

    type: Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
    message: Text
    traceback: Text = ""
    code: Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)] | None = None


# ---------------------------------------------------------------- client → supervisor


class Deploy(Base, frozen=True, tag="deploy"):
    rid: int
    tenant: Tenant
    filename: Name
    source: Code | None = None  # UTF-8 Python source defining @workflow functions
    pickled: Code | None = None  # cloudpickle bytes of one @workflow function
    # deploy nothing: replay the tenant's in-flight and recent instances of the workflows the
    # code defines against it, and report which would hit nondeterminism
    check: bool = False


Version = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}\Z")]


class Upgrade(Base, frozen=True, tag="upgrade"):
    """Move in-flight instances of `workflow` to `version` (default: the deployed one), each
    only when its journal replays against that code without nondeterminism."""

    rid: int
    tenant: Tenant
    workflow: Name
    ids: Annotated[list[InstanceId], msgspec.Meta(max_length=MAX_CHECK_INSTANCES)] | None = None
    version: Version | None = None


class CheckReplay(Base, frozen=True, tag="replay"):
    """Replay one instance's journal in a sandbox against `version` (default: its own)."""

    rid: int
    tenant: Tenant
    id: InstanceId
    version: Version | None = None


class GetJournal(Base, frozen=True, tag="journal"):
    """What replaying one instance needs: its workflow, params, creation time and journal."""

    rid: int
    tenant: Tenant
    id: InstanceId


class ListWorkflows(Base, frozen=True, tag="workflows"):
    """The tenant's deployed workflows and every version of each, with instances pinned."""

    rid: int
    tenant: Tenant


class BatchItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: InstanceId
    params: Json = b"null"


class Create(Base, frozen=True, tag="create"):
    rid: int
    tenant: Tenant
    workflow: Name
    id: InstanceId | None = None
    params: Json = b"null"


class CreateBatch(Base, frozen=True, tag="create_batch"):
    rid: int
    tenant: Tenant
    workflow: Name
    items: list[BatchItem]


class GetStatus(Base, frozen=True, tag="status"):
    rid: int
    tenant: Tenant
    id: InstanceId


class ListInstances(Base, frozen=True, tag="list"):
    rid: int
    tenant: Tenant
    status: Status | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000


class SendEvent(Base, frozen=True, tag="event"):
    rid: int
    tenant: Tenant
    id: InstanceId
    type: Name
    payload: Json = b"null"


class Control(Base, frozen=True, tag="control"):
    rid: int
    tenant: Tenant
    id: InstanceId
    op: ControlOp
    # restart only: keep the journal before the first command of this name, re-run from there
    from_step: Name | None = None


class GetHistory(Base, frozen=True, tag="history"):
    rid: int
    tenant: Tenant
    id: InstanceId


class Ping(Base, frozen=True, tag="ping"):
    rid: int


class GetStats(Base, frozen=True, tag="stats"):
    """Live figures: the last minute's activations, what runs and waits now, fork servers."""

    rid: int
    tenant: Tenant | None = None  # one tenant's figures only


# What a usage row counts, after its tenant and period (see `journal.add_usage`).
USAGE_FIELDS = (
    "activations",
    "steps",
    "failures",
    "cpu_ms",
    "wall_ms",
    "memory_peak_kib",  # the largest peak RSS of one activation
    "memory_sum_kib",  # the sum of every activation's peak RSS
    "memory_kib_s",  # each activation's peak RSS times its wall time
    "scratch_max_kib",  # the most scratch disk one activation held at its exit
)


class GetUsage(Base, frozen=True, tag="usage"):
    """Durable per-tenant usage, summed from the UTC hour holding `since` (epoch s) on."""

    rid: int
    tenant: Tenant | None = None
    since: EpochS | None = None
    hourly: bool = False  # one row per tenant and hour instead of one per tenant


class GetInfo(Base, frozen=True, tag="info"):
    """Where the supervisor keeps things: pid, config file, log file or journal unit."""

    rid: int


class CollectGarbage(Base, frozen=True, tag="gc"):
    """Run retention now: delete what has outlived its tenant's `retention_days`."""

    rid: int


PublicKey = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40}\Z")]


class CreateKey(Base, frozen=True, tag="key_new"):
    """A remote API key pair acting for `tenant` (None: an admin key). The secret half is in
    the reply only; the supervisor keeps the public half."""

    rid: int
    tenant: Tenant | None = None


class ListKeys(Base, frozen=True, tag="key_list"):
    rid: int


class RevokeKey(Base, frozen=True, tag="key_revoke"):
    rid: int
    public: PublicKey


class ListNodes(Base, frozen=True, tag="nodes"):
    """The supervisor nodes sharing the database: heartbeats, running steps, leases held."""

    rid: int


class Reload(Base, frozen=True, tag="reload"):
    """Re-read the supervisor's config file (as SIGHUP does) and report what changed."""

    rid: int


Request = (
    Deploy
    | Upgrade
    | CheckReplay
    | GetJournal
    | ListWorkflows
    | Create
    | CreateBatch
    | GetStatus
    | ListInstances
    | SendEvent
    | Control
    | GetHistory
    | Ping
    | GetStats
    | GetUsage
    | GetInfo
    | CollectGarbage
    | CreateKey
    | ListKeys
    | RevokeKey
    | Reload
    | ListNodes
)


class Reply(msgspec.Struct, frozen=True, omit_defaults=True):
    """The answer to one request. `result` is plain data (dicts, lists, strings, numbers)."""

    rid: int
    ok: bool
    result: object = None
    error: ErrorInfo | None = None


# ---------------------------------------------------------------- activation ↔ supervisor


class JournalEntry(msgspec.Struct, frozen=True, omit_defaults=True):
    """What replay needs of one journaled command."""

    seq: int
    kind: Literal["step", "sleep", "wait_event", "invoke"]
    name: str
    # step: ok|error|retry|running; sleep: sleeping|ok; wait_event: ok|waiting|timeout;
    # invoke: waiting|ok|error
    status: str
    attempts: int = 0
    result: Json | None = None
    error: ErrorInfo | None = None
    until: float | None = None  # sleep end or event deadline, epoch seconds UTC


class Hello(Base, frozen=True, tag="hello"):
    token: Annotated[str, msgspec.Meta(max_length=128)]
    pid: Annotated[int, msgspec.Meta(ge=1, le=1 << 22)]  # the kernel's largest pid_max
    protocol_version: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)]


class Replay(msgspec.Struct, frozen=True, omit_defaults=True):
    """One instance a compatibility check replays."""

    instance: str
    workflow: str
    params: Json
    created_at: float
    journal: list[JournalEntry]


class Activate(Base, frozen=True, tag="activate"):
    mode: Literal["run", "inspect", "check"]
    tenant: str
    filename: str
    code_kind: Literal["source", "pickle"]
    code: bytes
    instance: str = ""
    workflow: str = ""
    params: Json = b"null"
    created_at: float = 0.0
    journal: list[JournalEntry] = []
    now: float = 0.0
    max_timeout_s: float = 600.0
    replays: list[Replay] = []  # mode "check": the instances to replay against the code


class Marks(msgspec.Struct, frozen=True, array_like=True):
    """CLOCK_MONOTONIC seconds (one clock for every process on the host) at points of an
    activation's life. Sent with its final message; the supervisor turns them into the phase
    timings of the activation's record."""

    started: MonotonicS  # its own code began: just after the fork, or at interpreter start
    hello: MonotonicS  # every isolation layer applied and connected: Hello sent
    activated: MonotonicS  # Activate received
    replayed: MonotonicS  # the code is loaded and the journal replayed: the new command is known
    done: MonotonicS  # the final message is about to be sent


class Final(Base, frozen=True, kw_only=True):
    """An activation's last message: what it decided, and its timing marks."""

    marks: Marks | None = None


class StepStarted(Base, frozen=True, tag="step_started"):
    """Sent before a step's callable runs; the activation waits for an Ack before running it."""

    seq: Seq
    name: Name
    attempt: Annotated[int, msgspec.Meta(ge=1, le=MAX_ATTEMPTS)]
    retry_limit: Annotated[int, msgspec.Meta(ge=0, le=10_000)]
    retry_delay_s: DelayS
    backoff: Backoff
    timeout_s: TimeoutS


class StepResult(Final, frozen=True, tag="step_result"):
    seq: Seq
    ok: bool
    value: Payload | None = None
    error: ErrorInfo | None = None
    retryable: bool = True
    duration_ms: DurationMs = 0.0


class SleepCmd(Final, frozen=True, tag="sleep"):
    seq: Seq
    name: Name
    until: EpochS


class WaitEventCmd(Final, frozen=True, tag="wait_event"):
    seq: Seq
    name: Name
    type: Name
    timeout_s: TimeoutS


class InvokeCmd(Final, frozen=True, tag="invoke"):
    """Start a child instance of the same tenant and wait for it (`step.invoke`)."""

    seq: Seq
    name: Name
    workflow: Name
    params: Payload = b"null"
    id: InstanceId | None = None  # the child's id; by default one made from the parent's


class CompleteCmd(Final, frozen=True, tag="complete"):
    output: Payload


class FailCmd(Final, frozen=True, tag="fail"):
    error: ErrorInfo


class Inspected(Final, frozen=True, tag="inspected"):
    workflows: Annotated[list[Name], msgspec.Meta(max_length=MAX_WORKFLOWS)]


Verdict = Literal["compatible", "nondeterministic", "fails", "not_in_code"]


class CheckResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """How one instance's journal replayed against the checked code."""

    instance: InstanceId
    verdict: Verdict
    replayed: Seq  # journal entries the code asked for, in order, before it stopped
    # compatible: the command the code goes on with ("step 'charge'", "return"); otherwise why
    message: Text = ""


class Checked(Final, frozen=True, tag="checked"):
    workflows: Annotated[list[Name], msgspec.Meta(max_length=MAX_WORKFLOWS)]
    results: Annotated[list[CheckResult], msgspec.Meta(max_length=MAX_CHECK_INSTANCES)]


class Ack(Base, frozen=True, tag="ack"):
    ok: bool = True
    error: ErrorInfo | None = None


FromActivation = (
    Hello
    | StepStarted
    | StepResult
    | SleepCmd
    | WaitEventCmd
    | InvokeCmd
    | CompleteCmd
    | FailCmd
    | Inspected
    | Checked
)
ToActivation = Activate | Ack
