"""`stepvisor doctor` and refusing to start without a required layer."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Daemon

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")


def doctor(config: Path, *, user: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stepvisor.cli", "--json", "doctor", "--config", str(config)],
        capture_output=True, text=True, timeout=120, user=user,
    )  # fmt: skip


def test_doctor_verifies_each_layer_with_a_probe(make_daemon) -> None:
    daemon: Daemon = make_daemon(start=False)
    r = doctor(daemon.config_path)
    report = json.loads(r.stdout)
    rows = {row["layer"]: row for row in report["layers"]}
    assert set(rows) == {"uid", "cgroup", "network", "landlock", "seccomp", "disk"}
    assert "error" not in report["probe"], report["probe"]
    for row in rows.values():
        # whatever this host offers is not only enabled but seen in force by the probe
        assert row["effective"] == row["available"], row
    assert r.returncode == 0
    # its probe's cgroups are gone with it, in every hierarchy (no supervisor shares them here)
    name = "stepvisor-" + hashlib.sha256(str(daemon.state).encode()).hexdigest()[:8]
    assert list(Path("/sys/fs/cgroup").glob(f"*/**/{name}")) == []
    assert report["interpreter"] == sys.executable
    assert report["spare_forks"].startswith(("once each", "twice each")), report["spare_forks"]
    # the backend is named; PostgreSQL is asked over a connection of its own
    if daemon.database:
        assert report["database"].startswith("postgresql "), report["database"]
        assert " server " in report["database"] and "password" not in report["database"]
    else:
        assert report["database"].startswith(f"sqlite {daemon.state / 'stepvisor.db'}")


@pytest.mark.postgresql_only
def test_doctor_fails_when_the_database_cannot_be_reached(make_daemon, tmp_short: Path) -> None:
    nowhere = f"postgresql:///stepvisor?host={tmp_short}/no-such-dir"
    daemon: Daemon = make_daemon(server=f'database = "{nowhere}"\n', start=False)
    r = doctor(daemon.config_path)
    report = json.loads(r.stdout)
    assert "cannot connect" in report["database"]
    assert r.returncode != 0
    with pytest.raises(AssertionError, match=r"error STARTUP: server\.database: cannot use"):
        daemon.start()  # after waiting for it a while (a database restarting)


def test_doctor_reports_a_layer_turned_off(make_daemon) -> None:
    daemon: Daemon = make_daemon('[isolation]\nlandlock = "off"\n', start=False)
    report = json.loads(doctor(daemon.config_path).stdout)
    (row,) = [r for r in report["layers"] if r["layer"] == "landlock"]
    assert (row["mode"], row["enabled"], row["effective"]) == ("off", False, False)


@root_only
def test_a_required_layer_that_is_missing_refuses_the_start(tmp_short: Path) -> None:
    nobody = 65534
    base = tmp_short / "nobody"
    base.mkdir()
    os.chown(base, nobody, nobody)
    config = base / "stepvisor.toml"
    config.write_text(
        f'[server]\nstate_dir = "{base}/state"\nruntime_dir = "{base}/run"\n'
        '[isolation]\nuid = "required"\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "stepvisor.cli", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60, user=nobody,
    )  # fmt: skip
    assert r.returncode == 1
    assert "error STARTUP: required isolation unavailable: uid (needs root)" in r.stderr
    d = doctor(config, user=nobody)
    assert d.returncode == 1
    assert "uid (needs root)" in json.loads(d.stdout)["error"]
