"""The remote tcp:// API with CURVE keys: each tenant key acts for its own tenant only, an admin
key for all; no key, an unknown key, a wrong server key or a revoked key get nothing, and the
supervisor logs each refusal."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from stepvisor.client import Client, StepVisorError
from tests.conftest import Daemon, deploy_source, wait_for

SRC = """
from stepvisor import workflow

@workflow("w")
def w(event, step):
    return step.do("one", lambda: event.payload)
"""


class Remote:
    """A supervisor with a tcp:// API; keys made over the local (admin) socket."""

    def __init__(self, daemon: Daemon, tmp: Path) -> None:
        self.daemon, self.tmp = daemon, tmp
        self.local = daemon.client()
        self.endpoint = self.local.info()["tcp"]
        assert self.endpoint.startswith("tcp://127.0.0.1:")
        self.clients: list[Client] = []

    def key(self, tenant: str | None) -> dict[str, Any]:
        out = self.tmp / f"{tenant or 'admin'}-{len(self.clients)}.key"
        args = ["keys", "new", tenant] if tenant else ["keys", "new", "--admin"]
        done = self.daemon.cli(*args, "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        key: dict[str, Any] = json.loads(out.read_text())
        assert key["endpoint"] == self.endpoint and key["tenant"] == tenant
        return key

    def client(self, credentials: dict[str, Any] | None) -> Client:
        c = Client(self.endpoint, timeout_s=10, credentials=credentials)
        self.clients.append(c)
        return c


@pytest.fixture
def remote(make_daemon: Callable[..., Daemon], tmp_short: Path) -> Iterator[Remote]:
    daemon = make_daemon(server='tcp_endpoint = "tcp://127.0.0.1:*"\n')
    r = Remote(daemon, tmp_short)
    yield r
    for c in r.clients:
        c.close()


def refused(c: Client) -> StepVisorError:
    with pytest.raises(StepVisorError) as err:
        c.ping()
    return err.value


def test_a_tenant_key_acts_for_its_own_tenant_only(remote: Remote) -> None:
    a = remote.client(remote.key("a"))
    b = remote.client(remote.key("b"))
    deploy_source(a, "a", SRC)
    deploy_source(b, "b", SRC)
    a.create("a", "w", "mine", id="x")
    b.create("b", "w", "secret of b", id="x")
    assert a.wait("a", "x", timeout_s=60)["output"] == "mine"
    assert b.wait("b", "x", timeout_s=60)["output"] == "secret of b"

    attempts = [
        lambda: a.status("b", "x"),
        lambda: a.history("b", "x"),
        lambda: a.list("b"),
        lambda: a.create("b", "w", "planted", id="y"),
        lambda: a.send_event("b", "x", "go"),
        lambda: a.terminate("b", "x"),
        lambda: a.delete("b", "x"),
        lambda: deploy_source(a, "b", SRC),
        lambda: a.stats("b"),
        lambda: a.usage("b"),
        lambda: a.reload(),
        lambda: a.gc(),
        lambda: a.info(),
        lambda: a.new_key("a"),
        lambda: a.list_keys(),
    ]
    for attempt in attempts:
        with pytest.raises(StepVisorError) as err:
            attempt()
        assert err.value.code == "FORBIDDEN", attempt
    assert b.status("b", "x")["status"] == "complete"  # untouched
    assert [i["id"] for i in b.list("b")] == ["x"]  # nothing planted
    # Asking for everything means its own tenant.
    assert set(a.stats()["tenants"]) == {"a"}
    assert {r["tenant"] for r in a.usage()} == {"a"}
    assert remote.daemon.events("api.forbidden", tenant="a")


def test_an_admin_key_acts_for_every_tenant(remote: Remote) -> None:
    admin = remote.client(remote.key(None))
    for tenant in ("a", "b"):
        deploy_source(admin, tenant, SRC)
        admin.create(tenant, "w", tenant, id="x")
        assert admin.wait(tenant, "x", timeout_s=60)["output"] == tenant
    assert set(admin.stats()["tenants"]) == {"a", "b"}
    assert admin.gc() == {"instances": 0, "inspections": 0}


def test_no_key_an_unknown_key_and_a_wrong_server_key_are_refused(remote: Remote) -> None:
    err = refused(remote.client(None))
    assert err.code == "AUTH" and "needs a CURVE key" in err.message

    public, secret = (k.decode() for k in zmq.curve_keypair())
    stranger = {"server_key": remote.key("a")["server_key"], "public": public, "secret": secret}
    assert refused(remote.client(stranger)).code == "AUTH"
    wait_for(lambda: remote.daemon.events("api.auth_denied", key=public), 10, "the denial log")

    impostor_server = zmq.curve_keypair()[0].decode()
    wrong = {**remote.key("a"), "server_key": impostor_server}
    assert refused(remote.client(wrong)).code == "AUTH"
    wait_for(lambda: remote.daemon.events("api.handshake_failed"), 10, "the failure log")


def test_a_revoked_key_stops_working_on_an_open_connection(remote: Remote) -> None:
    key = remote.key("a")
    c = remote.client(key)
    assert c.ping()
    listed = {k["public"]: k for k in remote.local.list_keys()}
    assert listed[key["public"]]["tenant"] == "a" and "secret" not in listed[key["public"]]
    remote.local.revoke_key(key["public"])
    with pytest.raises(StepVisorError) as err:
        c.status("a", "x")
    assert err.value.code == "FORBIDDEN" and "revoked" in err.value.message
    assert refused(remote.client(key)).code == "AUTH"  # and no new connection either
    assert remote.daemon.cli("keys", "revoke", key["public"]).returncode == 1  # already


def test_the_cli_uses_a_key_file(remote: Remote) -> None:
    out = remote.tmp / "cli-a.key"
    assert remote.daemon.cli("keys", "new", "a", "--out", str(out)).returncode == 0
    again = remote.daemon.cli("keys", "new", "a", "--out", str(out))
    assert again.returncode == 2 and "not overwriting" in again.stderr
    src = remote.tmp / "wf.py"
    src.write_text(SRC)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stepvisor.cli", "--credentials", str(out), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert cli("deploy", "a", str(src)).returncode == 0  # endpoint from the key file
    denied = cli("deploy", "b", str(src))
    assert denied.returncode == 1 and denied.stderr.startswith("error FORBIDDEN:")


def test_a_bad_tcp_endpoint_is_a_config_error() -> None:
    from supervisor.config import ConfigError, parse

    with pytest.raises(ConfigError, match="tcp_endpoint"):
        parse('[server]\ntcp_endpoint = "udp://0.0.0.0:1"\n')
    assert parse('[server]\ntcp_endpoint = "tcp://0.0.0.0:7700"\n').server.tcp_endpoint


def test_public_keys_never_look_like_an_option(remote: Remote) -> None:
    # Z85 has "-" in its alphabet; a key starting with it could not be passed to `keys revoke`.
    keys = [remote.local.new_key("a")["public"] for _ in range(300)]
    assert not [k for k in keys if k.startswith("-")]
    assert remote.daemon.cli("keys", "revoke", keys[0]).returncode == 0
