"""OutputCapture on real pipes of a real process: what a tenant writes is logged, whole lines,
under the step it was written in, including a last line without a newline."""

from __future__ import annotations

import os
import subprocess
import time

import zmq
from structlog.testing import capture_logs

from supervisor.activation import Activation
from supervisor.config import Limits
from supervisor.output import OutputCapture


def activation(cmd: str) -> Activation:
    proc = subprocess.Popen(["sh", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for stream in (proc.stdout, proc.stderr):
        assert stream is not None
        os.set_blocking(stream.fileno(), False)
    act = Activation(
        aid=1,
        token="t",
        tenant="acme",
        kind="run",
        instance="i",
        limits=Limits(),
        scratch="/nonexistent",
        launched_at=time.time(),
        launched_mono=time.monotonic(),
        deadline_mono=time.monotonic() + 60,
        proc=proc,
    )
    act.seq, act.step = 0, "say"
    return act


def logged_lines(cmd: str) -> list[str]:
    act = activation(cmd)
    assert act.proc is not None
    act.proc.wait()  # everything written, and the end of file, is there to read at once
    capture = OutputCapture(zmq.Poller())
    with capture_logs() as logs:
        capture.watch(act)
        capture.drain(act)  # as at the reap: data and end of file in one go
        capture.forget(act)
        for _ in range(100):
            if not capture.busy():
                break
            capture.ready([])
    return [e["line"] for e in logs if e["event"] == "tenant.output" and e["step"] == "say"]


def test_a_last_line_without_newline_is_logged() -> None:
    assert logged_lines("printf 'one\\ntwo'") == ["one", "two"]


def test_lines_are_logged_whole_and_once() -> None:
    assert logged_lines("printf 'a\\n\\nb\\n'") == ["a", "", "b"]
