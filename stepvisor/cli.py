"""The `stepvisor` command. Errors print `error CODE: sentence` to stderr and exit non-zero."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import sys
import time
from typing import Any

from protocol.codec import load_json
from protocol.errors import ProtocolError
from stepvisor import logview, render

EXIT_ERROR = 1
EXIT_USAGE = 2


def _json_arg(text: str) -> Any:
    try:
        return load_json(text.encode(), what="argument")
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stepvisor", description=__doc__)
    p.add_argument("--version", action="version", version=f"stepvisor {_version()}")
    p.add_argument(
        "--socket",
        help="API endpoint (ipc://PATH or a path); default "
        "$STEPVISOR_SOCKET or the embedded default's socket",
    )
    p.add_argument(
        "--credentials",
        help="key file for the remote tcp:// API (default $STEPVISOR_CREDENTIALS)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a reply")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the supervisor in the foreground")
    s.add_argument("--config", help="stepvisor.toml (default: the embedded default)")
    s.add_argument("--state-dir", help="override [server] state_dir")
    s.add_argument("--runtime-dir", help="override [server] runtime_dir")

    s = sub.add_parser(
        "migrate",
        help="copy the embedded SQLite database into an empty PostgreSQL one (service stopped)",
    )
    s.add_argument("--to", required=True, metavar="URL", help="postgresql://USER@HOST/DB")
    s.add_argument("--config", help="stepvisor.toml (default: the embedded default)")
    s.add_argument("--state-dir", help="override [server] state_dir: where stepvisor.db is")

    s = sub.add_parser("doctor", help="check each isolation layer with a probe activation")
    s.add_argument("--config", help="stepvisor.toml (default: the embedded default)")

    s = sub.add_parser("deploy", help="deploy every @workflow in a Python file")
    s.add_argument("tenant")
    s.add_argument("file")

    s = sub.add_parser("run", help="create an instance of a deployed workflow")
    s.add_argument("tenant")
    s.add_argument("workflow")
    s.add_argument("--id")
    s.add_argument("--params", type=_json_arg, default=None, help="JSON")
    s.add_argument("--wait", action="store_true", help="wait for a terminal status")
    s.add_argument("--wait-timeout", type=float, default=3600.0)

    s = sub.add_parser("status", help="an instance's status")
    s.add_argument("tenant")
    s.add_argument("id")

    s = sub.add_parser("list", help="a tenant's instances")
    s.add_argument("tenant")
    s.add_argument("--status")
    s.add_argument("--limit", type=int, default=1000)

    s = sub.add_parser("history", help="an instance's journal and activations")
    s.add_argument("tenant")
    s.add_argument("id")

    s = sub.add_parser("event", help="send an event to an instance")
    s.add_argument("tenant")
    s.add_argument("id")
    s.add_argument("type")
    s.add_argument("--payload", type=_json_arg, default=None, help="JSON")

    for op in ("pause", "resume", "terminate", "restart", "delete"):
        s = sub.add_parser(op, help=f"{op} an instance")
        s.add_argument("tenant")
        s.add_argument("id")

    s = sub.add_parser("stats", help="live figures: rates, latencies, failures, fork servers")
    s.add_argument("--tenant", help="one tenant's figures only")
    s.add_argument(
        "--watch", nargs="?", type=float, const=2.0, metavar="SECONDS", help="refresh (every 2 s)"
    )

    sub.add_parser("nodes", help="the supervisor nodes sharing the database, and their leases")

    s = sub.add_parser("usage", help="per-tenant usage for billing, from the durable roll-up")
    s.add_argument("--tenant")
    s.add_argument(
        "--since", type=_since_arg, help="24h, 7d, ... or an ISO date (UTC); default: everything"
    )
    s.add_argument("--hourly", action="store_true", help="one row per tenant and UTC hour")
    s.add_argument("--csv", action="store_true", help="CSV with a header row")

    s = sub.add_parser("logs", help="show (and follow) the supervisor's log, filtered")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    s.add_argument("--tenant")
    s.add_argument("--instance")
    s.add_argument("--level", choices=list(logview.LEVELS), default="debug", help="at least")
    s.add_argument("--since", type=_since_arg, help="90s, 30m, 24h, 7d or an ISO date (UTC)")
    s.add_argument(
        "-n", "--lines", type=int, default=200, help="last N matches (default 200, 0: all)"
    )
    s.add_argument("--file", help="read this log file (default: ask the supervisor)")
    s.add_argument("--unit", help="read this systemd unit's journal (default: ask)")

    s = sub.add_parser("keys", help="remote API keys: new, list, revoke")
    keys = s.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    k = keys.add_parser("new", help="a key pair that acts for TENANT (or --admin)")
    k.add_argument("tenant", nargs="?")
    k.add_argument("--admin", action="store_true", help="acts for every tenant and operations")
    k.add_argument("--out", help="write the key file here (0600); default: print it")
    k.add_argument(
        "--endpoint", help="the tcp:// address clients use (default: the supervisor's own)"
    )
    keys.add_parser("list", help="every key: tenant, created, revoked (no secrets)")
    k = keys.add_parser("revoke", help="stop accepting a key, on open connections too")
    k.add_argument("public", help="the public key as `keys list` shows it (quote it)")

    sub.add_parser("gc", help="delete now what has outlived its tenant's retention_days")

    sub.add_parser(
        "reload",
        help="make the supervisor re-read its config file (as SIGHUP does); print what changed",
    )

    s = sub.add_parser(
        "demo",
        help="start a supervisor, run the example workflows of two "
        "tenants, print their histories, stop",
    )
    s.add_argument("--keep", action="store_true", help="keep the demo's state directory")
    return p


def _print(args: argparse.Namespace, value: Any, human: str | None = None) -> None:
    """JSON (ASCII-only: every control, format and non-ASCII character `\\u`-escaped) or the
    human rendering, each of its lines with what a terminal would act on escaped: the
    renderers escape tenant strings, newlines included; this catches any one they miss."""
    if args.json or human is None:
        print(json.dumps(value, indent=None if args.json else 2, default=str))
    else:
        print("\n".join(render.visible(line) for line in human.split("\n")))


def format_history(h: dict[str, Any]) -> str:
    """The instance's journal, one line per entry; every tenant string escaped (`visible`)."""
    v = render.visible
    inst = h["instance"]
    lines = [
        f"{inst['tenant']}/{inst['id']}  workflow={v(inst['workflow'])}  "
        f"version={inst['version']}  status={inst['status']}  "
        f"activations={inst['activations']}"
    ]
    lines.append(
        f"  {'seq':>3}  {'kind':<10} {'name':<22} {'status':<9} {'att':>3}  result / error"
    )
    for e in h["entries"]:
        detail = (
            json.dumps(e["result"])
            if e["error"] is None or e["status"] == "ok"
            else v(f"{e['error']['type']}: {e['error']['message']}")
        )
        if e["kind"] == "sleep":
            detail = f"until {e['until']}"
        if "result_omitted_bytes" in e:  # past what one reply carries
            detail = f"(a result of {e['result_omitted_bytes']} bytes, left out)"
        lines.append(
            f"  {e['seq']:>3}  {e['kind']:<10} {v(e['name'])[:22]:<22} {e['status']:<9} "
            f"{e['attempts']:>3}  {detail[:70]}"
        )
        for f in e.get("failed_attempts") or []:  # kept when a later attempt succeeded
            err = f["error"] or {}
            lines.append(
                f"  {'':>3}  {'':<10} {'':<22} {'attempt':<9} {f['attempt']:>3}  "
                f"{err.get('type')}: {str(err.get('message'))[:60]}"
            )
    if inst["status"] == "complete":
        lines.append(f"  output: {json.dumps(inst['output'])[:200]}")
    if inst["error"]:
        lines.append("  error: " + v(f"{inst['error']['type']}: {inst['error']['message']}"))
    colds = [a["cold_start_ms"] for a in h["activations"] if a["cold_start_ms"] is not None]
    if colds:
        colds.sort()
        lines.append(
            f"  cold start ms: min {colds[0]:.1f}  median {colds[len(colds) // 2]:.1f}  "
            f"max {colds[-1]:.1f}  over {len(colds)} activations"
        )
    return "\n".join(lines)


