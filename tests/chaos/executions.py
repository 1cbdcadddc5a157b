"""Workflows for chaos tests.

`SRC`: every step execution leaves a line (instance, seq, a fresh token) in a log, so a test can
tell each run of a step from the journaled one: a journaled result must be the last execution's
token, and a step that was journaled must never run again. `GATED`: one journaled step, then a
step that leaves an `attempt-TOKEN` file (holding its pid) and waits for a `go` file."""

from __future__ import annotations

import textwrap
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from stepvisor import Client
from tests.conftest import wait_for

SRC = """
import os, time, uuid
from stepvisor import workflow

def work(log, iid, seq, pause):
    token = uuid.uuid4().hex
    with open(log, "a") as f:
        f.write(f"{iid} {seq} {token}\\n")
    time.sleep(pause)
    return token

@workflow("w")
def w(event, step):
    p = event.payload
    tokens = [step.do(f"s{i}", lambda i=i: work(p["log"], event.instance_id, i, p["pause"]))
              for i in range(p["steps"])]
    return tokens
"""


GATED = """
import os, time, uuid
from stepvisor import workflow

def gated(shared):
    token = uuid.uuid4().hex
    with open(os.path.join(shared, f"attempt-{token}"), "w") as f:
        f.write(str(os.getpid()))
    while not os.path.exists(os.path.join(shared, "go")):
        time.sleep(0.02)
    return token

@workflow("gated")
def w(event, step):
    first = step.do("first", lambda: "journaled first")
    return [first, step.do("gated", lambda: gated(event.payload), timeout=300)]
"""
GATED_SEQ = 1  # the gated step's


def start_gated(client: Client, shared: Path) -> tuple[str, int]:
    """Deploy GATED for tenant acme, create instance g, and wait until its gated step runs:
    (the attempt's token, its pid)."""
    client.deploy("acme", textwrap.dedent(GATED), filename="gated.py")
    client.create("acme", "gated", str(shared), id="g")
    [mark] = wait_for(lambda: list(shared.glob("attempt-*")), 60, "the gated step to start")
    pid = int(wait_for(mark.read_text, 10, "the attempt's pid"))
    return mark.name.removeprefix("attempt-"), pid


def make_log(shared: Path) -> Path:
    """Every activation has its own uid: the log must be writable by all of them."""
    log = shared / "executions.log"
    log.touch()
    log.chmod(0o666)
    return log


def executions(log: Path) -> dict[tuple[str, int], list[str]]:
    runs: dict[tuple[str, int], list[str]] = defaultdict(list)
    for line in log.read_text().splitlines():
        iid, seq, token = line.split()
        runs[(iid, int(seq))].append(token)
    return runs


class LeaseSampler:
    """The most instances of a tenant leased at once, sampled from the database (PostgreSQL)
    in a thread for as long as the `sampling` block runs."""

    def __init__(self, url: str, tenant: str) -> None:
        self.url, self.tenant = url, tenant
        self.most = 0
        self._done = threading.Event()

    def _run(self) -> None:
        sql = "SELECT COUNT(*) FROM instances WHERE tenant = %s AND lease IS NOT NULL"
        with psycopg.connect(self.url, autocommit=True) as pg:
            while not self._done.is_set():
                row = pg.execute(sql, (self.tenant,)).fetchone()
                self.most = max(self.most, row[0] if row else 0)

    @contextmanager
    def sampling(self) -> Iterator[LeaseSampler]:
        thread = threading.Thread(target=self._run)
        thread.start()
        try:
            yield self
        finally:
            self._done.set()
            thread.join()
