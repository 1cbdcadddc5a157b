"""A workflow whose every step execution leaves a line (instance, seq, a fresh token) in a log,
so a chaos test can tell each run of a step from the journaled one: a journaled result must be
the last execution's token, and a step that was journaled must never run again."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

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