def format_reload(r: dict[str, Any]) -> str:
    changes = r["changes"]
    if not changes:
        return f"reloaded {r['path']}: nothing changed"
    lines = [f"reloaded {r['path']}:"]
    for key, change in changes.items():
        lines.append(f"  {key}: {json.dumps(change['old'])} -> {json.dumps(change['new'])}")
    return "\n".join(lines)


def _stats(args: argparse.Namespace, c: Any) -> None:
    while True:
        s = c.stats(args.tenant)
        if args.watch and sys.stdout.isatty() and not args.json:
            print("\033[H\033[2J", end="")  # clear the screen between refreshes
        _print(args, s, render.stats(s))
        if not args.watch:
            return
        sys.stdout.flush()
        time.sleep(args.watch)  # the refresh interval the user asked for


def _keys(args: argparse.Namespace, c: Any) -> int:
    if args.keys_cmd == "list":
        rows = c.list_keys()
        human = "\n".join(
            f"{r['public']}  {'admin' if r['admin'] else r['tenant']:<24} created {r['created_at']}"
            + (f"  revoked {r['revoked_at']}" if r["revoked_at"] else "")
            for r in rows
        )
        _print(args, rows, human or "no keys")
        return 0
    if args.keys_cmd == "revoke":
        _print(args, c.revoke_key(args.public), f"revoked {args.public}")
        return 0
    if args.admin == bool(args.tenant):
        print("error USAGE: give a TENANT or --admin (not both)", file=sys.stderr)
        return EXIT_USAGE
    if args.out and os.path.exists(args.out):
        print(f"error USAGE: {args.out} exists; not overwriting a key file", file=sys.stderr)
        return EXIT_USAGE
    key = c.new_key(None if args.admin else args.tenant)
    key["endpoint"] = args.endpoint or c.info()["tcp"]
    text = json.dumps(key, indent=2) + "\n"
    if not args.out:
        print(text, end="")
    else:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        who = "admin" if args.admin else f"tenant {args.tenant}"
        print(f"wrote a key for {who} to {args.out} (public {key['public']})")
    if key["endpoint"] is None:
        print(
            "note: the supervisor has no [server] tcp_endpoint yet; the key works once it has "
            '(add "endpoint": "tcp://HOST:PORT" to the file, or pass one to Client)',
            file=sys.stderr,
        )
    return 0


