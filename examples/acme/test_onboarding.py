"""Testing acme's onboarding workflow with plain pytest: `pytest examples/`.

`stepvisor.testing` runs the workflow in this process, with the replay code an activation runs and
the supervisor's own journaling, on a simulated clock: the retries' backoff, the grace period and
the hour-long wait for confirmation pass at once.
"""

from pathlib import Path

import pytest

from stepvisor.testing import Crash, WorkflowEnv, WorkflowFailed

HERE = Path(__file__).parent


@pytest.fixture
def env():
    with WorkflowEnv.from_file(HERE / "onboarding.py", tenant="acme") as env:
        yield env


def test_a_confirmed_signup(env):
    run = env.start("onboard", {"email": "ann@example.com"})
    assert run.run_until_waiting() == "confirm"  # the grace period passed on the simulated clock
    run.send_event("email-confirmed", {"at": "2030-01-01T10:00:00Z"})
    assert run.result() == {
        "account": {"account": "ann", "plan": "trial"},
        "confirmed_at": "2030-01-01T10:00:00Z",
    }
    assert [e.name for e in run.journal] == [
        "create account",
        "send welcome mail",
        "grace period",
        "confirm",
    ]


def test_account_creation_survives_an_outage_and_a_crash(env):
    run = env.start("onboard", {"email": "bob@example.com"})
    run.fail_step("create account", attempts=[1], error=ConnectionError("directory down"))
    run.fail_step("create account", attempts=[2], error=Crash("oom"))
    run.send_event("email-confirmed", {"at": "later"}, after=3600 - 60)
    assert run.result()["confirmed_at"] == "later"
    step = run.entry("create account")
    assert step.attempts == 3
    assert [e.type for e in step.failed_attempts] == ["ConnectionError", "OutOfMemory"]


def test_a_bad_address_is_not_retried(env):
    with pytest.raises(WorkflowFailed, match="not an email address"):
        env.run("onboard", {"email": "nobody"})


def test_no_confirmation_within_the_hour_fails_the_signup(env):
    run = env.start("onboard", {"email": "cy@example.com"})
    with pytest.raises(WorkflowFailed, match="WaitTimeout"):
        run.result()
    assert run.entry("confirm").status == "timeout"
