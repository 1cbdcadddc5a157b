"""An activation's record once its process is gone: its row, its tenant's usage roll-up, the live
stats and its one canonical log line."""

from __future__ import annotations

import os
from typing import Any

import orjson

from supervisor import disk, outcome
from supervisor import journal as j
from supervisor.activation import Activation
from supervisor.journal.db import Db
from supervisor.stats import Stats


def finish(
    conn: Db, stats: Stats, act: Activation, status: int | None, usage: Any, now: float, mono: float
) -> None:
    """Record how `act` went: `status` and `usage` from wait4 (None when there was no process
    to reap), `mono` when it was reaped."""

    def ms(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round((b - a) * 1000, 3)

    # A prepared activation's process started (cold) before its step was given to it: its
    # execution counts from then, and the tenant is not billed for the wait.
    parked_ms = ms(act.hello_mono, act.step_began) or 0.0
    record = {
        "cold_start_ms": ms(act.launched_mono, act.hello_mono),
        "exec_ms": ms(act.step_began, act.settled_mono),
        "total_ms": ms(act.launched_mono, mono),
        "cpu_ms": round((usage.ru_utime + usage.ru_stime) * 1000, 3) if usage else None,
        "max_rss_kib": int(usage.ru_maxrss) if usage else None,
    }
    phases = act.phases(mono)
    # What its scratch holds now that it has exited (not its peak): measured per activation,
    # where the tenant's tmpfs (statvfs) would sum its concurrent activations.
    scratch_bytes, act.scratch_entries = disk.scratch_bytes(act.scratch)
    scratch_kib = scratch_bytes // 1024
    if not act.unbound:  # one that never got a step did no work of the tenant's
        j.add_usage(
            conn,
            act.tenant,
            act.launched_at,
            step=act.step is not None,
            failed=act.outcome != outcome.OK,
            cpu_ms=record["cpu_ms"] or 0.0,
            wall_ms=max(0.0, (record["total_ms"] or 0.0) - parked_ms),
            max_rss_kib=int(record["max_rss_kib"] or 0),
            scratch_kib=scratch_kib,
        )
    if act.outcome != outcome.UNUSED:
        stats.record(mono, act.tenant, act.outcome, record["cold_start_ms"], record["exec_ms"])
    j.update_activation(
        conn,
        act.aid,
        finished_at=now,
        exit_code=None if status is None else os.waitstatus_to_exitcode(status),
        phases=None if phases is None else orjson.dumps(phases).decode(),
        **record,
    )
    act.log.info(
        "activation.finished",
        pid=act.pid,
        kind=act.kind,
        seq=act.seq,
        step=act.step,
        outcome=act.outcome,
        detail=act.detail or None,
        **record,
        scratch_kib=scratch_kib,
        phases=phases,
        output_dropped_bytes=act.output_dropped or None,
    )
