"""The `stepvisor` command. Errors print `error CODE: sentence` to stderr and exit non-zero
(2 for usage errors). The global options (--json, --socket, --timeout, --credentials) may come
before or after the command."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import signal
import sys
import time
from typing import Any, NoReturn

from protocol.codec import load_json
from protocol.errors import ProtocolError
from stepvisor import code_commands, commands, logview, render

EXIT_ERROR = commands.EXIT_ERROR
EXIT_USAGE = commands.EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as every other error is: `error USAGE: ...`."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error USAGE: {message}\n")
        sys.stderr.write(f"(see `{self.prog} --help`)\n")
        sys.exit(EXIT_USAGE)


def _json_arg(text: str) -> Any:
    """A JSON value given inline, `@FILE` (read from a file) or `-` (read from stdin)."""
    what = "argument"
    if text == "-":
        data, what = sys.stdin.buffer.read(), "JSON on stdin"
    elif text.startswith("@"):
        path = text[1:]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None
        what = path
    else:
        data = text.encode()
    try:
        return load_json(data, what=what)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _since_arg(text: str) -> float:
    try:
        return render.parse_since(text, time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _version() -> str:
    try:
        return importlib.metadata.version("stepvisor")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "(not installed)"


def _global_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes. On the top parser with their defaults; on each command's
    parser without (`SUPPRESS`), so one given after the command overrides one given before it
    and one not given there leaves the top parser's value alone."""

    def d(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    p.add_argument(
        "--socket",
        default=d(None),
        help="API endpoint (ipc://PATH, tcp://HOST:PORT or a path); default "
        "$STEPVISOR_SOCKET or the embedded default's socket",
    )
    p.add_argument(
        "--credentials",
        default=d(None),
        help="key file for the remote tcp:// API (default $STEPVISOR_CREDENTIALS)",
    )
    p.add_argument("--json", action="store_true", default=d(False), help="machine-readable output")
    p.add_argument(
        "--timeout", type=float, default=d(60.0), help="seconds to wait for a reply (default 60)"
    )


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="stepvisor", description=__doc__)
    p.add_argument("--version", action="version", version=f"stepvisor {_version()}")
    _global_options(p, defaults=True)
    common = _Parser(add_help=False)
    _global_options(common, defaults=False)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    def instance(s: argparse.ArgumentParser) -> None:
        s.add_argument("tenant", help="the tenant the instance belongs to")
        s.add_argument("id", help="the instance id")

    s = command("serve", "run the supervisor in the foreground")
    s.add_argument("--config", help="stepvisor.toml (default: the embedded default)")
    s.add_argument("--state-dir", help="override [server] state_dir")
    s.add_argument("--runtime-dir", help="override [server] runtime_dir")

    s = command(
        "migrate",
        "copy the embedded SQLite database into an empty PostgreSQL one (service stopped)",
    )
    s.add_argument("--to", required=True, metavar="URL", help="postgresql://USER@HOST/DB")
    s.add_argument("--config", help="stepvisor.toml (default: the embedded default)")
    s.add_argument("--state-dir", help="override [server] state_dir: where stepvisor.db is")

    s = command("doctor", "check each isolation layer with a probe activation")
    s.add_argument(
        "--config",
        help="stepvisor.toml (default: the config, dirs and interpreter of the supervisor "
        "--socket names, else the embedded default)",
    )

    s = command("deploy", "deploy every @workflow in a Python file")
    s.add_argument("tenant", help="the tenant to deploy for")
    s.add_argument("file", help="a Python file with @workflow functions")
    s.add_argument(
        "--check",
        action="store_true",
        help="deploy nothing: replay the tenant's in-flight and recent instances against the "
        "file in a sandbox and report which would break (exit 1 if any would)",
    )

    s = command("workflows", "a tenant's code versions: workflows, deploy time, instances pinned")
    s.add_argument("tenant", help="whose workflows")

    s = command(
        "upgrade",
        "move in-flight instances to another code version, each only if its journal replays",
    )
    s.usage = "stepvisor upgrade TENANT (ID... | --all) WORKFLOW [--to VERSION] [options]"
    s.add_argument("tenant", help="whose instances")
    s.add_argument(
        "targets", nargs="+", metavar="ID... WORKFLOW", help="instance ids, then the workflow"
    )
    s.add_argument("--all", action="store_true", help="every in-flight instance of WORKFLOW")
    s.add_argument(
        "--to", metavar="VERSION", help="the version to move to (default: the deployed one)"
    )

    s = command("replay", "replay one instance's journal, entry by entry, and say if it holds")
    instance(s)
    s.add_argument(
        "--file",
        help="replay against this Python file, in this process (default: against the "
        "instance's own code, in a sandbox)",
    )
    s.add_argument("--version", help="replay in a sandbox against this deployed version")

    s = command("run", "create an instance of a deployed workflow")
    s.add_argument("tenant", help="the tenant to run it for")
    s.add_argument("workflow", help="the workflow's name")
    s.add_argument("--id", help="the instance id (default: a new random one)")
    s.add_argument(
        "--params",
        type=_json_arg,
        default=None,
        help="the workflow's params: JSON, @FILE (read from FILE) or - (read from stdin)",
    )
    s.add_argument(
        "--wait",
        action="store_true",
        help="wait for a terminal status; exit 1 if the instance ends errored or terminated",
    )
    s.add_argument(
        "--wait-timeout", type=float, default=3600.0, help="seconds --wait waits (default 3600)"
    )

    instance(command("status", "an instance's status, output and error"))

    s = command("list", "a tenant's instances")
    s.add_argument("tenant", help="whose instances")
    s.add_argument("--status", help="only instances in this status (queued, running, ...)")
    s.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")

    instance(command("history", "an instance's journal and activations"))
    instance(
        command(
            "show",
            "an instance's timeline: steps, attempts and their errors, cold start and "
            "execution times, sleeps and waits, payloads, traceback",
        )
    )
    s = command("top", "a live view of tenants, running and queued steps, latencies, failures")
    s.add_argument("--tenant", help="one tenant's figures only")
    s.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help="refresh every (1 s)"
    )

    s = command("event", "send an event to an instance")
    instance(s)
    s.add_argument("type", help="the event type a wait_for_event waits for")
    s.add_argument(
        "--payload",
        type=_json_arg,
        default=None,
        help="the event's payload: JSON, @FILE (read from FILE) or - (read from stdin)",
    )

    for op in commands.CONTROLS:
        s = command(op, f"{op} an instance")
        instance(s)
        if op == "restart":
            s.add_argument(
                "--from",
                dest="from_step",
                metavar="STEP",
                help="run again from the first step (sleep, wait) of this name, keeping the "
                "journal before it (default: from the start)",
            )

    s = command("stats", "live figures: rates, latencies, failures, fork servers")
    s.add_argument("--tenant", help="one tenant's figures only")
    s.add_argument(
        "--watch", nargs="?", type=float, const=2.0, metavar="SECONDS", help="refresh (every 2 s)"
    )

    command("nodes", "the supervisor nodes sharing the database, and their leases")

    s = command("usage", "per-tenant usage for billing, from the durable roll-up")
    s.add_argument("--tenant", help="one tenant's usage only")
    s.add_argument(
        "--since", type=_since_arg, help="24h, 7d, ... or an ISO date (UTC); default: everything"
    )
    s.add_argument("--hourly", action="store_true", help="one row per tenant and UTC hour")
    s.add_argument("--csv", action="store_true", help="CSV with a header row")

    s = command("logs", "show (and follow) the supervisor's log, filtered")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    s.add_argument("--tenant", help="only lines about this tenant")
    s.add_argument("--instance", help="only lines about this instance")
    s.add_argument(
        "--level", choices=list(logview.LEVELS), default="debug", help="at least this level"
    )
    s.add_argument("--since", type=_since_arg, help="90s, 30m, 24h, 7d or an ISO date (UTC)")
    s.add_argument(
        "-n", "--lines", type=int, default=200, help="last N matches (default 200, 0: all)"
    )
    s.add_argument("--file", help="read this log file (default: ask the supervisor)")
    s.add_argument("--unit", help="read this systemd unit's journal (default: ask)")

    s = command("keys", "remote API keys: new, list, revoke")
    keys = s.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    k = keys.add_parser(
        "new", help="a key pair that acts for TENANT (or --admin)", parents=[common]
    )
    k.add_argument("tenant", nargs="?", help="the tenant the key acts for")
    k.add_argument("--admin", action="store_true", help="acts for every tenant and operations")
    k.add_argument("--out", help="write the key file here (0600); default: print it")
    k.add_argument(
        "--endpoint", help="the tcp:// address clients use (default: the supervisor's own)"
    )
    keys.add_parser(
        "list", help="every key: tenant, created, revoked (no secrets)", parents=[common]
    )
    k = keys.add_parser(
        "revoke", help="stop accepting a key, on open connections too", parents=[common]
    )
    k.add_argument("public", help="the public key as `keys list` shows it (quote it)")

    command("gc", "delete now what has outlived its tenant's retention_days")
    command("reload", "re-read the config file (as SIGHUP does) and print what changed")

    s = command(
        "demo",
        "start a supervisor, run the example workflows of two tenants, print their histories, stop",
    )
    s.add_argument("--keep", action="store_true", help="keep the demo's state directory")
    return p


COMMANDS = {**commands.COMMANDS, **code_commands.COMMANDS}


def main(argv: list[str] | None = None) -> int:
    from stepvisor.client import StepVisorError

    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except BrokenPipeError:
        # The reader went away (`stepvisor list acme | head`): stop quietly, as `cat` does, and
        # keep Python from failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except StepVisorError as exc:
        # a deploy's error quotes the tenant's code and its exception: escaped like any output
        print(render.visible(f"error {exc.code}: {exc.message}"), file=sys.stderr)
        return EXIT_ERROR
    except ProtocolError as exc:
        print(render.visible(f"error {exc.code.value}: {exc.message}"), file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"error IO: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
