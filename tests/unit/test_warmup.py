"""sandbox_host.warmup: the fork server runs the activation's hot path once before forking,
and keeps nothing of it."""

from __future__ import annotations

import os
import sys

import pytest

from sandbox_host import runtime, warmup


def test_warmup_runs_every_command_path() -> None:
    sent = warmup.warm(rounds=3)
    # Each round: a new step at 0 and at 2 entries, the sleep at 4, the return at 5. A failure
    # anywhere (the runtime changed under the warm-up) would show as a FailCmd instead.
    assert sent == {"StepStarted": 6, "StepResult": 6, "SleepCmd": 3, "CompleteCmd": 3}


def test_warmup_leaves_nothing_behind(capfd: pytest.CaptureFixture[str]) -> None:
    modules, sources = set(sys.modules), dict(runtime._SOURCES)
    streams = (sys.stdout, sys.stderr)
    fds = [os.fstat(fd).st_ino for fd in (1, 2)]

    warmup.warm(rounds=2)

    assert "tenant_workflows" not in sys.modules
    assert set(sys.modules) - modules == set()
    assert sources == runtime._SOURCES
    assert (sys.stdout, sys.stderr) == streams  # unmuted: replay's gates are gone
    assert [os.fstat(fd).st_ino for fd in (1, 2)] == fds
    assert capfd.readouterr() == ("", "")
