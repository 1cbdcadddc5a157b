"""stepvisor: durable workflows, one isolated process per step.

Tenant code imports `workflow` and the errors; platform code uses `Client`.
"""

from stepvisor.sdk import NonRetryableError, StepFailed, WaitTimeout, workflow

__all__ = ["Client", "NonRetryableError", "StepFailed", "StepVisorError", "WaitTimeout", "workflow"]


def __getattr__(name: str) -> object:
    # The client pulls in zmq; activations only need the SDK names, so import it on first use.
    if name in ("Client", "StepVisorError"):
        from stepvisor import client

        return getattr(client, name)
    raise AttributeError(name)
