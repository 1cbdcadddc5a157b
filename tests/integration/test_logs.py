"""`stepvisor logs`: filters, renderings, and following a live supervisor's log (rotation too)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, deploy_source, wait_for

SRC = """
from stepvisor import workflow

@workflow("say")
def say(event, step):
    return step.do("say it", lambda: print(event.payload) or "said")
"""


@pytest.fixture
def logged(make_daemon: Callable[..., Daemon], tmp_short: Path) -> Daemon:
    log = tmp_short / "stepvisor.jsonl"
    daemon = make_daemon(server=f'log_file = "{log}"\n')
    c = daemon.client()
    for tenant in ("acme", "beta"):
        deploy_source(c, tenant, SRC)
    return daemon


def say(daemon: Daemon, tenant: str, iid: str, text: str) -> None:
    c = daemon.client()
    c.create(tenant, "say", text, id=iid)
    assert c.wait(tenant, iid, timeout_s=60)["status"] == "complete"
    wait_for(
        lambda: daemon.events("activation.finished", tenant=tenant, instance=iid, seq=None),
        30,
        "the final activation to be reaped",
    )


def test_filters_and_renderings(logged: Daemon) -> None:
    say(logged, "acme", "a1", "hello from acme")
    say(logged, "beta", "b1", "hello from beta")

    out = logged.cli("logs", "--tenant", "acme")
    assert out.returncode == 0, out.stderr
    assert "acme/a1#" in out.stdout and "[say it] stdout: hello from acme" in out.stdout
    assert "beta" not in out.stdout and "supervisor.ready" not in out.stdout

    out = logged.cli("logs", "--tenant", "beta", "--instance", "b1")
    lines = out.stdout.splitlines()
    assert lines and all("beta/b1#" in line for line in lines)
    assert any("activation.finished outcome=ok" in line for line in lines)

    records = [json.loads(line) for line in logged.cli("--json", "logs").stdout.splitlines()]
    assert {r["event"] for r in records} >= {"supervisor.ready", "tenant.output"}
    assert logged.cli("logs", "-n", "2").stdout.count("\n") == 2
    assert logged.cli("logs", "--level", "error").stdout == ""
    assert logged.cli("logs", "--since", "2099-01-01").stdout == ""
    assert "acme" in logged.cli("logs", "--since", "1h", "--tenant", "acme").stdout
    direct = logged.cli("logs", "--file", str(logged.log_path), "--tenant", "beta")
    assert "hello from beta" in direct.stdout  # stdout of `serve` holds the same lines


def test_without_a_log_file_it_says_what_to_do(daemon: Daemon) -> None:
    out = daemon.cli("logs")
    assert out.returncode == 1
    assert out.stderr.startswith("error LOGS:") and "log_file" in out.stderr


class Follower:
    """`stepvisor logs -f ...` running, read line by line with a deadline."""

    def __init__(self, daemon: Daemon, *args: str) -> None:
        cmd = [sys.executable, "-m", "stepvisor.cli", "--socket", daemon.endpoint, "logs", "-f"]
        self.proc = subprocess.Popen(
            [*cmd, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.buffer = b""

    def lines(self, timeout_s: float) -> Iterator[str]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                yield line.decode()
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                self.buffer += chunk

    def wait_for(self, text: str, timeout_s: float = 30.0) -> str:
        for line in self.lines(timeout_s):
            if text in line:
                return line
        raise AssertionError(f"`logs -f` printed no line with {text!r} in {timeout_s} s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_follow_sees_a_new_activation_and_survives_rotation(logged: Daemon) -> None:
    follower = Follower(logged, "--tenant", "acme")
    try:
        follower.wait_for("code.deployed")  # what was there already
        say(logged, "acme", "live", "new line while following")
        assert "acme/live#" in follower.wait_for("[say it] stdout: new line while following")
        follower.wait_for("activation.finished outcome=ok")

        log = Path(logged.client().info()["log_file"])
        log.rename(log.with_suffix(".1"))  # logrotate, then its postrotate: SIGHUP
        assert logged.proc is not None
        logged.proc.send_signal(signal.SIGHUP)
        wait_for(log.exists, 30, "the supervisor to reopen its log file")
        say(logged, "acme", "rotated", "after rotation")
        follower.wait_for("[say it] stdout: after rotation")
    finally:
        follower.stop()
