"""Classify how an activation ended, from what the supervisor decided and the wait status."""

from __future__ import annotations

import signal

from protocol.launch import ExitCode
from protocol.messages import ErrorInfo

OK = "ok"
ERROR = "error"  # the activation reported a failed step or a failed workflow
OOM = "oom"
CPU_LIMIT = "cpu_limit"
WALL_TIMEOUT = "wall_timeout"
PROTOCOL_ERROR = "protocol_error"
NEVER_CONNECTED = "never_connected"
KILLED_BY_OPERATOR = "killed_by_operator"
INTERRUPTED = "interrupted"  # the supervisor stopped or died while it ran
FENCED = "fenced"  # its node lost the instance's lease (another node re-runs the step)
CRASHED = "crashed"
UNUSED = "unused"  # prepared ahead and stopped before any step was given to it


def classify_exit(
    status: int, cpu_s: float, cpu_limit_s: int, *, oom_killed: bool = False
) -> tuple[str, str]:
    """(outcome, detail) for an activation that exited without a committed result."""
    if status < 0 or (status & 0x7F):  # killed by a signal
        signum = -status if status < 0 else status & 0x7F
        name = _signame(signum)
        if signum == signal.SIGKILL and oom_killed:
            return OOM, "killed by the kernel: the tenant's cgroup ran out of memory"
        if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_s >= cpu_limit_s):
            return CPU_LIMIT, f"{name} after {cpu_s:.2f} s of CPU (limit {cpu_limit_s} s)"
        return f"signalled({name})", f"killed by {name}"
    code = status >> 8
    if code == 0:
        return PROTOCOL_ERROR, "exited without reporting a result"
    return CRASHED, f"exited with code {code}{_reserved(code)}"


def _reserved(code: int) -> str:
    """What a reserved exit code says, e.g. ' (NO_ACK: the result was sent but never
    acknowledged)'; nothing for other codes."""
    try:
        reserved = ExitCode(code)
    except ValueError:
        return ""
    return f" ({reserved.name}: {reserved.meaning})"


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


def failure_message(outcome: str, detail: str) -> str:
    return f"activation {outcome}: {detail}"


# The error type a step's attempt records when its activation died this way.
_CRASH_TYPES = {OOM: "OutOfMemory", CPU_LIMIT: "CpuLimitExceeded", WALL_TIMEOUT: "StepTimeout"}


def crash_error(outcome: str, detail: str, stderr_tail: str = "") -> ErrorInfo:
    """What users see of an activation that died without reporting: its outcome as an error
    type, the detail, and the last of what it wrote to stderr."""
    return ErrorInfo(
        type=_CRASH_TYPES.get(outcome, "ActivationCrashed"),
        message=failure_message(outcome, detail),
        traceback=stderr_tail[-8000:],
        code=None,
    )
