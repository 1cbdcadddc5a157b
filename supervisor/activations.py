"""Every activation of this supervisor, from launch to reap, and the slots they hold.

An activation holds a concurrency slot (the node's `max_activations` and its tenant's
`max_concurrent`) from when it has a step (at launch, or when a prepared one is given one) until
its fate is settled: once its result is journaled it only exits, and the instance's next step need
not wait for that. From settled to reaped it is *exiting*, counted per tenant: a tenant whose
processes linger after their results (until `settled_grace_s` kills them) holds back its own
launches only. The supervisor's loop is the only caller; the counts change here and nowhere else.
"""

from __future__ import annotations

from collections import Counter

from supervisor.activation import SETTLED, Activation


class Activations:
    def __init__(self) -> None:
        self._by_token: dict[str, Activation] = {}
        self._by_pid: dict[int, Activation] = {}
        self._per_tenant: Counter[str] = Counter()
        self._exiting: Counter[str] = Counter()
        self.active = 0  # activations holding a slot: with a step, not settled yet

    def __len__(self) -> int:
        return len(self._by_token)

    def __contains__(self, act: Activation) -> bool:
        return self._by_token.get(act.token) is act

    def get(self, token: str) -> Activation | None:
        return self._by_token.get(token)

    def all(self) -> list[Activation]:
        """A snapshot: safe to settle or forget activations while walking it."""
        return list(self._by_token.values())

    def with_pid(self) -> list[tuple[int, Activation]]:
        """Those whose process is known, with its pid (a snapshot)."""
        return list(self._by_pid.items())

    def has_pid(self, pid: int) -> bool:
        return pid in self._by_pid

    def running(self, tenant: str) -> int:
        """The tenant's activations holding a slot."""
        return self._per_tenant[tenant]

    def exiting(self, tenant: str) -> int:
        return self._exiting[tenant]

    def add(self, act: Activation, *, with_step: bool) -> None:
        """A launch; `with_step` unless it is prepared ahead (it takes a slot once given one)."""
        self._by_token[act.token] = act
        if with_step:
            self.hold_slot(act)

    def hold_slot(self, act: Activation) -> None:
        self.active += 1
        self._per_tenant[act.tenant] += 1

    def started(self, act: Activation) -> None:
        """Its process exists: reaped by pid from now on."""
        self._by_pid[act.pid] = act

    def settled(self, act: Activation, *, held_slot: bool) -> None:
        """Its fate is decided (the caller set it): its slot is free, its process is exiting."""
        if held_slot:
            self.active -= 1
            self._per_tenant[act.tenant] -= 1
        self._exiting[act.tenant] += 1

    def forget(self, act: Activation) -> None:
        """Reaped, or never started: nothing of it is left to count. Once only."""
        if self._by_token.get(act.token) is not act:
            return
        del self._by_token[act.token]
        self._by_pid.pop(act.pid, None)
        if act.state == SETTLED:
            self._exiting[act.tenant] -= 1

    def drop_pid(self, pid: int) -> None:
        """Reaped without a record (the database is gone: `Reaper.kill_all`)."""
        self._by_pid.pop(pid, None)

    def any_pid(self) -> bool:
        return bool(self._by_pid)
