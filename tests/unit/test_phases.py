"""Activation.phases: the record's timing breakdown, from the supervisor's clock readings and the
activation's own marks (one CLOCK_MONOTONIC for every process on the host)."""

from __future__ import annotations

from protocol.messages import Marks
from supervisor.activation import PHASES, Activation
from supervisor.config import Limits


def activation(**times: float) -> Activation:
    act = Activation(
        aid=1,
        token="t" * 32,
        tenant="acme",
        kind="run",
        instance="i",
        limits=Limits(),
        scratch="/nonexistent",
        launched_at=0.0,
        launched_mono=10.0,
        deadline_mono=100.0,
    )
    for name, value in times.items():
        setattr(act, name, value)
    return act


def test_phases_split_launch_to_reap_in_order() -> None:
    act = activation(hello_mono=10.004, result_mono=10.009, committed_mono=10.0095)
    act.marks = Marks(started=10.001, hello=10.003, activated=10.005, replayed=10.006, done=10.008)
    phases = act.phases(10.011)
    assert phases is not None
    assert list(phases) == list(PHASES)
    assert phases["launch"] == 1.0
    assert phases["setup"] == 2.0
    assert phases["reap"] == 1.5
    assert round(sum(phases.values()), 6) == 11.0


def test_no_phases_without_marks_or_with_marks_out_of_order() -> None:
    crashed = activation(hello_mono=10.004)
    assert crashed.phases(10.02) is None
    forged = activation(hello_mono=10.004, result_mono=10.009, committed_mono=10.0095)
    forged.marks = Marks(started=10.001, hello=10.003, activated=9.0, replayed=1e9, done=10.008)
    assert forged.phases(10.011) is None
    nan = activation(hello_mono=10.004, result_mono=10.009, committed_mono=10.0095)
    nan.marks = Marks(
        started=10.001, hello=10.003, activated=float("nan"), replayed=10.006, done=10.008
    )
    assert nan.phases(10.011) is None