def _logs(args: argparse.Namespace, endpoint: str | None) -> int:
    from stepvisor.client import Client

    file, unit = args.file, args.unit
    if not (file or unit):
        with Client(endpoint, timeout_s=args.timeout) as c:
            info = c.info()
        file, unit = info["log_file"], info["journal_unit"]
        if not (file or unit):
            print(
                "error LOGS: the supervisor logs to its standard output only (it has no "
                "[server] log_file and is not under systemd): set log_file, or pass --file",
                file=sys.stderr,
            )
            return EXIT_ERROR
    flt = logview.Filter(args.tenant, args.instance, args.level, args.since)
    how = {"as_json": args.json, "keep": args.lines or None, "follow": args.follow}
    lines = logview.from_file(file, flt, **how) if file else logview.from_journal(unit, flt, **how)
    for line in lines:
        print(line, flush=args.follow)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    """Copy the state database into PostgreSQL; refused while a supervisor uses it."""
    import fcntl

    from supervisor import config
    from supervisor.journal import sqlite_to_pg

    try:
        cfg = config.with_dirs(config.load(args.config), args.state_dir, None)
        paths = config.resolve_paths(cfg)
    except config.ConfigError as exc:
        print(f"error CONFIG: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if why := config.database_error(args.to) or ("" if args.to else "empty URL"):
        print(f"error BAD_REQUEST: --to: {why}", file=sys.stderr)
        return EXIT_USAGE
    lock_path = paths.state_dir / "supervisor.lock"
    try:
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the copy is done
            copied = sqlite_to_pg.copy(
                paths.db, args.to, say=lambda line: None if args.json else print(line)
            )
    except BlockingIOError:
        print(
            f"error UNAVAILABLE: a supervisor is running on {paths.state_dir}: stop it first"
            " (systemctl stop stepvisor)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except FileNotFoundError:
        print(f"error NOT_FOUND: no state dir at {paths.state_dir}", file=sys.stderr)
        return EXIT_ERROR
    except sqlite_to_pg.CopyError as exc:
        print(f"error MIGRATE: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(copied))
    else:
        print(
            f"copied {sum(copied.values()):,} rows; set [server] database to the URL and start"
            " the service"
        )
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "serve":
        from supervisor.daemon import serve

        return serve(args.config, args.state_dir, args.runtime_dir)
    if args.cmd == "migrate":
        return _migrate(args)
    if args.cmd == "doctor":
        from supervisor import config, doctor

        try:
            cfg = config.load(args.config)
        except config.ConfigError as exc:
            print(f"error CONFIG: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return doctor.main(cfg, args.json)
    if args.cmd == "demo":
        from stepvisor.demo import main as demo

        return demo(keep=args.keep)

    from stepvisor.client import Client

    endpoint = None
    if args.socket:
        endpoint = args.socket if "://" in args.socket else f"ipc://{args.socket}"
    if args.cmd == "logs":
        return _logs(args, endpoint)
    with Client(endpoint, timeout_s=args.timeout, credentials=args.credentials) as c:
        if args.cmd == "keys":
            return _keys(args, c)
        if args.cmd == "deploy":
            r = c.deploy(args.tenant, args.file)
            _print(
                args,
                r,
                f"deployed {', '.join(r['workflows'])} for {r['tenant']} as version {r['version']}",
            )
        elif args.cmd == "run":
            r = c.create(args.tenant, args.workflow, args.params, id=args.id)
            if args.wait:
                st = c.wait(args.tenant, r["id"], timeout_s=args.wait_timeout)
                _print(args, st)
                # as a shell's `&&` expects: the run did not succeed
                return EXIT_ERROR if st["status"] in ("errored", "terminated") else 0
            else:
                _print(args, r, r["id"])
        elif args.cmd == "status":
            _print(args, c.status(args.tenant, args.id))
        elif args.cmd == "list":
            rows = c.list(args.tenant, args.status, args.limit)
            human = "\n".join(
                f"{r['id']:<24} {render.visible(r['workflow']):<20} {r['status']:<10} "
                f"steps={r['steps']:<4} {r['updated_at']}"
                for r in rows
            )
            _print(args, rows, human)
        elif args.cmd == "history":
            h = c.history(args.tenant, args.id)
            _print(args, h, format_history(h))
        elif args.cmd == "event":
            r = c.send_event(args.tenant, args.id, args.type, args.payload)
            _print(
                args, r, f"event {r['event']} stored" + (" and delivered" if r["delivered"] else "")
            )
        elif args.cmd == "stats":
            _stats(args, c)
        elif args.cmd == "nodes":
            rows = c.nodes()
            _print(args, rows, render.nodes(rows))
        elif args.cmd == "usage":
            rows = c.usage(args.tenant, args.since, hourly=args.hourly)
            _print(args, rows, render.usage_csv(rows) if args.csv else render.usage(rows))
        elif args.cmd == "gc":
            r = c.gc()
            _print(
                args,
                r,
                f"deleted {r['instances']:,} instances and {r['inspections']:,} deploy-check "
                "records past their retention",
            )
        elif args.cmd == "reload":
            r = c.reload()
            _print(args, r, format_reload(r))
        else:
            r = c.control(args.tenant, args.id, args.cmd)
            _print(
                args,
                r,
                f"{args.tenant}/{args.id}: " + ("deleted" if r.get("deleted") else r["status"]),
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    from stepvisor.client import StepVisorError

    args = _parser().parse_args(argv)
    try:
        return _run(args)
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
