"""What operators ask of a running supervisor: reload, stats, info, retention, and the remote
API's keys. A mixin of `daemon.Supervisor`; the API handlers reach it through `api.Host`."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

from protocol.errors import ErrorCode, ProtocolError
from supervisor import journal as j
from supervisor import logs, retention
from supervisor.activations import Activations
from supervisor.cluster import Node
from supervisor.config import Config, ConfigError, Paths, load, needs_restart, with_dirs
from supervisor.config import diff as config_diff
from supervisor.fork_servers import ForkServers
from supervisor.isolation import tenant_interpreter_errors
from supervisor.journal.db import Db
from supervisor.prepared import Prepared
from supervisor.remote_api import RemoteApi, server_keypair
from supervisor.sdnotify import Notifier
from supervisor.stats import WINDOW_S, Stats


class Operations:
    cfg: Config
    paths: Paths
    conn: Db
    node: Node
    config_path: str | None
    dirs: tuple[str | None, str | None]
    notify: Notifier
    stats: Stats
    log: Any
    draining: bool
    acts: Activations
    prepared: Prepared
    tenants: list[str]
    remote: RemoteApi | None
    next_gc: float
    vacuum_due: bool

    fork_servers: ForkServers

    def keys_changed(self) -> None:
        if self.remote is not None:
            self.remote.load_keys(j.api_keys(self.conn))

    def server_key(self) -> str:
        """The public half of the remote API's CURVE key pair (made now if need be, so keys
        handed out before a tcp_endpoint is configured work once it is)."""
        return server_keypair(self.paths.state_dir)[0].decode()

    def _status(self) -> str:
        """systemd's one-line STATUS (`systemctl status stepvisor`)."""
        state = "draining" if self.draining else "serving"
        return (
            f"{state}: {self.acts.active} steps running, "
            f"{len(self.prepared)} prepared, "
            f"{len(self.acts) - self.acts.active - len(self.prepared)} exiting, "
            f"{len(self.tenants)} tenants"
        )

    def _reload(self) -> None:
        with contextlib.suppress(ProtocolError):  # logged; SIGHUP has nobody to tell
            self.reload_config()

    def _collect(self, now: float, mono: float) -> retention.Pass:
        if not j.try_lock_retention(self.conn):  # another node is deleting: its turn
            self.next_gc = mono + self.cfg.server.retention_interval_s
            return retention.Pass()
        done = retention.collect(self.conn, self.cfg, list(self.tenants), now)
        if done.instances or done.inspections:
            self.log.info(
                "retention.deleted", instances=done.instances, inspections=done.inspections
            )
            self.vacuum_due = True
        self.next_gc = mono + (
            retention.SOON_S if done.full else self.cfg.server.retention_interval_s
        )
        return done

    def collect_garbage(self) -> dict[str, Any]:
        """`stepvisor gc`: retention passes now, for up to a second; `more` when the backlog
        outlasted that (call again)."""
        total = retention.Pass()
        deadline = time.monotonic() + 1.0
        while True:
            done = self._collect(time.time(), time.monotonic())
            total.instances += done.instances
            total.inspections += done.inspections
            if not done.full or time.monotonic() > deadline:
                break
        return {"instances": total.instances, "inspections": total.inspections, "more": done.full}

    def stats_view(self, tenant: str | None) -> dict[str, Any]:
        """`stepvisor stats`: the last minute's activations, what runs and waits now, overall and
        per tenant; with `tenant`, that tenant's figures only."""
        mono = time.monotonic()
        counts = j.instance_counts(self.conn, tenant)
        names = [tenant] if tenant else sorted(set(self.tenants) | self.stats.tenants())
        windows = self.stats.by_tenant(mono)
        idle = self.stats.summary(mono, [])
        view: dict[str, Any] = {
            "uptime_s": round(mono - self.stats.started, 1),
            "window_s": WINDOW_S,
        }
        if tenant is None:
            everyone: Counter[str] = Counter()
            for per_status in counts.values():
                everyone.update(per_status)
            view |= {
                "launch_mode": self.cfg.server.launch_mode,
                "database": self.conn.describe(),
                "node": self.node.id,
                "draining": self.draining,
                "running": self.acts.active,
                "exiting": len(self.acts) - self.acts.active - len(self.prepared),
                # launched ahead of steps: waiting now, and since start made, given a step,
                # and stopped without one
                "prepared": {"waiting": len(self.prepared), **asdict(self.prepared.tally)},
                "instances": dict(sorted(everyone.items())),
                **self.stats.window(mono),
                "failures_since_start": self.stats.failures_since_start(),
                "fork_servers": self.fork_servers.view(mono, self.cfg.server.fork_spares),
                "loop": self.stats.loop._asdict(),  # since start: iterations, commits, syncs
            }
        view["tenants"] = {
            name: {
                "running": self.acts.running(name),
                "instances": dict(sorted(counts.get(name, {}).items())),
                **windows.get(name, idle),
                "failures_since_start": self.stats.failures_since_start(name),
            }
            for name in names
        }
        return view

    def info(self) -> dict[str, Any]:
        """Where things are, for `stepvisor logs` and operators."""
        log_file = self.cfg.server.log_file
        return {
            "pid": os.getpid(),
            "config": None if self.config_path is None else os.path.abspath(self.config_path),
            "state_dir": str(self.paths.state_dir),
            "runtime_dir": str(self.paths.runtime_dir),
            "python": self.paths.python,
            "api": self.paths.api_endpoint,
            "tcp": None if self.remote is None else self.remote.endpoint,
            "server_key": None if self.remote is None else self.remote.public.decode(),
            "launch_mode": self.cfg.server.launch_mode,
            "log_file": os.path.abspath(log_file) if log_file else None,
            "journal_unit": logs.journal_unit(),
        }

    def reload_config(self) -> dict[str, Any]:
        """Re-read the config file. New limits apply to activations launched from now on; a
        file that does not validate, or that changes what only a restart applies, is refused
        (CONFIG) and the running config stays."""
        self.notify.reloading()
        if why := logs.reopen():  # a reload also follows a log rotation
            self.log.error("log.reopen_failed", error=why)
        try:
            if self.config_path is None:
                raise ConfigError(
                    "running on the embedded default config: no file to reload "
                    "(start with --config FILE)"
                )
            new = with_dirs(load(self.config_path), *self.dirs)
            if errors := tenant_interpreter_errors(new):
                raise ConfigError(f"{self.config_path}: " + "; ".join(errors))
            changes = config_diff(self.cfg, new)
            if fixed := needs_restart(changes):
                raise ConfigError(
                    f"{self.config_path}: {', '.join(fixed)} change only with a restart; "
                    "nothing was applied"
                )
        except ConfigError as exc:
            self.log.error("config.reload_rejected", error=str(exc))
            self.notify.ready(self._status())
            raise ProtocolError(ErrorCode.CONFIG, str(exc)) from None
        self.cfg = new
        view = {key: {"old": old, "new": now} for key, (old, now) in changes.items()}
        self.log.info("config.reloaded", path=str(self.config_path), changes=view)
        self.notify.ready(self._status())
        return {"path": str(self.config_path), "changes": view}
