"""The in-process harness for sandbox_host.runtime tests: a recording channel in place of the
socket, and an `activate` fixture that runs tenant source against a journal."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import pytest

from protocol.codec import decode_from_activation, encode
from protocol.messages import (
    Activate,
    CompleteCmd,
    ErrorInfo,
    FailCmd,
    JournalEntry,
)
from sandbox_host.runtime import Runtime, _Stop

NOW = 1_700_000_000.0
CREATED = NOW - 3600


class RecordingChannel:
    """Stands in for the activation's socket: records what is sent, acks at once."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, msg: object) -> None:
        self.sent.append(msg)

    def wait_ack(self) -> None:
        return None


@dataclass
class Outcome:
    sent: list[Any]
    effects: list[str]

    @property
    def last(self) -> Any:
        return self.sent[-1]


HEADER = "from stepvisor import workflow, NonRetryableError, StepFailed, WaitTimeout\n"
EFFECTS_HELPER = """
def effect(name):
    # a visible side effect of running a step's callable
    with open(LOG, "a") as f:
        f.write(name + "\\n")
    return name
"""


@pytest.fixture
def activate(tmp_path: Path) -> Iterator[Callable[..., Outcome]]:
    log = tmp_path / "effects.log"
    runtimes: list[Runtime] = []

    def run(
        source: str,
        journal: list[JournalEntry] | None = None,
        *,
        mode: Literal["run", "inspect"] = "run",
        workflow: str = "w",
        params: bytes = b'{"x": 1}',
        now: float = NOW,
        max_timeout_s: float = 600.0,
    ) -> Outcome:
        code = HEADER + f"LOG = {str(log)!r}\n" + EFFECTS_HELPER + textwrap.dedent(source)
        act = Activate(
            mode=mode,
            tenant="acme",
            filename="wf.py",
            code_kind="source",
            code=code.encode(),
            instance="inst-1",
            workflow=workflow,
            params=params,
            created_at=CREATED,
            journal=journal or [],
            now=now,
            max_timeout_s=max_timeout_s,
        )
        channel = RecordingChannel()
        runtime = Runtime(act, channel, exit=stop)  # type: ignore[arg-type]
        runtimes.append(runtime)
        try:
            with pytest.raises(_Stop):
                if mode == "inspect":
                    runtime.inspect()
                else:
                    runtime.run()
        finally:
            runtime.output.unmute()
            sys.modules.pop("tenant_workflows", None)
        # everything the runtime sends must be accepted by the supervisor's decoder
        for msg in channel.sent:
            assert decode_from_activation(encode(msg)) == msg
        effects = log.read_text().split() if log.exists() else []
        log.unlink(missing_ok=True)
        return Outcome(channel.sent, effects)

    yield run
    for runtime in runtimes:  # never leave fds 1/2 pointing at /dev/null
        runtime.output.unmute()


def stop() -> NoReturn:
    """In place of the activation's os._exit: unwind back to the test."""
    raise _Stop


def ok(seq: int, name: str, value: object) -> JournalEntry:
    return JournalEntry(
        seq=seq, kind="step", name=name, status="ok", attempts=1, result=json.dumps(value).encode()
    )


def output_of(outcome: Outcome) -> object:
    assert isinstance(outcome.last, CompleteCmd), outcome.sent
    return json.loads(outcome.last.output)


def failure_of(outcome: Outcome) -> ErrorInfo:
    assert isinstance(outcome.last, FailCmd), outcome.sent
    return outcome.last.error


THREE_STEPS = """
@workflow("w")
def w(event, step):
    a = step.do("a", lambda: effect("a") and 1)
    b = step.do("b", lambda: effect("b") and a + 1)
    c = step.do("c", lambda: effect("c") and b + 1)
    return {"sum": a + b + c}
"""
