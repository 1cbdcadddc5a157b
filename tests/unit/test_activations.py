"""supervisor.activations: the slots activations hold from launch to reap."""

from __future__ import annotations

from supervisor.activation import SETTLED, Activation
from supervisor.activations import Activations
from supervisor.config import Limits


def act(aid: int, tenant: str = "acme", *, prepared: bool = False) -> Activation:
    return Activation(
        aid=aid,
        token=f"t{aid}",
        tenant=tenant,
        kind="run",
        instance=None if prepared else f"i{aid}",
        limits=Limits(),
        scratch="",
        launched_at=0.0,
        launched_mono=0.0,
        deadline_mono=0.0,
        prepared=prepared,
    )


def settle(acts: Activations, a: Activation, *, held_slot: bool = True) -> None:
    a.state = SETTLED
    acts.settled(a, held_slot=held_slot)


def test_a_slot_is_held_from_the_step_to_the_settlement_and_the_process_until_reaped() -> None:
    acts = Activations()
    a, b = act(1), act(2, "beta")
    acts.add(a, with_step=True)
    acts.add(b, with_step=True)
    assert (acts.active, acts.running("acme"), acts.running("beta"), len(acts)) == (2, 1, 1, 2)
    settle(acts, a)
    assert (acts.active, acts.running("acme"), acts.exiting("acme"), len(acts)) == (1, 0, 1, 2)
    a.pid = 4242
    acts.started(a)
    assert acts.has_pid(4242) and [x for _, x in acts.with_pid()] == [a]
    acts.forget(a)
    assert (acts.exiting("acme"), len(acts), acts.any_pid(), a in acts) == (0, 1, False, False)
    assert acts.get("t2") is b and acts.get("t1") is None


def test_a_prepared_activation_takes_its_slot_only_when_given_a_step() -> None:
    acts = Activations()
    p, q = act(1, prepared=True), act(2, prepared=True)
    acts.add(p, with_step=False)
    acts.add(q, with_step=False)
    assert (acts.active, acts.running("acme"), len(acts)) == (0, 0, 2)
    acts.hold_slot(p)
    assert (acts.active, acts.running("acme")) == (1, 1)
    settle(acts, p)
    settle(acts, q, held_slot=False)  # stopped unused: it never held one
    assert (acts.active, acts.running("acme"), acts.exiting("acme")) == (0, 0, 2)
    for x in acts.all():
        acts.forget(x)
    assert (len(acts), acts.exiting("acme")) == (0, 0)


def test_an_activation_forgotten_twice_is_uncounted_once() -> None:
    acts = Activations()
    a = act(1)
    acts.add(a, with_step=True)
    settle(acts, a)
    acts.forget(a)
    acts.forget(a)  # twice (a failed launch, then its cleanup): counted once
    assert acts.exiting("acme") == 0
