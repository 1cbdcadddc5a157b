"""The `stepvisor` command against a real supervisor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, Daemon, wait_for


def cli(
    daemon: Daemon | None, *args: str, socket: str | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if daemon is not None:
        env["STEPVISOR_SOCKET"] = str(daemon.run_dir / "api.sock")
    extra = ["--socket", socket] if socket else []
    return subprocess.run(
        [sys.executable, "-m", "stepvisor.cli", *extra, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_deploy_run_wait_history_and_events(daemon: Daemon) -> None:
    r = cli(daemon, "deploy", "acme", str(ROOT / "examples" / "acme" / "onboarding.py"))
    assert r.returncode == 0, r.stderr
    assert "deployed onboard for acme" in r.stdout
    r = cli(
        daemon, "run", "acme", "onboard", "--id", "ann", "--params", '{"email": "ann@example.com"}'
    )
    assert (r.returncode, r.stdout.strip()) == (0, "ann")
    r = cli(daemon, "event", "acme", "ann", "email-confirmed", "--payload", '{"at": "noon"}')
    assert r.returncode == 0 and "stored" in r.stdout
    r = cli(
        daemon,
        "--json",
        "run",
        "acme",
        "onboard",
        "--id",
        "bob",
        "--params",
        '{"email": "bob@example.com"}',
        "--wait",
        "--wait-timeout",
        "1",
    )
    assert r.returncode == 1 and r.stderr.startswith("error TIMEOUT:")  # bob gets no event
    cli(daemon, "event", "acme", "bob", "email-confirmed", "--payload", '{"at": "one"}')
    r = cli(daemon, "--json", "status", "acme", "ann")
    st = json.loads(r.stdout)
    for key in (
        "tenant",
        "id",
        "workflow",
        "version",
        "status",
        "output",
        "error",
        "created_at",
        "updated_at",
        "steps",
        "activations",
    ):
        assert key in st
    r = cli(daemon, "history", "acme", "ann")
    assert r.returncode == 0 and "create account" in r.stdout
    r = cli(daemon, "--json", "list", "acme")
    assert {i["id"] for i in json.loads(r.stdout)} == {"ann", "bob"}


def test_cli_run_wait_prints_final_status(daemon: Daemon, tmp_short: Path) -> None:
    f = tmp_short / "hello.py"
    f.write_text(
        "from stepvisor import workflow\n\n@workflow('hi')\n"
        "def hi(event, step):\n    return step.do('greet', lambda: 'hi ' + event.payload)\n"
    )
    assert cli(daemon, "deploy", "acme", str(f)).returncode == 0
    r = cli(daemon, "--json", "run", "acme", "hi", "--params", '"ann"', "--wait")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert (st["status"], st["output"]) == ("complete", "hi ann")
    r = cli(daemon, "restart", "acme", st["id"])
    assert r.returncode == 0 and "queued" in r.stdout
    r = cli(daemon, "--json", "run", "acme", "hi", "--id", st["id"], "--params", '"ann"', "--wait")
    assert json.loads(r.stdout)["status"] == "complete"  # same id, same params: idempotent
    r = cli(daemon, "terminate", "acme", st["id"])
    assert r.returncode == 1 and r.stderr.startswith("error INVALID_STATE: ")
    r = cli(daemon, "delete", "acme", st["id"])
    assert r.returncode == 0 and "deleted" in r.stdout
    # a run that ends errored fails the command, as `&&` in a shell expects
    f.write_text(
        "from stepvisor import workflow, NonRetryableError\n\n@workflow('hi')\n"
        "def hi(event, step):\n    raise NonRetryableError('no')\n"
    )
    assert cli(daemon, "deploy", "acme", str(f)).returncode == 0
    r = cli(daemon, "--json", "run", "acme", "hi", "--wait")
    assert r.returncode == 1 and json.loads(r.stdout)["status"] == "errored"
    r = cli(daemon, "--version")
    assert r.returncode == 0 and r.stdout.startswith("stepvisor ")


def test_cli_errors_are_one_line_with_a_code(daemon: Daemon, tmp_short: Path) -> None:
    r = cli(daemon, "status", "nobody", "x")
    assert r.returncode == 1
    assert r.stderr.startswith("error UNKNOWN_TENANT: ")
    r = cli(daemon, "run", "acme", "w", "--params", "{oops")
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    # nobody listening: said at once (not after the 60 s timeout), naming the endpoint
    r = cli(None, "status", "acme", "x", socket=str(tmp_short / "no.sock"))
    assert r.returncode == 1 and r.stderr.startswith("error UNAVAILABLE: ")
    assert f"ipc://{tmp_short / 'no.sock'}" in r.stderr and "no socket there" in r.stderr
    r = cli(daemon, "deploy", "acme", str(tmp_short / "missing.py"))
    assert r.returncode == 1 and r.stderr.startswith("error IO: ")
    # a reader that went away: a quiet stop, as `cat` makes, not a traceback or an IO error
    r_end, w_end = os.pipe()
    os.close(r_end)
    env = {**os.environ, "STEPVISOR_SOCKET": str(daemon.run_dir / "api.sock")}
    done = subprocess.run(
        [sys.executable, "-m", "stepvisor.cli", "--json", "nodes"],
        stdout=w_end, stderr=subprocess.PIPE, text=True, env=env, timeout=60,
    )  # fmt: skip
    os.close(w_end)
    assert (done.returncode, done.stderr) == (128 + signal.SIGPIPE, "")
    daemon.stop(signal.SIGKILL)  # leaves its socket file behind
    assert (daemon.run_dir / "api.sock").exists()
    r = cli(daemon, "status", "acme", "x")
    assert r.returncode == 1 and r.stderr.startswith("error UNAVAILABLE: ")
    assert "nothing listens" in r.stderr


def test_serve_rejects_an_invalid_config(tmp_short: Path) -> None:
    cfg = tmp_short / "bad.toml"
    cfg.write_text("[defaults]\nmemory_mib = 'lots'\n")
    r = subprocess.run(
        [sys.executable, "-m", "stepvisor.cli", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "defaults.memory_mib" in r.stderr and r.stderr.startswith("error CONFIG:")


def test_serve_on_the_embedded_default_says_where(tmp_short: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stepvisor.cli",
            "serve",
            "--state-dir",
            str(tmp_short / "st"),
            "--runtime-dir",
            str(tmp_short / "rt"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stderr.readline() if proc.stderr else ""
        assert f"state in {tmp_short / 'st'}" in first
        assert f"ipc://{tmp_short / 'rt' / 'api.sock'}" in first
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert '"event":"supervisor.stopped"' in out


def test_api_socket_is_group_only_and_logs_go_to_the_file(make_daemon, tmp_short: Path) -> None:
    log_file = tmp_short / "sv.jsonl"
    daemon = make_daemon(server=f'log_file = "{log_file}"\n')
    assert (daemon.run_dir / "api.sock").stat().st_mode & 0o777 == 0o660
    nodes = daemon.cli("nodes")  # one node, on either backend
    assert nodes.returncode == 0, nodes.stderr
    assert " up " in nodes.stdout and nodes.stdout.count(" *") == 1
    if not daemon.database:  # the embedded file: the supervisor's alone
        assert (daemon.state / "stepvisor.db").stat().st_mode & 0o777 == 0o600
    c = daemon.client()
    c.deploy("acme", ROOT / "examples" / "globex" / "reports.py")
    c.create("acme", "nightly-report", {"factor": 1}, id="r")
    assert c.wait("acme", "r", timeout_s=60)["status"] == "complete"
    activations = c.status("acme", "r")["activations"]

    def canonical() -> list[dict]:
        lines = [json.loads(x) for x in log_file.read_text().splitlines()]
        return [x for x in lines if x["event"] == "activation.finished" and x["instance"] == "r"]

    # The instance is complete once its last result is committed; that activation's line is
    # written when it has exited and been reaped, a moment later.
    wait_for(lambda: len(canonical()) == activations, 10, "a log line per activation")
    lines = canonical()
    for key in (
        "tenant",
        "instance",
        "seq",
        "step",
        "outcome",
        "cold_start_ms",
        "exec_ms",
        "cpu_ms",
        "max_rss_kib",
    ):
        assert key in lines[0]


def test_the_quick_start_demo_runs_both_tenants() -> None:
    r = subprocess.run([sys.executable, "-m", "stepvisor.cli", "demo"], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "instance:    acme/ann\nworkflow:    onboard\n" in r.stdout
    assert "instance:    globex/night-1\n" in r.stdout
    assert r.stdout.count("\nstatus:      complete\n") == 2
    assert "instance:    acme/bob\nworkflow:    onboard\n" in r.stdout
    assert "\nstatus:      errored\n" in r.stdout and "\ntraceback:   Traceback" in r.stdout
    assert "[acme/ann step 'create account'] creating account" in r.stdout
    assert "supervisor stopped (exit 0)" in r.stdout
