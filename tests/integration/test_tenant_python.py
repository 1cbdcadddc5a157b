"""A tenant's own interpreter / virtualenv: its dependencies never mix with another tenant's."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

import psutil

from tests.conftest import ROOT, deploy_source, wait_for

USES_LIB = """
from stepvisor import workflow

@workflow("w")
def w(event, step):
    def use():
        import tenant_only_lib
        return tenant_only_lib.VALUE
    return step.do("use the tenant's dependency", use, retries={"limit": 0})
"""


def make_venv(where: Path) -> Path:
    """A virtualenv holding one library no other interpreter has, plus stepvisor's own deps."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    (packages,) = where.glob("lib/python3*/site-packages")
    (packages / "tenant_only_lib.py").write_text("VALUE = 'from the tenant venv'\n")
    # The activation runtime itself (stepvisor, zmq, msgspec) comes from the server's install.
    (packages / "stepvisor-runtime.pth").write_text(
        "\n".join([*site.getsitepackages(), str(ROOT)]) + "\n"
    )
    return where / "bin" / "python"


def test_each_tenant_runs_on_its_own_interpreter(make_daemon, tmp_short: Path) -> None:
    python = make_venv(tmp_short / "acme-venv")
    daemon = make_daemon(f'[tenants.acme]\npython = "{python}"\n')
    c = daemon.client()
    for tenant in ("acme", "globex"):
        deploy_source(c, tenant, USES_LIB)
        c.create(tenant, "w", id="i")
    assert c.wait("acme", "i", timeout_s=60)["output"] == "from the tenant venv"
    other = c.wait("globex", "i", timeout_s=60)
    assert other["status"] == "errored"
    assert "No module named 'tenant_only_lib'" in other["error"]["message"]


def test_a_tenant_interpreter_gets_its_own_fork_server_stopped_when_idle(
    make_daemon, tmp_short: Path
) -> None:
    python = make_venv(tmp_short / "acme-venv")
    daemon = make_daemon(
        f'[tenants.acme]\npython = "{python}"\n', server="fork_server_idle_s = 1\n"
    )
    c = daemon.client()
    deploy_source(c, "acme", USES_LIB)
    c.create("acme", "w", id="i")
    assert c.wait("acme", "i", timeout_s=60)["output"] == "from the tenant venv"
    started = {e["python"]: e["pid"] for e in daemon.events("zygote.started")}
    assert set(started) == {sys.executable, str(python)}  # the supervisor's, and acme's
    assert not daemon.events("zygote.fallback")  # forked, not spawned
    # Idle for fork_server_idle_s: acme's fork server (and its spares) go; the shared one stays.
    wait_for(lambda: daemon.events("zygote.stopped"), 10, "the idle fork server to stop")
    (stopped,) = daemon.events("zygote.stopped")
    assert stopped["python"] == str(python)
    wait_for(lambda: not psutil.pid_exists(started[str(python)]), 10, "it to exit")
    assert psutil.pid_exists(started[sys.executable])
    # The next launch starts it again.
    c.create("acme", "w", id="again")
    assert c.wait("acme", "again", timeout_s=60)["output"] == "from the tenant venv"
    assert len(daemon.events("zygote.started")) == 3
