"""Running under systemd: the sd_notify protocol on a real datagram socket, and config reloads
(SIGHUP and `stepvisor reload`) against a supervisor under load."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stepvisor.client import StepVisorError
from tests.conftest import Daemon, deploy_source, wait_for

LIMITS = """
import resource
from stepvisor import workflow

@workflow("limits")
def limits(event, step):
    # The address-space limit this activation got: [defaults] memory_mib, in bytes.
    return step.do("read", lambda: resource.getrlimit(resource.RLIMIT_AS)[0] // (1 << 20))
"""


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket, read message by message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[str] = []

    def next(self, timeout_s: float = 10.0) -> str | None:
        self.sock.settimeout(timeout_s)
        try:
            msg = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        self.seen.append(msg)
        return msg

    def wait_for(self, field: str, timeout_s: float = 10.0) -> str:
        """The next message that has `field` as one of its lines (skipping others)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            msg = self.next(left)
            if msg is not None and field in msg.split("\n"):
                return msg
        raise AssertionError(f"no {field} within {timeout_s} s; got {self.seen[-5:]}")

    def quiet_for(self, field: str, seconds: float) -> bool:
        """True when no message with `field` arrives for `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            msg = self.next(left)
            if msg is not None and field in msg.split("\n"):
                return False
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_short: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_short / "notify.sock")
    yield sock
    sock.close()


def systemd_env(notify: NotifySocket, watchdog_s: float = 0.2) -> dict[str, str]:
    return {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}


def test_ready_watchdog_reload_and_stopping_reach_systemd(
    make_daemon: Callable[..., Daemon], notify: NotifySocket
) -> None:
    daemon = make_daemon(start=False)
    daemon.start(env=systemd_env(notify))
    ready = notify.wait_for("READY=1")
    assert any(line.startswith("STATUS=serving") for line in ready.split("\n"))
    notify.wait_for("WATCHDOG=1")
    notify.wait_for("WATCHDOG=1")

    # A loop that does not turn must miss its pings: systemd then restarts the service.
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        while notify.next(0.05) is not None:  # what it sent before it stopped
            pass
        assert notify.quiet_for("WATCHDOG=1", 1.0)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    notify.wait_for("WATCHDOG=1")

    daemon.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING=1")
    assert any(line.startswith("MONOTONIC_USEC=") for line in reloading.split("\n"))
    notify.wait_for("READY=1")

    daemon.proc.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1")
    assert daemon.proc.wait(30) == 0


def test_an_invalid_config_never_reports_ready(tmp_short: Path, notify: NotifySocket) -> None:
    bad = tmp_short / "bad.toml"
    bad.write_text("[defaults]\nmemory_mib = 'lots'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "stepvisor.cli", "serve", "--config", str(bad)],
        env={**systemd_env(notify)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "error CONFIG" in proc.stderr and "defaults.memory_mib" in proc.stderr
    assert notify.next(0.2) is None


def test_no_watchdog_pings_unless_systemd_asks(
    make_daemon: Callable[..., Daemon], notify: NotifySocket
) -> None:
    daemon = make_daemon(start=False)
    daemon.start(env={"NOTIFY_SOCKET": str(notify.path)})
    notify.wait_for("READY=1")
    assert notify.quiet_for("WATCHDOG=1", 1.5)
    assert daemon.alive()


def limit_seen(daemon: Daemon, iid: str) -> int:
    c = daemon.client()
    c.create("t", "limits", id=iid)
    st = c.wait("t", iid, timeout_s=60)
    assert st["status"] == "complete", (st["status"], st["error"])
    return int(st["output"])


def test_reload_applies_new_limits_to_new_activations_under_load(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon("[defaults]\nmemory_mib = 300\n")
    c = daemon.client()
    deploy_source(c, "t", LIMITS)
    assert limit_seen(daemon, "before") == 300
    # Load: instances starting, running and finishing while the config changes under them.
    c.create_batch("t", "limits", [(f"load{n}", None) for n in range(40)])
    daemon.write_config("[defaults]\nmemory_mib = 400\n")
    r = c.reload()
    assert r["changes"] == {"defaults.memory_mib": {"old": 300, "new": 400}}
    assert limit_seen(daemon, "after") == 400
    seen = {c.wait("t", f"load{n}", timeout_s=120)["output"] for n in range(40)}
    assert seen <= {300, 400}  # each activation got one whole config
    changes = daemon.events("config.reloaded")[-1]["changes"]
    assert changes == {"defaults.memory_mib": {"old": 300, "new": 400}}

    # SIGHUP does the same; limits go down as well as up.
    daemon.write_config("[defaults]\nmemory_mib = 260\n")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(daemon.events("config.reloaded")) == 2, 30, "the SIGHUP reload")
    assert limit_seen(daemon, "hup") == 260


def test_an_invalid_file_is_refused_and_the_old_config_kept(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon("[defaults]\nmemory_mib = 300\n")
    c = daemon.client()
    deploy_source(c, "t", LIMITS)
    c.create_batch("t", "limits", [(f"load{n}", None) for n in range(20)])
    daemon.write_config("[defaults]\nmemory_mib = -5\n")
    with pytest.raises(StepVisorError) as err:
        c.reload()
    assert err.value.code == "CONFIG"
    assert "defaults.memory_mib" in err.value.message
    assert daemon.events("config.reload_rejected")
    assert daemon.proc is not None
    daemon.config_path.write_text("not toml at all [[[")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(daemon.events("config.reload_rejected")) == 2, 30, "the SIGHUP refusal")
    assert "not valid TOML" in daemon.events("config.reload_rejected")[-1]["error"]
    assert limit_seen(daemon, "after") == 300
    for n in range(20):
        assert c.wait("t", f"load{n}", timeout_s=120)["output"] == 300
    assert daemon.alive()


def test_a_change_that_needs_a_restart_is_refused_whole(
    make_daemon: Callable[..., Daemon], tmp_short: Path
) -> None:
    daemon = make_daemon("[defaults]\nmemory_mib = 300\n")
    c = daemon.client()
    deploy_source(c, "t", LIMITS)
    daemon.write_config(
        '[defaults]\nmemory_mib = 400\n[isolation]\nseccomp = "off"\n',
        server='launch_mode = "spawn"\n',
    )
    with pytest.raises(StepVisorError) as err:
        c.reload()
    assert err.value.code == "CONFIG"
    assert "isolation.seccomp" in err.value.message
    assert "server.launch_mode" in err.value.message
    assert limit_seen(daemon, "same") == 300  # nothing of it was applied


def test_reload_from_the_command_line(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon("[tenants.acme]\nmax_concurrent = 2\n")
    daemon.write_config("[tenants.acme]\nmax_concurrent = 3\n")
    out = daemon.cli("reload")
    assert out.returncode == 0, out.stderr
    assert f"reloaded {daemon.config_path}:" in out.stdout
    assert "tenants.acme.max_concurrent: 2 -> 3" in out.stdout
    daemon.write_config("[tenants.acme]\nmax_concurrent = 'x'\n")
    out = daemon.cli("reload")
    assert out.returncode == 1
    assert out.stderr.startswith("error CONFIG: ")
    assert "tenants.acme.max_concurrent" in out.stderr


SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed on this host")
    return path


def test_the_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    # verify checks that ExecStart exists: point it at this environment's `stepvisor`.
    exe = Path(sys.executable).with_name("stepvisor")
    assert exe.exists(), exe
    unit = (SYSTEMD / "stepvisor.service").read_text()
    assert "/opt/stepvisor/.venv/bin/stepvisor" in unit
    (tmp_path / "stepvisor.service").write_text(
        unit.replace("/opt/stepvisor/.venv/bin/stepvisor", str(exe))
    )
    out = subprocess.run(
        [analyze, "verify", "./stepvisor.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr  # unknown keys and bad values only warn


def test_sysusers_and_tmpfiles_make_the_group_and_directories(tmp_path: Path) -> None:
    sysusers, tmpfiles = _tool("systemd-sysusers"), _tool("systemd-tmpfiles")
    for kind, name in (("sysusers.d", "stepvisor.sysusers"), ("tmpfiles.d", "stepvisor.tmpfiles")):
        (tmp_path / "etc" / kind).mkdir(parents=True)
        shutil.copy(SYSTEMD / name, tmp_path / "etc" / kind / "stepvisor.conf")
    subprocess.run([sysusers, f"--root={tmp_path}"], check=True, capture_output=True, timeout=60)
    groups = dict(
        (line.split(":")[0], int(line.split(":")[2]))
        for line in (tmp_path / "etc" / "group").read_text().splitlines()
    )
    assert "stepvisor" in groups
    subprocess.run(
        [tmpfiles, "--create", f"--root={tmp_path}"], check=True, capture_output=True, timeout=60
    )
    state = (tmp_path / "var/lib/stepvisor").stat()
    assert stat.S_IMODE(state.st_mode) == 0o700 and state.st_uid == 0
    logs = (tmp_path / "var/log/stepvisor").stat()
    assert stat.S_IMODE(logs.st_mode) == 0o750 and logs.st_gid == 0  # as LogsDirectory= makes it
    assert (tmp_path / "etc/stepvisor").is_dir()


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (SYSTEMD / "stepvisor.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_unit_lets_the_example_log_file_be_written() -> None:
    """ProtectSystem=strict makes /var read-only for the service but for the directories the
    unit names: the example config's log_file must be in one of them, as tmpfiles makes it."""
    settings = _unit_settings()
    assert settings["ProtectSystem"] == ["strict"]
    example = (SYSTEMD / "stepvisor.toml").read_text()
    (log_file,) = re.findall(r'^# log_file = "([^"]+)"', example, re.MULTILINE)
    writable = [f"/var/log/{d}" for d in settings.get("LogsDirectory", [])]
    writable += [f"/var/lib/{d}" for d in settings.get("StateDirectory", [])]
    writable += settings.get("ReadWritePaths", [])
    assert str(Path(log_file).parent) in writable, (log_file, writable)
    # made with the mode and owner tmpfiles gives it, so neither changes what the other made
    tmpfiles = (SYSTEMD / "stepvisor.tmpfiles").read_text()
    mode = settings["LogsDirectoryMode"][0]
    assert f"d {Path(log_file).parent} {mode} root root -" in tmpfiles
