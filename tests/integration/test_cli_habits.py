"""The `stepvisor` command as people use it: options where they put them, params from files and
stdin, output to read, a log to read on the embedded default, a root login shell's runtime dir."""

from __future__ import annotations

import argparse
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepvisor import cli, commands
from tests.conftest import Daemon, deploy_source, wait_for

pytestmark = pytest.mark.sqlite_only  # the command line, not the database, is under test

ECHO = """
from stepvisor import workflow

@workflow("echo")
def echo(event, step):
    return step.do("echo", lambda: event.payload)

@workflow("hold")
def hold(event, step):
    return step.wait_for_event("go", type="go", timeout=3600)
"""


def cli_run(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stepvisor.cli", *args],
        input=stdin, capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_global_options_come_before_or_after_the_command(daemon: Daemon, tmp_short: Path) -> None:
    deploy_source(daemon.client(), "acme", ECHO)
    sock = str(daemon.run_dir / "api.sock")
    r = cli_run("run", "acme", "echo", "--id", "a", "--params", '"x"', "--wait", "--socket", sock)
    assert r.returncode == 0, r.stderr
    r = cli_run("status", "acme", "a", "--json", "--socket", sock, "--timeout", "30")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["output"] == "x"
    r = cli_run("--socket", sock, "history", "acme", "a", "--json")
    assert json.loads(r.stdout)["instance"]["id"] == "a"
    # after the command wins over before it, as the last of a repeated option does
    r = cli_run("--socket", str(tmp_short / "none.sock"), "list", "acme", "--socket", sock)
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[0] == "a", r.stderr
    # and one given only before it is kept
    r = cli_run("--json", "--socket", sock, "list", "acme")
    assert [i["id"] for i in json.loads(r.stdout)] == ["a"]
    r = cli_run("nodes", "--socket", sock, "--credentials", str(tmp_short / "no.key"))
    assert r.returncode == 1 and "no.key" in r.stderr  # taken, and read


def test_params_and_payloads_from_a_file_or_stdin(daemon: Daemon, tmp_short: Path) -> None:
    deploy_source(daemon.client(), "acme", ECHO)
    sock = ["--socket", str(daemon.run_dir / "api.sock"), "--json"]
    params = tmp_short / "params.json"
    params.write_text('{"email": "ann@example.com", "n": [1, 2]}\n')
    r = cli_run(*sock, "run", "acme", "echo", "--id", "f", "--params", f"@{params}", "--wait")
    assert json.loads(r.stdout)["output"] == {"email": "ann@example.com", "n": [1, 2]}, r.stderr
    r = cli_run(*sock, "run", "acme", "echo", "--id", "s", "--params", "-", "--wait",
                stdin='["from", "stdin"]')  # fmt: skip
    assert json.loads(r.stdout)["output"] == ["from", "stdin"], r.stderr
    for iid, payload, stdin in (("e1", f"@{params}", None), ("e2", "-", '{"via": "stdin"}')):
        assert cli_run(*sock, "run", "acme", "hold", "--id", iid).returncode == 0
        r = cli_run(*sock, "event", "acme", iid, "go", "--payload", payload, stdin=stdin)
        assert r.returncode == 0, r.stderr
        done = json.loads(cli_run(*sock, "run", "acme", "hold", "--id", iid, "--wait").stdout)
        expected = {"email": "ann@example.com", "n": [1, 2]} if stdin is None else {"via": "stdin"}
        assert done["output"]["payload"] == expected
    # a file that is not there, or not JSON: a usage error saying which, and nothing created
    bad = tmp_short / "bad.json"
    bad.write_text("{oops")
    for arg, says in (
        (f"@{tmp_short / 'missing.json'}", f"cannot read {tmp_short / 'missing.json'}: No such"),
        (f"@{bad}", f"{bad} is not valid JSON"),
        ("-", "JSON on stdin is not valid JSON"),
    ):
        r = cli_run(*sock, "run", "acme", "echo", "--id", "no", "--params", arg, stdin="nope")
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"error USAGE: argument --params: {says}"), r.stderr
        r = cli_run(*sock, "event", "acme", "e1", "go", "--payload", arg, stdin="nope")
        assert r.returncode == 2 and r.stderr.startswith("error USAGE: argument --payload: ")
    assert "no" not in {i["id"] for i in json.loads(cli_run(*sock, "list", "acme").stdout)}


