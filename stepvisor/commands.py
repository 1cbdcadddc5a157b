"""The handlers of the `stepvisor` commands: each takes the parsed arguments and returns the exit
code. `cli` parses and dispatches from `COMMANDS`; errors a handler does not catch
(`StepVisorError`, `ProtocolError`, `OSError`) are printed there as `error CODE: sentence`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from stepvisor import logview, render, views

if TYPE_CHECKING:
    from stepvisor.client import Client
    from supervisor import config

EXIT_ERROR = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def _print(args: argparse.Namespace, value: Any, human: str | None = None) -> None:
    """JSON (ASCII-only: every control, format and non-ASCII character `\\u`-escaped) or the
    human rendering, each of its lines with what a terminal would act on escaped: the
    renderers escape tenant strings, newlines included; this catches any one they miss."""
    if args.json or human is None:
        print(json.dumps(value, indent=None if args.json else 2, default=str))
    else:
        print("\n".join(render.visible(line) for line in human.split("\n")))


def endpoint(args: argparse.Namespace) -> str | None:
    """`--socket` as an endpoint (a bare path is an ipc:// one); None: the client's default
    ($STEPVISOR_SOCKET, else the embedded default's socket)."""
    if not args.socket:
        return None
    return str(args.socket if "://" in args.socket else f"ipc://{args.socket}")


def _client(args: argparse.Namespace) -> Client:
    from stepvisor.client import Client

    return Client(endpoint(args), timeout_s=args.timeout, credentials=args.credentials)


def _config_error(exc: Exception) -> int:
    print(f"error CONFIG: {exc}", file=sys.stderr)
    return EXIT_USAGE


# ---------------------------------------------------------------- local commands (no daemon)


def serve(args: argparse.Namespace) -> int:
    from supervisor.daemon import serve

    return serve(args.config, args.state_dir, args.runtime_dir)


def doctor(args: argparse.Namespace) -> int:
    """Check the config file given; without one, the supervisor the socket names (its config,
    state and runtime dirs, and interpreter, as it reports them), else the embedded default."""
    from supervisor import config, doctor

    try:
        cfg = config.load(args.config) if args.config else _running_config(args)
    except config.ConfigError as exc:
        return _config_error(exc)
    return doctor.main(cfg, args.json)


def _running_config(args: argparse.Namespace) -> config.Config:
    import msgspec

    from stepvisor.client import StepVisorError
    from supervisor import config

    named = bool(args.socket or os.environ.get("STEPVISOR_SOCKET"))
    try:
        with _client(args) as c:
            info = c.info()
    except StepVisorError as exc:
        if named or exc.code != "UNAVAILABLE":
            raise  # the supervisor asked for is not there: say so, check nothing else
        return config.load(None)  # nobody at the default socket: the embedded default
    cfg = config.with_dirs(config.load(info["config"]), info["state_dir"], info["runtime_dir"])
    server = msgspec.structs.replace(cfg.server, python=info["python"])
    return msgspec.structs.replace(cfg, server=server)


def demo(args: argparse.Namespace) -> int:
    from stepvisor.demo import main

    return main(keep=args.keep)


def migrate(args: argparse.Namespace) -> int:
    """Copy the state database into PostgreSQL; refused while a supervisor uses it."""
    import fcntl

    from supervisor import config
    from supervisor.journal import sqlite_to_pg

    try:
        cfg = config.with_dirs(config.load(args.config), args.state_dir, None)
        paths = config.resolve_paths(cfg)
    except config.ConfigError as exc:
        return _config_error(exc)
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


def logs(args: argparse.Namespace) -> int:
    file, unit = args.file, args.unit
    if not (file or unit):
        with _client(args) as c:
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


# ---------------------------------------------------------------- instance commands


def run(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.create(args.tenant, args.workflow, args.params, id=args.id)
        if not args.wait:
            _print(args, r, r["id"])
            return 0
        st = c.wait(args.tenant, r["id"], timeout_s=args.wait_timeout)
    _print(args, st, views.status(st))
    # as a shell's `&&` expects: the run did not succeed
    return EXIT_ERROR if st["status"] in ("errored", "terminated") else 0


def status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        st = c.status(args.tenant, args.id)
    _print(args, st, views.status(st))
    return 0


def list_(args: argparse.Namespace) -> int:
    with _client(args) as c:
        rows = c.list(args.tenant, args.status, args.limit)
    _print(args, rows, views.instances(rows))
    return 0


def history(args: argparse.Namespace) -> int:
    with _client(args) as c:
        h = c.history(args.tenant, args.id)
    _print(args, h, views.history(h))
    return 0


def show(args: argparse.Namespace) -> int:
    """The instance's timeline (rich); --json: its history as `history --json` prints it."""
    with _client(args) as c:
        h = c.history(args.tenant, args.id)
    if args.json:
        _print(args, h)
        return 0
    from stepvisor.show import print_timeline  # rich: only for this command

    print_timeline(h)
    return 0


def top(args: argparse.Namespace) -> int:
    """A live terminal view (textual) of the stats API; on no terminal, `stats` once."""
    with _client(args) as c:
        if not sys.stdout.isatty() or args.json:
            s = c.stats(args.tenant)
            _print(args, s, render.stats(s))
            return 0
        from stepvisor.top import Top  # textual: only for this command

        Top(lambda: c.stats(args.tenant), args.interval).run()
    return 0


def event(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.send_event(args.tenant, args.id, args.type, args.payload)
    _print(args, r, f"event {r['event']} stored" + (" and delivered" if r["delivered"] else ""))
    return 0


def control(args: argparse.Namespace) -> int:
    """pause, resume, terminate, restart, delete."""
    with _client(args) as c:
        r = c.control(args.tenant, args.id, args.cmd, from_step=getattr(args, "from_step", None))
    done = "deleted" if r.get("deleted") else r["status"]
    _print(args, r, f"{args.tenant}/{args.id}: {done}")
    return 0


CONTROLS = ("pause", "resume", "terminate", "restart", "delete")


# ---------------------------------------------------------------- operator commands


def stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        while True:
            s = c.stats(args.tenant)
            if args.watch and sys.stdout.isatty() and not args.json:
                print("\033[H\033[2J", end="")  # clear the screen between refreshes
            _print(args, s, render.stats(s))
            if not args.watch:
                return 0
            sys.stdout.flush()
            time.sleep(args.watch)  # the refresh interval the user asked for


def nodes(args: argparse.Namespace) -> int:
    with _client(args) as c:
        rows = c.nodes()
    _print(args, rows, render.nodes(rows))
    return 0


def usage(args: argparse.Namespace) -> int:
    with _client(args) as c:
        rows = c.usage(args.tenant, args.since, hourly=args.hourly)
    _print(args, rows, render.usage_csv(rows) if args.csv else render.usage(rows))
    return 0


def gc(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.gc()
    _print(
        args,
        r,
        f"deleted {r['instances']:,} instances and {r['inspections']:,} records of "
        "activations without an instance (deploy checks, unused prepared ones) past their "
        "retention",
    )
    return 0


def reload(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.reload()
    _print(args, r, views.reload(r))
    return 0


def keys(args: argparse.Namespace) -> int:
    return KEY_ACTIONS[args.keys_cmd](args)


def keys_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        rows = c.list_keys()
    human = "\n".join(
        f"{r['public']}  {'admin' if r['admin'] else r['tenant']:<24} created {r['created_at']}"
        + (f"  revoked {r['revoked_at']}" if r["revoked_at"] else "")
        for r in rows
    )
    _print(args, rows, human or "no keys")
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.revoke_key(args.public)
    _print(args, r, f"revoked {args.public}")
    return 0


def keys_new(args: argparse.Namespace) -> int:
    if args.admin == bool(args.tenant):
        print("error USAGE: give a TENANT or --admin (not both)", file=sys.stderr)
        return EXIT_USAGE
    if args.out and os.path.exists(args.out):
        print(f"error USAGE: {args.out} exists; not overwriting a key file", file=sys.stderr)
        return EXIT_USAGE
    with _client(args) as c:
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


KEY_ACTIONS: dict[str, Handler] = {"new": keys_new, "list": keys_list, "revoke": keys_revoke}

COMMANDS: dict[str, Handler] = {
    "serve": serve,
    "migrate": migrate,
    "doctor": doctor,
    "run": run,
    "status": status,
    "list": list_,
    "history": history,
    "show": show,
    "top": top,
    "event": event,
    **dict.fromkeys(CONTROLS, control),
    "stats": stats,
    "nodes": nodes,
    "usage": usage,
    "logs": logs,
    "keys": keys,
    "gc": gc,
    "reload": reload,
    "demo": demo,
}
