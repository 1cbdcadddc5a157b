"""The `stepvisor` command as people use it: options where they put them, params from files and
stdin, output to read, doctor on the supervisor it is pointed at."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stepvisor import cli, commands
from tests.conftest import Daemon, deploy_source

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
    assert set(sub.choices) == set(commands.COMMANDS)
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
