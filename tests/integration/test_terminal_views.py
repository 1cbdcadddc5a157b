"""`stepvisor show` and `stepvisor top` in a real terminal: tmux runs them, capture-pane reads
what a user would see."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, wait_for

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

WORKFLOW = """
from stepvisor import workflow

def flaky(ctx):
    if ctx.attempt < 3:
        raise ConnectionError(f"warehouse busy (attempt {ctx.attempt})")
    return {"rows": 3}

@workflow("report")
def report(event, step):
    rows = step.do("fetch rows", flaky, retries={"limit": 4, "delay": 0.05})
    step.sleep("cool down", 0.05)
    done = step.invoke("summarise", "child", rows["rows"])
    raise KeyError("no [bold]region[/bold] \\x1b[2J here")

@workflow("child")
def child(event, step):
    return step.do("double", lambda: event.payload * 2)
"""


class Tmux:
    """A private tmux server (its own socket) running one command in a 120x40 terminal."""

    def __init__(self, name: str) -> None:
        self.base = ["tmux", "-L", name]

    def run(self, *command: str) -> None:
        subprocess.run(
            [*self.base, "new-session", "-d", "-s", "t", "-x", "120", "-y", "40", *command],
            check=True,
        )
        subprocess.run([*self.base, "set-option", "-t", "t", "remain-on-exit", "on"], check=True)

    def screen(self, colours: bool = False) -> str:
        """The pane, scrolled-back lines included."""
        args = [*self.base, "capture-pane", "-p", "-S", "-", "-t", "t"] + (
            ["-e"] if colours else []
        )
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "t", *keys], check=True)

    def exited(self) -> bool:
        out = subprocess.run(
            [*self.base, "display-message", "-p", "-t", "t", "#{pane_dead}"],
            capture_output=True,
            text=True,
        )
        return out.stdout.strip() == "1"

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


@pytest.fixture
def tmux(tmp_short: Path) -> Iterator[Tmux]:
    t = Tmux(f"sv-{tmp_short.name}")
    yield t
    t.kill()


def cli(daemon: Daemon, *args: str) -> list[str]:
    return [sys.executable, "-m", "stepvisor.cli", "--socket", daemon.endpoint, *args]


def test_show_draws_the_timeline_in_a_terminal(daemon: Daemon, tmux: Tmux) -> None:
    c = daemon.client()
    c.deploy("acme", textwrap.dedent(WORKFLOW))
    c.create("acme", "report", id="r1")
    assert c.wait("acme", "r1", timeout_s=30)["status"] == "errored"
    tmux.run(*cli(daemon, "show", "acme", "r1"))
    wait_for(tmux.exited, 30, "show to draw and exit")
    screen = tmux.screen()
    assert "acme/r1" in screen and "errored" in screen
    assert "fetch rows" in screen and "3 tries" in screen
    assert "attempt 1 failed" in screen and "warehouse busy (attempt 1)" in screen
    assert "attempt 2 failed" in screen  # kept, though the third attempt succeeded
    assert '→ {"rows": 3}' in screen
    assert "cool down" in screen and "until " in screen
    assert "summarise" in screen and "child r1-2" in screen and "→ 6" in screen
    assert "cold/exec ms" in screen and "activations" in screen
    # the tenant's traceback with its source line; its markup and escape stay inert text
    assert 'raise KeyError("no [bold]region[/bold] \\x1b[2J here")' in screen
    coloured = tmux.screen(colours=True)
    assert "\x1b[" in coloured  # a terminal gets colours
    assert "\x1b[2J" not in coloured  # never the tenant's own escape sequence


def test_top_shows_tenants_live_and_quits_on_q(daemon: Daemon, tmux: Tmux) -> None:
    c = daemon.client()
    c.deploy("acme", textwrap.dedent(WORKFLOW))
    c.create("acme", "report", id="r1")
    c.wait("acme", "r1", timeout_s=30)
    tmux.run(*cli(daemon, "top", "--interval", "0.2"))
    wait_for(lambda: "acme" in tmux.screen() and "act/s" in tmux.screen(), 30, "top's table")
    screen = tmux.screen()
    assert "stepvisor top" in screen
    assert "cold start p50/p95/p99" in screen
    assert "errored 1" in screen  # acme's instances by status, from the stats API
    c.create("acme", "child", 5, id="later")
    c.wait("acme", "later", timeout_s=30)
    wait_for(lambda: "complete 2" in tmux.screen(), 30, "the refresh to show the new instance")
    tmux.keys("q")
    wait_for(tmux.exited, 30, "top to quit on q")
