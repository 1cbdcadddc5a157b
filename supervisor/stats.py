"""Live figures for `stepvisor stats`: the activations that finished in the last minute, kept in
memory (bounded) and forgotten after, plus outcome counts since start. Nothing here is durable:
the durable roll-up for billing is the `usage` table (see `journal.add_usage`)."""

from __future__ import annotations

import math
from collections import Counter, deque
from typing import Any, NamedTuple

WINDOW_S = 60.0
MAX_SAMPLES = 200_000  # a minute at over 3,000 activations/s; beyond that the window shortens


class Sample(NamedTuple):
    mono: float
    tenant: str
    outcome: str
    cold_start_ms: float | None
    exec_ms: float | None


def percentiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50 / p95 / p99; None for an empty list."""
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    values = sorted(values)
    n = len(values)
    return {
        name: round(values[max(0, math.ceil(q * n) - 1)], 3)
        for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
    }


class Loop(NamedTuple):
    """What the supervisor's loop did since start: how well it batches. Per activation, a
    sequential workflow takes about four iterations and four commits; under load both fall, as
    one iteration handles several activations' messages and one commit journals them all."""

    iterations: int  # loop iterations (each one transaction)
    commits: int  # transactions that wrote something
    syncs: int  # fsyncs of the write-ahead log (synchronous = "acked")


class Stats:
    def __init__(self, started_mono: float) -> None:
        self.started = started_mono
        self.samples: deque[Sample] = deque(maxlen=MAX_SAMPLES)
        self.since_start: Counter[tuple[str, str]] = Counter()  # (tenant, outcome) → count
        self.loop = Loop(0, 0, 0)

    def iterated(self, *, wrote: bool, synced: bool) -> None:
        it, commits, syncs = self.loop
        self.loop = Loop(it + 1, commits + wrote, syncs + synced)

    def record(
        self,
        mono: float,
        tenant: str,
        outcome: str | None,
        cold_start_ms: float | None,
        exec_ms: float | None,
    ) -> None:
        how = outcome or "unknown"
        self.samples.append(Sample(mono, tenant, how, cold_start_ms, exec_ms))
        self.since_start[tenant, how] += 1

    def window(self, mono: float) -> dict[str, Any]:
        """Rates, latency percentiles and failures over the last WINDOW_S (or since start)."""
        self._forget_old(mono)
        return self.summary(mono, list(self.samples))

    def by_tenant(self, mono: float) -> dict[str, dict[str, Any]]:
        """`window` for every tenant with activations in it, in one pass over the samples."""
        self._forget_old(mono)
        groups: dict[str, list[Sample]] = {}
        for s in self.samples:
            groups.setdefault(s.tenant, []).append(s)
        return {tenant: self.summary(mono, picked) for tenant, picked in groups.items()}

    def _forget_old(self, mono: float) -> None:
        while self.samples and self.samples[0].mono < mono - WINDOW_S:
            self.samples.popleft()

    def summary(self, mono: float, picked: list[Sample]) -> dict[str, Any]:
        span = max(1e-3, min(WINDOW_S, mono - self.started))
        failures = Counter(s.outcome for s in picked if s.outcome != "ok")
        return {
            "activations": len(picked),
            "activations_per_s": round(len(picked) / span, 2),
            "cold_start_ms": percentiles([s.cold_start_ms for s in picked if s.cold_start_ms]),
            "exec_ms": percentiles([s.exec_ms for s in picked if s.exec_ms is not None]),
            "failures": dict(sorted(failures.items())),
        }

    def failures_since_start(self, tenant: str | None = None) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (who, how), n in self.since_start.items():
            if how != "ok" and (tenant is None or who == tenant):
                out[how] += n
        return dict(sorted(out.items()))

    def tenants(self) -> set[str]:
        return {who for who, _ in self.since_start}