def test_status_history_and_list_read_well(daemon: Daemon) -> None:
    deploy_source(daemon.client(), "acme", ECHO)
    sock = ["--socket", str(daemon.run_dir / "api.sock")]
    long = "word " * 60 + "END"  # longer than any column: shown whole, never cut
    r = cli_run(*sock, "run", "acme", "echo", "--id", "long", "--params", json.dumps(long),
                "--wait")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:4] == [
        "instance:    acme/long",
        "workflow:    echo",
        r.stdout.splitlines()[2],
        "status:      complete",
    ]
    r = cli_run(*sock, "status", "acme", "long")
    lines = r.stdout.splitlines()
    assert f"output:      {json.dumps(long)}" in lines
    keys = [line.split(":", 1)[0] for line in lines]
    assert keys[:4] == ["instance", "workflow", "version", "status"]
    value_columns = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in lines}
    assert len(value_columns) == 1, lines  # every value starts in one column
    r = cli_run(*sock, "history", "acme", "long")
    assert r.returncode == 0
    entry = next(line for line in r.stdout.splitlines() if " echo " in line and " ok " in line)
    assert entry.endswith(json.dumps(long))  # the result whole
    assert "journal:" in r.stdout and "activations:" in r.stdout
    r = cli_run(*sock, "list", "acme")
    head, row = r.stdout.splitlines()
    assert head.split() == ["id", "workflow", "status", "steps", "updated"]
    assert row.split()[:4] == ["long", "echo", "complete", "1"]
    assert row.index("echo") == head.index("workflow")  # aligned under its header
    # --json keeps the machine output
    assert json.loads(cli_run(*sock, "--json", "status", "acme", "long").stdout)["output"] == long


def test_every_command_is_dispatched_from_the_table_and_every_option_has_help() -> None:
    parser = cli._parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == set(cli.COMMANDS)  # one table, whichever module a handler is in
    undocumented = []
    parsers = [("stepvisor", parser), *sub.choices.items()]
    keys = sub.choices["keys"]._actions
    (keys_sub,) = [a for a in keys if isinstance(a, argparse._SubParsersAction)]
    assert set(keys_sub.choices) == set(commands.KEY_ACTIONS)
    parsers += [(f"keys {n}", p) for n, p in keys_sub.choices.items()]
    for name, p in parsers:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                undocumented.append(f"{name} {action.dest}")
    assert undocumented == []
    # and the real command shows them, global options included
    r = cli_run("event", "--help", env={"COLUMNS": "200"})
    assert r.returncode == 0
    assert "@FILE (read from FILE) or - (read from stdin)" in r.stdout
    assert "machine-readable output" in r.stdout and "seconds to wait for a reply" in r.stdout


