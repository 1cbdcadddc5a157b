"""Changing code under in-flight instances: deploy --check, upgrade, replay, workflows."""

from __future__ import annotations

import json

import pytest

from stepvisor.client import StepVisorError
from tests.conftest import Daemon, deploy_source, wait_for, writable

V1 = """
from stepvisor import workflow

@workflow("order")
def order(event, step):
    a = step.do("reserve", lambda: "reserved")
    paid = step.wait_for_event("paid", type="paid", timeout=600)
    b = step.do("ship", lambda: "shipped")
    return [a, paid["payload"], b]
"""

# Compatible: the journaled prefix is asked for in the same order; the new step comes after.
ADDED_AFTER = V1.replace(
    'return [a, paid["payload"], b]', 'c = step.do("notify", lambda: "told")\n    return [a, b, c]'
)
RENAMED = V1.replace('"reserve"', '"hold stock"')
REORDERED = """
from stepvisor import workflow

@workflow("order")
def order(event, step):
    paid = step.wait_for_event("paid", type="paid", timeout=600)
    a = step.do("reserve", lambda: "reserved")
    return [a, paid["payload"]]
"""
REMOVED = V1.replace('a = step.do("reserve", lambda: "reserved")', 'a = "none"')


def waiting_instances(daemon: Daemon, *ids: str) -> None:
    c = daemon.client()
    for iid in ids:
        c.create("shop", "order", id=iid)
    for iid in ids:
        wait_for(lambda i=iid: c.status("shop", i)["status"] == "waiting", 30, f"{iid} to wait")


def verdicts(report: dict) -> dict[str, tuple[str, int]]:
    return {c["instance"]: (c["verdict"], c["replayed"]) for c in report["checked"]}


def test_deploy_check_catches_renamed_reordered_and_removed_steps(daemon: Daemon) -> None:
    c = daemon.client()
    v1 = deploy_source(c, "shop", V1)["version"]
    waiting_instances(daemon, "o1", "o2")

    ok = c.deploy("shop", ADDED_AFTER, check=True)
    assert ok["compatible"] is True and ok["deployed"] is False
    assert verdicts(ok) == {"o1": ("compatible", 2), "o2": ("compatible", 2)}
    assert "wait_event 'paid'" in ok["checked"][0]["message"]

    for source, seq in ((RENAMED, 0), (REORDERED, 0), (REMOVED, 0)):
        bad = c.deploy("shop", source, check=True)
        assert bad["compatible"] is False
        assert verdicts(bad) == {"o1": ("nondeterministic", seq), "o2": ("nondeterministic", seq)}
        assert "the journal holds step 'reserve'" in bad["checked"][0]["message"]

    # Nothing was deployed, and nothing ran: the instances still wait, on the first version.
    assert c.workflows("shop")["deployments"] == {"order": v1}
    for iid in ("o1", "o2"):
        st = c.status("shop", iid)
        assert (st["status"], st["version"]) == ("waiting", v1)


def test_a_check_runs_no_step_and_reports_code_that_fails_to_load(make_daemon, shared) -> None:
    daemon = make_daemon(writable(shared))  # a step that ran could write there
    c = daemon.client()
    deploy_source(c, "shop", V1)
    waiting_instances(daemon, "o1")
    with pytest.raises(StepVisorError) as exc:
        c.deploy("shop", "import no_such_module\n" + V1, check=True)
    assert exc.value.code == "DEPLOY_FAILED" and "no_such_module" in exc.value.message
    # The new step would write a file if it ran: it must not, the check stops before it.
    marker = shared / "ran"
    eager = V1.replace(
        '"shipped")', f'"shipped")\n    step.do("mark", lambda: open({str(marker)!r}, "w"))'
    )
    assert c.deploy("shop", eager, check=True)["compatible"]
    c.send_event("shop", "o1", "paid", 5)
    assert c.wait("shop", "o1", timeout_s=30)["output"] == ["reserved", 5, "shipped"]
    assert not marker.exists()


