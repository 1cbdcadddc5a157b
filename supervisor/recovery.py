"""Recovery: at start, kill what this node's dead run left behind and re-run the steps it was
running; at any time, re-run the steps of another node whose lease lapsed. Journaled steps never
run again; an interrupted attempt does not count against its retries."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import psutil

from supervisor import engine, outcome
from supervisor import journal as j
from supervisor.config import Config
from supervisor.disk import ScratchSpace
from supervisor.isolation import Cgroups
from supervisor.journal.db import Db


def recover(
    conn: Db,
    cfg: Config,
    cgroups: Cgroups | None,
    scratch: ScratchSpace,
    node: str,
    *,
    with_uids: bool,
    log: Any,
) -> None:
    """Kill what this node's last run left behind; re-run interrupted steps, not journaled ones."""
    now = time.time()
    if cgroups is not None:
        killed = cgroups.sweep()
        if killed:
            log.info("recovery.killed_leftovers", processes=killed)
    with j.transaction(conn):
        leftovers = j.open_activations(conn, node)
        groups = {int(a["pid"]) for a in leftovers if a["pid"]}
        low, high = cfg.isolation.sandbox_uid_range
        for proc in psutil.process_iter(["pid", "uids"]) if groups else ():
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                if os.getpgid(proc.pid) not in groups or proc.pid == os.getpid():
                    continue
                # A group id the dead run recorded may have been reused since by a process
                # that is not ours: with sandbox uids, only kill what runs as one.
                if not with_uids or low <= proc.info["uids"].real <= high:
                    proc.kill()
        requeue(conn, node, now, "the supervisor stopped while it ran", log)
    # After the kills above: nothing of a dead run writes there any more.
    if unmounted := scratch.sweep():
        log.info("recovery.unmounted_scratch", mounts=unmounted)
    if leftovers:
        log.info("recovery.done", interrupted=len(leftovers))


def requeue(conn: Db, node: str, now: float, detail: str, log: Any) -> int:
    """Record `node`'s unfinished activations as interrupted and make the instances they held
    due again; how many there were. For this node's last run at start, and for a node fenced
    after its lease lapsed (whose processes, on its own host, are not ours to kill: its
    commits are fenced instead)."""
    leftovers = j.open_activations(conn, node)
    held = j.leased_instances(conn, node)  # before the activations' rows change
    for a in leftovers:
        j.update_activation(
            conn,
            a["id"],
            finished_at=now,
            outcome=a["outcome"] or outcome.INTERRUPTED,
            detail=a["detail"] or detail,
        )
    for inst in held:
        engine.interrupted(conn, inst["tenant"], inst["id"], now)
        log.info("recovery.requeued", tenant=inst["tenant"], instance=inst["id"], node=node)
    return len(leftovers)
