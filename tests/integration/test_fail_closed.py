"""Fail closed: a root supervisor never runs tenant code as root, and a runtime or state dir that
someone else could tamper with is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stepvisor.client import StepVisorError
from tests.conftest import Daemon, deploy_source, wait_for

root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="sandbox uids, and files owned by another uid, need root"
)
NOBODY = 65534
OTHER_UID = 12345

STEP = """
import os
from stepvisor import workflow

@workflow("w")
def w(event, step):
    return step.do("who", lambda: {"uid": os.getuid(), "tag": TAG}, retries={"limit": 0})
"""


def source(tag: str) -> str:
    return f"TAG = {tag!r}\n" + STEP


def wrapper(where: Path, mode: int) -> Path:
    """An interpreter in directory `where` (mode `mode`): a script that runs the test's own."""
    where.mkdir(mode=mode)
    where.chmod(mode)
    python = where / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return python


def serve(config: Path | None, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """`stepvisor serve`, expected to refuse its start (the timeout ends one that does not)."""
    cmd = [sys.executable, "-m", "stepvisor.cli", "serve", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)  # type: ignore[call-overload,no-any-return]


def doctor(config: Path) -> tuple[int, dict]:
    r = subprocess.run(
        [sys.executable, "-m", "stepvisor.cli", "--json", "doctor", "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return r.returncode, json.loads(r.stdout)


# ---------------------------------------------------------------- tenant code never runs as root


@root_only
@pytest.mark.parametrize("mode", ["auto", "required"])
def test_an_interpreter_sandbox_uids_cannot_read_refuses_the_start(
    make_daemon, tmp_short: Path, mode: str
) -> None:
    python = wrapper(tmp_short / "private", 0o700)
    daemon: Daemon = make_daemon(
        f'[isolation]\nuid = "{mode}"\n', server=f'python = "{python}"\n', start=False
    )
    r = serve(daemon.config_path)
    assert r.returncode == 1, r.stderr
    assert "error STARTUP: the interpreter " + str(python) in r.stderr
    assert f"{tmp_short / 'private'} (mode 700)" in r.stderr
    assert "tenant code never runs as root" in r.stderr
    assert 'uid = "off"' in r.stderr  # the fixes are named
    code, report = doctor(daemon.config_path)
    assert code == 1
    assert report["tenant_code_runs_as"].startswith("nothing: the supervisor refuses to start")
    assert str(python) in report["error"]


@root_only
def test_uid_off_as_root_is_an_explicit_choice_logged_at_start(
    make_daemon, tmp_short: Path
) -> None:
    python = wrapper(tmp_short / "private", 0o700)
    daemon: Daemon = make_daemon('[isolation]\nuid = "off"\n', server=f'python = "{python}"\n')
    (warning,) = daemon.events("isolation.uid_off")
    assert warning["level"] == "warning"
    assert "tenant code runs as root" in warning["detail"]
    c = daemon.client()
    deploy_source(c, "acme", source("a"))
    c.create("acme", "w", id="i")
    assert c.wait("acme", "i", timeout_s=60)["output"]["uid"] == 0
    _, report = doctor(daemon.config_path)
    assert report["tenant_code_runs_as"].startswith("root, without capabilities")


@root_only
def test_a_tenant_interpreter_sandbox_uids_cannot_read_refuses_the_start(
    make_daemon, tmp_short: Path
) -> None:
    python = wrapper(tmp_short / "private", 0o700)
    daemon: Daemon = make_daemon(f'[tenants.acme]\npython = "{python}"\n', start=False)
    r = serve(daemon.config_path)
    assert r.returncode == 1, r.stderr
    assert f"error STARTUP: `tenants.acme.python`: the interpreter {python}" in r.stderr
    code, report = doctor(daemon.config_path)
    assert code == 1
    assert "`tenants.acme.python`" in report["error"]
    assert "(mode 700)" in report["interpreters"][str(python)]
    # The probe ran with the daemon's interpreter, from inside its runtime dir.
    assert report["interpreter"] == sys.executable
    assert report["probe"]["cwd"].startswith(f"{daemon.run_dir}/doctor-"), report["probe"]
    assert report["tenant_code_runs_as"].startswith("a sandbox uid in ")


@root_only
def test_a_tenant_interpreter_made_unreadable_later_stops_its_launches_only(
    make_daemon, tmp_short: Path
) -> None:
    python = wrapper(tmp_short / "acme-python", 0o755)
    daemon: Daemon = make_daemon(f'[tenants.acme]\npython = "{python}"\n')
    c = daemon.client()
    deploy_source(c, "acme", source("before"))
    # Reinstalled somewhere sandbox uids cannot read: acme's code must not run (as root or
    # otherwise) on it; other tenants go on.
    python.parent.chmod(0o700)
    with pytest.raises(StepVisorError) as refused:
        deploy_source(c, "acme", source("after"))
    assert refused.value.code == "DEPLOY_FAILED"
    assert f"the tenant's interpreter {python} is not usable by sandbox uids" in str(refused.value)
    c.create("acme", "w", id="i")
    deploy_source(c, "globex", source("g"))
    c.create("globex", "w", id="i")
    assert c.wait("globex", "i", timeout_s=60)["output"]["uid"] != 0

    def refused_launch() -> dict | None:
        acts = c.history("acme", "i")["activations"]
        return next((a for a in acts if a["detail"] and str(python) in a["detail"]), None)

    act = wait_for(refused_launch, 30, "acme's launch to be refused")
    assert act["detail"].startswith("could not start the activation:")
    assert act["pid"] is None  # nothing ran
    # A reload keeps its config, and says which key is at fault.
    with pytest.raises(StepVisorError) as reload:
        c.reload()
    assert reload.value.code == "CONFIG"
    assert "`tenants.acme.python`" in str(reload.value)


# ---------------------------------------------------------------- runtime and state dirs


@root_only
@pytest.mark.parametrize("owner", [OTHER_UID, NOBODY])
def test_a_runtime_dir_someone_else_could_write_is_refused(tmp_short: Path, owner: int) -> None:
    # A user's default runtime dir is under XDG_RUNTIME_DIR (root's is /run/stepvisor, which
    # this test must not touch): serve as nobody, with one planted where nobody's would be.
    base = tmp_short / "nobody"
    base.mkdir()
    os.chown(base, NOBODY, NOBODY)
    xdg = base / "xdg"
    xdg.mkdir(mode=0o711)
    xdg.chmod(0o711)
    os.chown(xdg, NOBODY, NOBODY)
    planted = xdg / "stepvisor"
    planted.mkdir()
    planted.chmod(0o777)
    os.chown(planted, owner, owner)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["XDG_RUNTIME_DIR"] = str(xdg)
    r = serve(None, "--state-dir", str(base / "state"), env=env, user=NOBODY)
    assert r.returncode == 1, r.stderr
    if owner == OTHER_UID:
        assert f"error STARTUP: server.runtime_dir {planted} belongs to uid {OTHER_UID}" in r.stderr
    else:
        assert f"error STARTUP: server.runtime_dir {planted} may be written by group" in r.stderr
    assert not (planted / "api.sock").exists()


@root_only
def test_a_state_dir_of_another_uid_is_refused(make_daemon) -> None:
    daemon: Daemon = make_daemon(start=False)
    daemon.state.mkdir(mode=0o700)
    os.chown(daemon.state, OTHER_UID, OTHER_UID)
    r = serve(daemon.config_path)
    assert r.returncode == 1, r.stderr
    assert f"server.state_dir {daemon.state} belongs to uid {OTHER_UID}" in r.stderr


def _as_nobody(base: Path) -> tuple[Path, dict[str, str]]:
    """A temp dir of nobody's own and an environment whose runtime dir falls back to it."""
    base.mkdir()
    os.chown(base, NOBODY, NOBODY)
    tmp = base / "tmp"
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)  # a shared temp dir, as /tmp
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(tmp)
    return tmp / f"stepvisor-{NOBODY}", env


@root_only
@pytest.mark.parametrize("planted", ["dir of root", "symlink"])
def test_a_non_root_fallback_runtime_dir_planted_in_the_shared_temp_dir_is_refused(
    tmp_short: Path, planted: str
) -> None:
    runtime, env = _as_nobody(tmp_short / "nobody")
    if planted == "symlink":
        target = tmp_short / "nobody" / "elsewhere"
        target.mkdir(mode=0o700)
        os.chown(target, NOBODY, NOBODY)
        runtime.symlink_to(target)
        why = f"server.runtime_dir {runtime} is a symlink"
    else:
        runtime.mkdir()
        runtime.chmod(0o777)
        why = f"server.runtime_dir {runtime} belongs to uid 0"
    state = tmp_short / "nobody" / "state"
    r = serve(None, "--state-dir", str(state), env=env, user=NOBODY)
    assert r.returncode == 1, r.stderr
    assert f"error STARTUP: {why}" in r.stderr


@root_only
def test_a_non_root_fallback_runtime_dir_is_made_private(tmp_short: Path) -> None:
    runtime, env = _as_nobody(tmp_short / "nobody")
    state = tmp_short / "nobody" / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepvisor.cli", "serve", "--state-dir", str(state)],
        env=env, user=NOBODY, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: (runtime / "api.sock").exists() or proc.poll() is not None, 30, "start")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        st = runtime.stat()
        assert (st.st_uid, st.st_mode & 0o7777) == (NOBODY, 0o700)
        assert (state.stat().st_mode & 0o7777) == 0o700
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
