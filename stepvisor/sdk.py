"""Names tenant workflow code imports: the `@workflow` decorator and the errors it raises or
catches.

Kept free of sockets and of the supervisor so that importing it inside an activation is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from protocol.limits import WORKFLOW_NAME_RE

F = TypeVar("F", bound=Callable[..., Any])

WORKFLOW_ATTR = "__stepvisor_workflow__"


def workflow(name: str) -> Callable[[F], F]:
    """Mark `fn(event, step)` as the workflow called `name` when its file is deployed."""
    if not isinstance(name, str) or not WORKFLOW_NAME_RE.match(name):
        raise ValueError(
            "workflow name must be a string of 1 to 256 characters, without commas or "
            "control characters"
        )

    def mark(fn: F) -> F:
        setattr(fn, WORKFLOW_ATTR, name)
        return fn

    return mark


class NonRetryableError(Exception):
    """Raise from a step to fail it at once, skipping any remaining retries."""


class StepFailed(Exception):
    """Raised inside the workflow when a step has exhausted its retries (or failed non-retryably).

    Catch it to compensate; leave it uncaught and the instance goes to `errored`.
    """

    def __init__(self, step: str, error_type: str, message: str, traceback: str = "") -> None:
        super().__init__(f"step {step!r} failed: {error_type}: {message}")
        self.step = step
        self.error_type = error_type
        self.error_message = message
        self.step_traceback = traceback


class WaitTimeout(Exception):
    """Raised inside the workflow when `step.wait_for_event` reaches its timeout with no event."""

    def __init__(self, step: str, event_type: str) -> None:
        super().__init__(f"no {event_type!r} event arrived for step {step!r} before its timeout")
        self.step = step
        self.event_type = event_type
