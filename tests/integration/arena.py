"""The escape arena: a real supervisor with an attacking tenant `evil` and a `victim` tenant that
must not notice. Escape tests (test_escapes*.py) take the `arena` fixture from conftest.py."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from stepvisor import Client
from tests.conftest import Daemon, deploy_source, wait_for

ATTACKER = """
from stepvisor import workflow

@workflow("attack")
def attack(event, step):
    def run():
        scope = {"params": event.payload}
        exec(event.payload["code"], scope)
        return scope.get("result")
    return step.do("attack", run, retries={"limit": 0}, timeout=event.payload.get("timeout", 60))
"""

VICTIM = """
from stepvisor import workflow

@workflow("keep")
def keep(event, step):
    secret = step.do("remember", lambda: {"secret": "victim-data"})
    step.wait_for_event("go", type="go", timeout=600)
    return secret
"""


class Arena:
    """A supervisor with an attacking tenant `evil` and a tenant `victim` that must not notice."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.client: Client = daemon.client(timeout_s=60)
        deploy_source(self.client, "evil", ATTACKER)
        deploy_source(self.client, "victim", VICTIM)
        self.client.create("victim", "keep", id="v1")
        wait_for(lambda: self.client.status("victim", "v1")["status"] == "waiting", 30, "victim")
        self.layers = {e["layer"] for e in daemon.events("isolation.layer")}

    def need(self, *any_of: str) -> None:
        if not self.layers & set(any_of):
            missing = " or ".join(any_of)
            pytest.skip(f"isolation layer {missing} is not available on this host")

    def attack(self, code: str, iid: str = "a", **params: Any) -> dict[str, Any]:
        payload = {"code": textwrap.dedent(code), **params}
        self.client.create("evil", "attack", payload, id=iid)
        return self.client.wait("evil", iid, timeout_s=120)

    def outcomes(self, iid: str = "a") -> list[str]:
        return [a["outcome"] for a in self.client.history("evil", iid)["activations"]]

    def assert_unharmed(self) -> None:
        assert self.daemon.alive()
        st = self.client.status("victim", "v1")
        assert st["status"] == "waiting"
        self.client.send_event("victim", "v1", "go")
        st = self.client.wait("victim", "v1", timeout_s=60)
        assert st["output"] == {"secret": "victim-data"}
