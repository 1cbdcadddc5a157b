"""Prepared activations: processes launched for a tenant before any of its steps is due.

A step's activation spends most of its start-up (fork, joining the tenant's cgroups, namespaces,
dropping to a sandbox uid, Landlock, connecting) before it needs to know which instance it runs.
A tenant with steady work gets `prepared_per_tenant` activations launched ahead: each goes
through all of that and says Hello, then waits. When one of the tenant's steps falls due, the
supervisor gives it that instance (the Activate it waits for) instead of starting a process, so
the step does not wait for one. It is still a fresh process for exactly one command, of that
tenant only.

This object only keeps the books (which wait, per tenant, and when to want one); the supervisor
starts, binds and stops the processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from supervisor.activation import Activation
from supervisor.config import Limits


@dataclass
class Tally:
    """Prepared activations since start: made, given a step, stopped unused."""

    made: int = 0
    used: int = 0
    unused: int = 0


@dataclass
class Prepared:
    waiting: dict[str, list[Activation]] = field(default_factory=dict)
    tally: Tally = field(default_factory=Tally)
    _last_launch: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(acts) for acts in self.waiting.values())

    def launched(self, tenant: str, mono: float, idle_s: float) -> bool:
        """A step of `tenant` was just given a process (prepared or not): whether its work is
        steady enough to prepare for its next steps, that is whether its previous launch came
        within `idle_s`. A tenant that starts a step now and then would pay for processes that
        mostly go unused."""
        last = self._last_launch.get(tenant, -math.inf)
        self._last_launch[tenant] = mono
        return mono - last <= idle_s

    def missing(self, tenant: str, per_tenant: int) -> int:
        """How many more to launch for `tenant` to have `per_tenant` waiting."""
        return max(0, per_tenant - len(self.waiting.get(tenant, ())))

    def add(self, act: Activation) -> None:
        self.waiting.setdefault(act.tenant, []).append(act)
        self.tally.made += 1

    def take(self, tenant: str, limits: Limits) -> tuple[Activation | None, list[Activation]]:
        """The tenant's longest-waiting prepared activation launched under `limits` (its
        rlimits, interpreter and sandbox were fixed then), no longer waiting; and those launched
        under other limits (before a reload), still waiting until they are stopped."""
        acts = self.waiting.get(tenant, [])
        stale = [a for a in acts if a.limits != limits]
        act = next((a for a in acts if a.limits == limits), None)
        if act is not None:
            acts.remove(act)
            if not acts:
                del self.waiting[tenant]
            self.tally.used += 1
        return act, stale

    def forget(self, act: Activation) -> None:
        """It ended without a step: idle too long, stale, given up for real work, or its
        process failed."""
        acts = self.waiting.get(act.tenant, [])
        if act in acts:
            acts.remove(act)
            if not acts:
                del self.waiting[act.tenant]
            self.tally.unused += 1

    def oldest(self, but: str | None = None) -> Activation | None:
        """The longest-waiting one of any tenant but `but`: what to give up when real work
        needs its slot or its uid."""
        acts = [a for tenant, acts in self.waiting.items() if tenant != but for a in acts]
        return min(acts, key=lambda a: a.launched_mono, default=None)

    def all(self) -> list[Activation]:
        return [a for acts in self.waiting.values() for a in acts]