def test_the_cli_is_in_no_import_cycle() -> None:
    # The demo and anything else that renders histories use `views`, not the command line.
    code = (
        "import sys, stepvisor.demo, stepvisor.views, stepvisor.commands\n"
        "assert 'stepvisor.cli' not in sys.modules, 'stepvisor.cli imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _read_until(fd: int, done: str, deadline_s: float) -> str:
    """What a terminal shows of `fd` until `done` appears (or the deadline passes)."""
    seen = b""
    deadline = time.monotonic() + deadline_s
    while done.encode() not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")


def test_serve_is_readable_on_a_terminal_and_logs_reads_the_embedded_default(
    tmp_short: Path,
) -> None:
    state, run = tmp_short / "st", tmp_short / "rt"
    main, tty = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepvisor.cli", "serve", "--state-dir", str(state),
         "--runtime-dir", str(run)],
        stdin=subprocess.DEVNULL, stdout=tty, stderr=tty,
    )  # fmt: skip
    os.close(tty)
    try:
        shown = _read_until(main, "supervisor.ready", 60)
        assert " info " in shown and "supervisor.ready" in shown, shown
        assert '{"' not in shown  # not JSON
        sock = str(run / "api.sock")
        # the embedded default keeps its log in its state dir, and `logs` finds it there
        r = cli_run("--socket", sock, "logs", "--level", "info")
        assert r.returncode == 0, r.stderr
        assert "supervisor.ready" in r.stdout and not r.stdout.startswith("{")
        assert json.loads(cli_run("--socket", sock, "--json", "logs").stdout.splitlines()[0])
        assert (state / "stepvisor.log").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        os.close(main)
    assert proc.returncode == 0
    # the file stays JSON, whatever stdout got
    last = json.loads((state / "stepvisor.log").read_text().splitlines()[-1])
    assert last["event"] == "supervisor.stopped"


def test_serve_writes_json_when_stdout_is_not_a_terminal(tmp_short: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepvisor.cli", "serve", "--state-dir", str(tmp_short / "st"),
         "--runtime-dir", str(tmp_short / "rt")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert json.loads(first)["event"] == "config.embedded_default"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="root's default directories")
def test_root_with_a_login_runtime_dir_serves_the_embedded_default(tmp_short: Path) -> None:
    """As root in a login shell (logind made XDG_RUNTIME_DIR, 0700), `serve` with no options
    uses root's directories, /var/lib/stepvisor and /run/stepvisor, which sandbox uids can
    reach, and `stepvisor` finds it there. Run in a private mount namespace with both bound to
    directories of the test's, so the host's are never touched."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    login = tmp_short / "user0"
    login.mkdir(mode=0o700)
    login.chmod(0o700)
    var_lib, run = tmp_short / "var-lib", tmp_short / "run"
    for d in (var_lib, run):
        d.mkdir(mode=0o755)
        d.chmod(0o755)
    script = (
        f"mount --bind {var_lib} /var/lib && mount --bind {run} /run && "
        f"exec {sys.executable} -m stepvisor.cli serve"
    )
    env = {**os.environ, "XDG_RUNTIME_DIR": str(login), "XDG_STATE_HOME": str(login / "state")}
    env.pop("STEPVISOR_SOCKET", None)
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    sock = run / "stepvisor" / "api.sock"
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, 60, "the API socket")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        r = cli_run("--socket", str(sock), "--json", "nodes")
        assert r.returncode == 0, r.stderr
        assert (var_lib / "stepvisor" / "stepvisor.db").exists()
        assert (var_lib / "stepvisor").stat().st_mode & 0o777 == 0o700
        assert (run / "stepvisor").stat().st_mode & 0o777 == 0o755
        assert not (login / "stepvisor").exists() and not (login / "state").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0


def test_doctor_checks_the_supervisor_it_is_pointed_at(daemon: Daemon, tmp_short: Path) -> None:
    sock = str(daemon.run_dir / "api.sock")
    info = daemon.client().info()
    r = cli_run("--socket", sock, "--json", "doctor")
    report = json.loads(r.stdout)
    assert report["state_dir"].startswith(str(daemon.state)), report["state_dir"]
    assert report["runtime_dir"].startswith(str(daemon.run_dir)), report["runtime_dir"]
    assert report["database"].startswith(f"sqlite {daemon.state / 'stepvisor.db'}")
    assert report["interpreter"] == info["python"]
    assert "error" not in report["probe"], report["probe"]
    # a supervisor asked for that is not there is said, not the embedded default checked instead
    r = cli_run("--socket", str(tmp_short / "none.sock"), "doctor")
    assert r.returncode == 1 and r.stderr.startswith("error UNAVAILABLE: "), r.stderr