def test_upgrade_moves_only_instances_whose_check_passes(daemon: Daemon) -> None:
    c = daemon.client()
    v1 = deploy_source(c, "shop", V1)["version"]
    waiting_instances(daemon, "o1", "o2")
    v2 = deploy_source(c, "shop", ADDED_AFTER)["version"]
    assert c.status("shop", "o1")["version"] == v1  # a deploy never moves an instance

    listed = c.workflows("shop")
    by_version = {v["version"]: v for v in listed["versions"]}
    assert by_version[v1]["live_instances"] == 2 and by_version[v1]["current"] == []
    assert by_version[v2]["live_instances"] == 0 and by_version[v2]["current"] == ["order"]

    moved = c.upgrade("shop", "order")
    assert moved["version"] == v2 and moved["more"] is False
    assert {r["instance"]: r["upgrade"] for r in moved["checked"]} == {
        "o1": "upgraded",
        "o2": "upgraded",
    }
    c.send_event("shop", "o1", "paid", 1)
    assert c.wait("shop", "o1", timeout_s=30)["output"] == ["reserved", "shipped", "told"]

    # An incompatible version is refused per instance; the instance stays where it was.
    v3 = deploy_source(c, "shop", RENAMED)["version"]
    refused = c.upgrade("shop", "order", ["o2"], version=v3)
    (only,) = refused["checked"]
    assert (only["verdict"], only["upgrade"]) == ("nondeterministic", "refused")
    assert c.status("shop", "o2")["version"] == v2
    assert c.upgrade("shop", "order", version=v2)["checked"] == []  # none left to move

    with pytest.raises(StepVisorError) as exc:
        c.upgrade("shop", "order", ["o1"])  # complete: nothing to move
    assert exc.value.code == "INVALID_STATE"
    with pytest.raises(StepVisorError) as exc:
        c.upgrade("shop", "order", version="0123456789abcdef")
    assert exc.value.code == "NOT_FOUND"


def test_replay_in_a_sandbox_and_the_journal_for_a_local_one(daemon: Daemon) -> None:
    c = daemon.client()
    v1 = deploy_source(c, "shop", V1)["version"]
    waiting_instances(daemon, "o1")
    (own,) = c.replay("shop", "o1")["checked"]
    assert (own["verdict"], own["replayed"], own["steps"]) == ("compatible", 2, 2)
    v3 = deploy_source(c, "shop", RENAMED)["version"]
    (other,) = c.replay("shop", "o1", version=v3)["checked"]
    assert other["verdict"] == "nondeterministic"
    data = c.journal("shop", "o1")
    assert (data["workflow"], data["version"]) == ("order", v1)
    assert [(e.kind, e.name, e.status) for e in data["journal"]] == [
        ("step", "reserve", "ok"),
        ("wait_event", "paid", "waiting"),
    ]


def test_the_commands_as_a_user_runs_them(daemon: Daemon, tmp_path) -> None:
    c = daemon.client()
    v1 = deploy_source(c, "shop", V1)["version"]
    waiting_instances(daemon, "o1", "o2")
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text(ADDED_AFTER)
    bad.write_text(RENAMED)

    r = daemon.cli("deploy", "shop", str(bad), "--check")
    assert r.returncode == 1, r.stderr  # `--check && deploy` stops here
    assert "BREAKS  o1" in r.stdout and "2 would break" in r.stdout
    assert "the journal holds step 'reserve'" in r.stdout
    r = daemon.cli("deploy", "shop", str(good), "--check", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["compatible"] is True
    r = daemon.cli("deploy", "newcomer", str(good), "--check")  # a first deploy, checked
    assert r.returncode == 0, r.stderr
    assert "checked 0 instance(s) of order" in r.stdout
    assert daemon.cli("workflows", "newcomer").returncode == 1  # and nothing deployed

    r = daemon.cli("replay", "shop", "o1")
    assert r.returncode == 0, r.stderr
    assert 'replayed #0    step       reserve: "reserved"' in r.stdout
    assert "ok: goes on with wait_event 'paid' at seq 1" in r.stdout
    r = daemon.cli("replay", "shop", "o1", "--file", str(bad))  # here, against the user's file
    assert r.returncode == 1
    assert (
        "in this process" in r.stdout and "BREAKS: replay asked for step 'hold stock'" in r.stdout
    )

    v2 = daemon.cli("deploy", "shop", str(good)).stdout.split()[-1]
    r = daemon.cli("workflows", "shop")
    assert r.returncode == 0, r.stderr
    assert f"{v2}" in r.stdout and "order*" in r.stdout and v1 in r.stdout
    r = daemon.cli("upgrade", "shop", "--all", "order")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "upgraded 2 of 2" in r.stdout
    assert c.status("shop", "o2")["version"] == v2

    c.send_event("shop", "o1", "paid", 1)
    c.wait("shop", "o1", timeout_s=30)
    r = daemon.cli("restart", "shop", "o1", "--from", "ship")
    assert r.returncode == 0, r.stderr
    assert c.wait("shop", "o1", timeout_s=30)["output"] == ["reserved", "shipped", "told"]
    assert [e["name"] for e in c.history("shop", "o1")["entries"]] == [
        "reserve",
        "paid",
        "ship",
        "notify",
    ]
    r = daemon.cli("upgrade", "shop", "order")  # which instances?
    assert r.returncode == 2 and "give the instance ids or --all" in r.stderr
