"""What the supervisor remembers about one running activation: in memory only, gone at reap."""

from __future__ import annotations

import itertools
import math
import subprocess
from dataclasses import dataclass
from typing import Any

import structlog

from protocol.messages import Marks
from supervisor.checks import CheckPlan
from supervisor.config import Limits

LAUNCHED = "launched"  # process started, no Hello yet
PARKED = "parked"  # prepared ahead: Hello received, waiting for a step to be bound to it
CONNECTED = "connected"  # Hello received, Activate sent; replaying
IN_STEP = "step"  # StepStarted committed; the step's callable is running
SETTLED = "settled"  # fate decided; any further message with this token is dropped


@dataclass
class DeployRequest:
    """A deploy waiting on its inspection activation for the reply; with a `plan`, a check
    (deploy --check, upgrade, replay) waiting on its check activation."""

    identity: bytes
    rid: int
    kind: str
    filename: str
    code: bytes
    version: str
    plan: CheckPlan | None = None


@dataclass
class Activation:
    aid: int
    token: str
    tenant: str
    kind: str  # run | inspect
    instance: str | None  # None for an inspection, and for a prepared one until it is bound
    limits: Limits
    scratch: str
    launched_at: float  # wall clock, for the record
    launched_mono: float
    deadline_mono: float
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0
    state: str = LAUNCHED
    hello_mono: float | None = None
    settled_mono: float | None = None
    expected_seq: int = 0
    state_bytes: int = 0  # what its instance's journal weighed when it was activated
    seq: int | None = None
    step: str | None = None
    outcome: str | None = None
    detail: str = ""
    deploy: DeployRequest | None = None
    stderr_tail: bytes = b""
    output_bytes: int = 0  # tenant output accepted for logging, newlines counted
    output_lines: int = 0
    output_dropped: int = 0  # bytes over the caps, read and thrown away
    lingered: bool = False  # still there `settled_grace_s` after it settled: killed
    late_messages: int = 0  # messages after it settled, dropped
    scratch_entries: int = 0  # what its scratch dir held when it was measured, at reap
    uid: int | None = None  # its sandbox uid, when it has one
    gid: int | None = None  # its tenant's sandbox group
    oom_killed: bool = False  # the kernel OOM-killed one of its processes (cgroup)
    log: Any = None  # the supervisor's logger bound to tenant, instance and activation
    marks: Marks | None = None  # the activation's own timing marks, from its final message
    result_mono: float | None = None  # its final message arrived
    committed_mono: float | None = None  # the transaction holding its result committed
    prepared: bool = False  # launched ahead, before any step was due (see `supervisor.prepared`)
    bound_mono: float | None = None  # a prepared one: when an instance's step was given to it

    @property
    def step_began(self) -> float | None:
        """When its step could begin: its Hello, or for a prepared activation given its step
        after its Hello, the hand-over (what it waited for until then was not the step's)."""
        if self.hello_mono is None:
            return None
        return max(self.hello_mono, self.bound_mono or 0.0)

    @property
    def unbound(self) -> bool:
        """Prepared and no step given to it yet: it holds no concurrency slot of its tenant."""
        return self.prepared and self.instance is None

    def __post_init__(self) -> None:
        if self.log is None:
            self.log = structlog.get_logger().bind(
                tenant=self.tenant, instance=self.instance, activation=self.aid
            )

    @property
    def identity(self) -> bytes:
        return self.token.encode()

    def phases(self, reaped_mono: float) -> dict[str, float] | None:
        """Where the time from launch to reap went, in ms; None unless the activation sent its
        marks with a final message (a crash has no such phases) and they are in order."""
        m = self.marks
        points = [
            self.launched_mono,
            *(() if m is None else (m.started, m.hello)),
            self.hello_mono,
            self.step_began,  # a prepared activation's wait for its step ends here
            *(() if m is None else (m.activated, m.replayed, m.done)),
            self.result_mono,
            self.committed_mono,
            reaped_mono,
        ]
        if m is None or any(p is None or not math.isfinite(p) for p in points):
            return None
        steps = [b - a for a, b in itertools.pairwise(points)]
        if any(d < 0 for d in steps):  # not one clock's order: forged or garbled marks
            return None
        return {name: round(d * 1000, 3) for name, d in zip(PHASES, steps, strict=True)}


# launch: fork or spawn until the activation's code runs · setup: token, isolation, connect ·
# connect: Hello reaches the supervisor · parked: a prepared activation waiting for its step
# (0 for any other) · activate: journal read, Activate sent and decoded ·
# replay: code loaded, journal replayed · step: the new command (a step's StepStarted round trip
# and body) · report: the result reaches the supervisor · commit: journaled and committed ·
# reap: ack, exit, reaped and cleaned up.
PHASES = (
    "launch",
    "setup",
    "connect",
    "parked",
    "activate",
    "replay",
    "step",
    "report",
    "commit",
    "reap",
)
