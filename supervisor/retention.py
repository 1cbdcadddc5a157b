"""Retention: finished instances are deleted, with their journal, events and activation records,
`retention_days` (per tenant) after they finished; usage roll-ups stay. The loop deletes in small
batches so no tick is held up, and after the tick's commit hands the freed pages back with an
incremental vacuum on SQLite (`journal.give_back_space`, VACUUM_PAGES at a time)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from supervisor import journal as j
from supervisor.config import Config
from supervisor.journal.db import Db

BATCH = 200  # instances (or inspection records) deleted per pass
SOON_S = 0.05  # between passes while a backlog lasts: other work goes first
VACUUM_PAGES = 2_000  # pages given back per pass (8 MiB at 4 KiB pages)


@dataclass
class Pass:
    instances: int = 0
    inspections: int = 0

    @property
    def full(self) -> bool:
        """More may be waiting: the pass stopped at its batch size."""
        return self.instances + self.inspections >= BATCH


def collect(conn: Db, cfg: Config, tenants: Iterable[str], now: float) -> Pass:
    """One pass over the tenants, at most BATCH deletions in all."""
    done = Pass()
    for tenant in tenants:
        days = cfg.limits_for(tenant).retention_days
        if days <= 0:
            continue
        cutoff = now - days * 86_400
        for iid in j.expired_instances(conn, tenant, cutoff, BATCH - done.instances):
            j.delete_instance(conn, tenant, iid)
            done.instances += 1
        room = BATCH - done.instances - done.inspections
        if room > 0:
            done.inspections += j.delete_inspections(conn, tenant, cutoff, room)
        if done.full:
            break
    return done
