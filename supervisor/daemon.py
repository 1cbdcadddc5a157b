"""The supervisor's single-threaded loop: sockets, pipes, signals, timers, scheduling, reaping.

One thread owns all state. Each loop iteration handles everything that is ready inside one
`BEGIN IMMEDIATE` transaction (group commit) and sends replies and acks only after it commits.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import grp
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, cast

import psycopg
import zmq

from protocol.errors import ErrorCode, ProtocolError
from protocol.limits import MAX_CLIENT_FRAME_BYTES as MAX_CLIENT
from protocol.limits import MAX_SANDBOX_FRAME_BYTES as MAX_SANDBOX
from supervisor import (
    api,
    cluster,
    dirs,
    disk,
    engine,
    isolation,
    launcher,
    logs,
    outcome,
    recovery,
    retention,
    sdnotify,
)
from supervisor import journal as j
from supervisor.activation import (
    LAUNCHED,
    PARKED,
    SETTLED,
    Activation,
    DeployRequest,
)
from supervisor.activation_messages import ActivationMessages
from supervisor.activations import Activations
from supervisor.client_requests import LOCAL, REMOTE, Clients
from supervisor.config import (
    Config,
    ConfigError,
    Paths,
    load,
    resolve_paths,
    with_dirs,
    with_embedded_log,
)
from supervisor.fork_servers import ForkServers
from supervisor.janitor import Janitor
from supervisor.launches import Launcher, Sandboxing
from supervisor.operations import Operations
from supervisor.outbox import Outbox
from supervisor.output import OutputCapture
from supervisor.prepared import Prepared
from supervisor.reaper import Reaper
from supervisor.remote_api import RemoteApi
from supervisor.sandbox_server import SandboxServer
from supervisor.stats import Stats

MAX_LAUNCHES_PER_TICK = 32
SANDBOX_HWM = 16  # messages queued per activation connection (it needs three or four)


class StartupError(Exception):
    """The supervisor cannot start; the message says why."""


class Supervisor(Operations):
    def __init__(
        self,
        cfg: Config,
        paths: Paths,
        config_path: str | None = None,
        dirs: tuple[str | None, str | None] = (None, None),
    ) -> None:
        self.cfg = cfg
        self.paths = paths
        self.config_path = config_path
        self.dirs = dirs  # `serve --state-dir/--runtime-dir`: they win over the file's, reloads too
        self.log = logs.get(component="supervisor")
        self.acts = Activations()  # launched and not reaped yet, and the slots they hold
        self.janitor = Janitor()
        self.prepared = Prepared()  # activations launched ahead, waiting for a step
        # Tenants to prepare an activation for, next tick: after this tick's Activates are out,
        # so that launching one does not delay the step it is launched after.
        self.to_prepare: list[str] = []
        self.tenants: list[str] = []
        self.outbox = Outbox(self.log)
        self.signals: list[int] = []
        self.draining = False
        self.drain_deadline = 0.0
        self.rr = 0
        self.more_due = False
        self.notify = sdnotify.Notifier()
        self.stats = Stats(time.monotonic())
        self.next_gc = time.monotonic() + 1.0  # the first retention pass, after start-up
        self.next_deadline = math.inf  # the soonest deadline of a running activation
        # What `_schedule` found as the next wake-up, with the connection's change count then:
        # the tick's poll timeout reuses it when nothing was written since.
        self.wake_seen: tuple[int, float | None] | None = None
        self.next_tenants = 0.0  # when to re-read the tenant list (others deploy too)
        self.vacuum_due = False  # retention freed pages: give some back after the commit
        self.unsynced = False  # committed rows not fsynced yet (synchronous = "acked")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        # Signals first: a SIGTERM during recovery is queued and drains the first tick.
        self.wake_r, self.wake_w = socket.socketpair()
        for s in (self.wake_r, self.wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self._on_signal)
        if self.config_path is None:
            print(
                f"stepvisor: embedded default config; state in {self.paths.state_dir}, "
                f"API at {self.paths.api_endpoint}, log in {self.cfg.server.log_file}",
                file=sys.stderr,
            )
        self._make_dirs()
        self._lock = open(self.paths.state_dir / "supervisor.lock", "w")  # noqa: SIM115
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StartupError(
                f"another supervisor is running on state dir {self.paths.state_dir}"
            ) from None
        if self.config_path is None:
            if why := logs.add_file(self.cfg.server.log_file):
                raise StartupError(why)
            self.log.info(
                "config.embedded_default",
                state_dir=str(self.paths.state_dir),
                api=self.paths.api_endpoint,
                log_file=self.cfg.server.log_file,
            )
        if errors := isolation.tenant_interpreter_errors(self.cfg):
            raise StartupError("; ".join(errors))
        try:
            self.layers, self.cgroups = isolation.resolve(
                self.cfg, self.paths.state_dir, self.paths.python
            )
        except (isolation.IsolationError, OSError) as exc:
            raise StartupError(str(exc)) from None
        for layer in self.layers.values():
            if layer.enabled:
                self.log.info("isolation.layer", layer=layer.name, detail=layer.detail)
            elif getattr(self.cfg.isolation, layer.name) != "off":
                self.log.warning("isolation.unavailable", layer=layer.name, reason=layer.detail)
        self.scratch = disk.ScratchSpace(
            launcher.scratch_root(self.paths), quota=self.layers["disk"].enabled
        )
        if os.geteuid() == 0 and self.cfg.isolation.uid == "off":
            self.log.warning(
                "isolation.uid_off",
                detail="[isolation] uid = off: tenant code runs as root, without capabilities; "
                'set uid = "auto" to give each activation a sandbox uid',
            )
        try:
            self._check_uid_reach()
        except StartupError:
            if self.cgroups is not None:
                self.cgroups.close()
            raise
        if self.cfg.server.launch_mode == "fork":
            # Forked activations are re-parented to us, so we reap them like spawned ones.
            _set_child_subreaper()
        self.conn = self._connect()
        if not j.is_incremental(self.conn):
            self.log.warning(
                "database.not_incremental",
                detail="retention frees pages for reuse but the file does not shrink; to convert,"
                " stop the service and run: sqlite3 stepvisor.db "
                "'PRAGMA auto_vacuum=INCREMENTAL; VACUUM'",
            )
        self.poller = zmq.Poller()
        self.fork_servers = ForkServers(self.paths, self.poller, self.log)
        self.node = cluster.Node(
            self.cfg.server.node_name or cluster.default_node_id(self.paths.state_dir),
            self.cfg.server.lease_s,
            self.paths.state_dir,
            self.cfg.server.database,
            self.poller,
            self.log,
        )
        try:
            with j.transaction(self.conn):
                self.node.register(self.conn, time.time(), time.monotonic())
        except cluster.NodeConflict as exc:
            self.conn.close()
            if self.cgroups is not None:
                self.cgroups.close()
            raise StartupError(str(exc)) from None
        if self.uids is not None:
            self.uids.load(j.uid_owners(self.conn))
        recovery.recover(
            self.conn,
            self.cfg,
            self.cgroups,
            self.scratch,
            self.node.id,
            with_uids=self.uids is not None,
            log=self.log,
        )
        self.zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.client = self._bind(
            self.paths.api_endpoint, 0o660, _group(self.cfg.server.api_group), 2 * MAX_CLIENT
        )
        # Activations with their own uids must be able to connect; their tokens guard the rest.
        # What one of them may queue here is small: a peer whose message is over the limit is
        # dropped, and one with SANDBOX_HWM messages waiting is not read, so a flood costs the
        # supervisor neither memory nor the other activations their turn.
        self.sandbox = SandboxServer(
            Path(self.paths.sandbox_endpoint.removeprefix("ipc://")),
            mode=0o666 if self.uids else 0o660,
            max_message=2 * MAX_SANDBOX,
            max_queued=SANDBOX_HWM,
            log=self.log,
            admit=lambda identity, uid: self.messages.admit(identity, uid),
        )
        self.poller.register(self.client, zmq.POLLIN)
        self.poller.register(self.sandbox.fileno(), zmq.POLLIN)
        self.poller.register(self.wake_r.fileno(), zmq.POLLIN)
        self.remote = self._remote_api()
        self.clients = Clients(
            cast(api.Host, self),
            self.conn,
            self.outbox,
            self.client,
            self.remote,
            self.node,
            self.log,
            known=lambda tenant: tenant in self.tenants,
            add_tenant=self._add_tenant,
        )
        self.node.listen()
        self.output = OutputCapture(self.poller)
        self.messages = ActivationMessages(
            self.conn,
            self.sandbox,
            self.acts,
            self.prepared,
            self.outbox,
            self.clients,
            self.output,
            self.log,
            config=lambda: self.cfg,
            add_tenant=self._add_tenant,
        )
        self.reaper = Reaper(
            self.conn,
            self.acts,
            self.messages,
            self.output,
            self.stats,
            self.janitor,
            self.fork_servers,
            self.cgroups,
            self.uids,
            config=lambda: self.cfg,
        )
        self.launcher = Launcher(
            self.conn,
            self.paths,
            self.node,
            self.acts,
            self.prepared,
            self.messages,
            self.reaper,
            self.output,
            self.fork_servers,
            self.scratch,
            Sandboxing(self.layers, self.cgroups, self.uids, self.root_needs_uid),
            self.log,
            config=lambda: self.cfg,
        )
        if self.cfg.server.launch_mode == "fork":
            try:  # now, so the first activation does not wait for the fork server's imports
                self.fork_servers.start(self.paths.python, self.cfg.server.fork_spares)
            except OSError as exc:
                self.log.warning("zygote.failed", error=str(exc))
        self.tenants = j.tenant_names(self.conn)
        self.log.info(
            "supervisor.ready",
            api=self.paths.api_endpoint,
            sandbox=self.paths.sandbox_endpoint,
            state_dir=str(self.paths.state_dir),
            db=self.conn.describe(),
            node=self.node.id,
            python=self.paths.python,
            launch_mode=self.cfg.server.launch_mode,
            pid=os.getpid(),
        )
        # What start-up made (modules, classes, config, recovery) lives as long as the process:
        # out of the collector's generations, a collection walks only what the loop makes.
        gc.collect()
        gc.freeze()
        self.notify.ready(self._status())

    def _connect(self) -> j.Db:
        database = self.cfg.server.database
        try:
            return j.connect(
                database or self.paths.db,
                synchronous=self.cfg.server.synchronous,
                before_rebuild=self._before_rebuild,
                lease_s=self.cfg.server.lease_s,
            )
        except psycopg.Error as exc:
            raise StartupError(
                f"server.database: cannot use {j.safe_url(database)}: {str(exc).strip()}"
            ) from None

    def _beat(self, now: float, mono: float) -> None:
        """Renew this node's lease (re-running the work of nodes whose leases lapsed), and
        re-read the tenants now and then: other nodes deploy too."""
        self.more_due |= self.node.beat(self.conn, now, mono)
        if mono >= self.next_tenants:  # tenants deployed through other nodes
            self.next_tenants = mono + self.node.beat_every_s
            self.tenants = j.tenant_names(self.conn)

    def _add_tenant(self, tenant: str) -> None:
        """A tenant this node had not seen: its first deploy, here or through another node."""
        if tenant not in self.tenants:
            self.tenants.append(tenant)

    def _before_rebuild(self, size: int) -> None:
        """The database is rebuilt once for incremental vacuum: tell systemd it may take a while
        (EXTEND_TIMEOUT_USEC) and say so in the log."""
        self.log.info("database.rebuilding", bytes=size, reason="auto_vacuum = INCREMENTAL")
        self.notify.send(f"EXTEND_TIMEOUT_USEC={600 * 10**6}")

    def _make_dirs(self) -> None:
        """The state dir (0700) and the runtime dir, made or checked (`dirs`). The runtime dir
        is 0755 for a root supervisor, whose sandbox uids reach the sandbox socket in it, and
        private otherwise (0711 when an api_group's members must reach the API socket)."""
        server = self.cfg.server
        runtime_mode = 0o755 if os.geteuid() == 0 else 0o711 if server.api_group else 0o700
        try:
            for path, mode, key, configured in (
                (self.paths.state_dir, 0o700, "server.state_dir", server.state_dir),
                (self.paths.runtime_dir, runtime_mode, "server.runtime_dir", server.runtime_dir),
            ):
                dirs.ensure_private_dir(path, mode, key, follow_symlink=bool(configured))
        except dirs.UnsafeDir as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot make {exc.filename}: {exc.strerror}") from None

    def _check_uid_reach(self) -> None:
        """Tenant code never runs as root: a root supervisor has a sandbox uid for each
        activation unless `[isolation] uid = "off"` says otherwise (`isolation.resolve`
        refuses the start when it cannot). Sandbox uids must reach the sandbox socket."""
        low, high = self.cfg.isolation.sandbox_uid_range
        self.uids = isolation.UidPool(low, high) if self.layers["uid"].enabled else None
        self.root_needs_uid = os.geteuid() == 0 and self.cfg.isolation.uid != "off"
        if self.root_needs_uid and self.uids is None:
            raise StartupError("tenant code would run as root: the uid layer is not enabled")
        if self.uids is not None and (why := isolation.runtime_unreachable(self.paths.runtime_dir)):
            raise StartupError(why)

    def _remote_api(self) -> RemoteApi | None:
        endpoint = self.cfg.server.tcp_endpoint
        if not endpoint:
            return None
        try:
            remote = RemoteApi(self.zctx, endpoint, self.paths.state_dir, self.log)
        except zmq.ZMQError as exc:
            raise StartupError(f"server.tcp_endpoint: cannot bind {endpoint}: {exc}") from None
        remote.load_keys(j.api_keys(self.conn))
        for sock in (remote.sock, remote.zap, remote.monitor):
            self.poller.register(sock, zmq.POLLIN)
        self.log.info(
            "api.remote",
            endpoint=remote.endpoint,
            server_key=remote.public.decode(),
            keys=len(remote.keys),
        )
        return remote

    def _bind(self, endpoint: str, mode: int, gid: int, max_frame: int) -> zmq.Socket[bytes]:
        sock = self.zctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame)  # a hard cap above the codec's own checks
        path = Path(endpoint.removeprefix("ipc://"))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale socket of a dead supervisor; the state-dir lock is held
        sock.bind(endpoint)
        path.chmod(mode)
        if gid != -1:
            os.chown(path, -1, gid)
        return sock

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)  # the loop does the work; the wake-up fd wakes it

    def run(self) -> int:
        self.start()
        code = 0
        try:
            while True:
                try:
                    ready = dict(self.poller.poll(self._poll_timeout_ms()))
                    self._tick(ready)
                except cluster.NodeFenced as exc:
                    self.log.error("node.fenced", node=self.node.id, detail=str(exc))
                    self._stop_remaining(outcome.FENCED, str(exc))
                    code = cluster.EXIT_FENCED
                    break
                except j.CONNECTION_LOST as exc:
                    # The database is gone (server down, connection cut, or our session ended
                    # by the server: paused past half a lease inside this tick's transaction):
                    # this tick's writes were rolled back, so what the loop holds in memory no
                    # longer matches what is committed. Stop, and let a restart recover from
                    # the database.
                    self.log.error("database.lost", error=str(exc).strip()[:500])
                    self.reaper.kill_all()
                    code = cluster.EXIT_FENCED
                    break
                if self.draining and (not self.acts or time.monotonic() > self.drain_deadline):
                    self._stop_remaining(outcome.INTERRUPTED, "the supervisor was stopped")
                    with j.transaction(self.conn):
                        j.stop_node(self.conn, self.node.id, time.time())
                    break
        finally:
            self._close()
        self.log.info("supervisor.stopped", exit_code=code)
        return code

    def _close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.fork_servers.close()
        if self.remote is not None:
            self.remote.close()
        self.client.close(linger=0)
        self.sandbox.close()
        self.zctx.term()
        with contextlib.suppress(OSError):
            Path(self.paths.api_endpoint.removeprefix("ipc://")).unlink()
        self.node.close()
        self.conn.close()
        if self.cgroups is not None:
            self.cgroups.close()
        self.scratch.close()
        self._lock.close()

    # ------------------------------------------------------------------ one iteration

    def _tick(self, ready: dict[Any, int]) -> None:
        now, mono = time.time(), time.monotonic()
        changes = self.conn.total_changes
        with j.transaction(self.conn):
            self._beat(now, mono)  # first: a node fenced meanwhile must not act on anything
            due, kills = self.node.notifications(ready)
            self.more_due |= due
            for aid in kills:
                self._kill_stopped_elsewhere(aid)
            if self.wake_r.fileno() in ready:
                self._drain_wakeups()
            self._handle_signals(mono)
            if self.client in ready:
                self.clients.drain(self.client, LOCAL, now)
            if self.remote is not None:
                if self.remote.zap in ready:
                    self.remote.on_zap()
                if self.remote.monitor in ready:
                    self.remote.on_monitor()
                if self.remote.sock in ready:
                    self.clients.drain(self.remote.sock, REMOTE, now)
            # Before the activations' messages: a Hello in this tick finds its pid known.
            for python in self.fork_servers.due(ready):
                self.launcher.on_fork_server(python, now, mono)
            if self.sandbox.fileno() in ready or self.sandbox.pending:
                self.messages.drain(now, mono)
            self.sandbox.expire(mono)
            self.output.ready(list(ready))
            self.reaper.reap(now, mono)
            self.janitor.tick()
            self._check_deadlines(now, mono)
            if not self.draining:
                self._schedule(now, mono)
                if mono >= self.next_gc:
                    self._collect(now, mono)
            self.node.notify_if_woke(self.conn)
        wrote = self.conn.total_changes != changes
        self.unsynced |= wrote
        self.outbox.send_activates()  # committed is enough for these: see outbox.py
        synced = bool(
            self.outbox.acknowledges and self.unsynced and self.cfg.server.synchronous == "acked"
        )
        if synced:
            # One fsync for everything this tick acknowledges; what no tick acknowledged yet
            # (launches, step starts, reap records) rides along.
            self.conn.sync()
            self.unsynced = False
        self.stats.iterated(wrote=wrote, synced=synced)
        committed = time.monotonic()
        for act in self.messages.settled_this_tick:
            act.committed_mono = committed
        self.messages.settled_this_tick.clear()
        self.outbox.send_acknowledgements()
        if self.vacuum_due:  # after the acknowledgements: nothing waits for it
            j.give_back_space(self.conn, retention.VACUUM_PAGES)
            self.vacuum_due = False
        self.notify.watchdog(mono, self._status)

    def _poll_timeout_ms(self) -> int:
        if self.more_due or self.output.busy() or self.to_prepare or self.sandbox.pending:
            return 0
        mono, now = time.monotonic(), time.time()
        wait = min(1.0, self.node.next_beat - mono, self.next_deadline - mono)
        if not self.draining:
            wait = min(wait, self.next_gc - mono)
            seen, self.wake_seen = self.wake_seen, None
            if seen is not None and seen[0] == self.conn.total_changes:
                nxt = seen[1]
            else:
                nxt = j.next_wake(self.conn)
            # A due instance blocked by concurrency waits for a result or a reap: both wake us.
            if nxt is not None and nxt > now:
                wait = min(wait, nxt - now)
        return max(0, int(wait * 1000) + 1)

    # ------------------------------------------------------------------ signals

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self.wake_r.recv(4096):
                pass

    def _handle_signals(self, mono: float) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT) and not self.draining:
                self.draining = True
                self.drain_deadline = mono + self.cfg.server.drain_timeout_s
                self.notify.stopping(self._status())
                self.log.info(
                    "supervisor.draining",
                    running=len(self.acts),
                    deadline_s=self.cfg.server.drain_timeout_s,
                )
                self.to_prepare.clear()
                for act in self.prepared.all():
                    self._stop_prepared(act, "the supervisor is draining")
            elif signum == signal.SIGHUP:
                self._reload()
            elif signum == signal.SIGCHLD:
                self.reaper.child_exited = True

    # ------------------------------------------------------------------ recovery

    # ------------------------------------------------------------------ client API

    # Host protocol for api handlers ----------------------------------------------------

    def launch_inspection(self, tenant: str, request: DeployRequest) -> None:
        if why := self.launcher.interpreter_refusal(self.cfg.limits_for(tenant)):
            raise ProtocolError(ErrorCode.DEPLOY_FAILED, why)
        if self.uids is not None and not self.uids.has_free(tenant):
            self._make_room(tenant)  # for the retry
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                "every sandbox uid is in use or another tenant's (isolation.sandbox_uid_range):"
                " retry the deploy",
            )
        j.ensure_tenant(self.conn, tenant, time.time())  # numbered now: its sandbox group
        try:
            act = self.launcher.launch(
                tenant, None, "inspect", time.time(), time.monotonic(), deploy=request
            )
        except ProtocolError:
            self.more_due = True  # the uid picked went to another node's tenant: look again
            raise
        self._launched(act)

    def kill_instance_activation(self, tenant: str, instance: str, why: str) -> None:
        for act in self.acts.all():
            if act.tenant == tenant and act.instance == instance and act.state != SETTLED:
                launcher.kill_group(act.pid)
                self.messages.settle(act, why, "stopped by an operator request", time.monotonic())
                return
        # Not here: the activation holding it runs on another node, which kills it when this
        # transaction commits (its commits are fenced meanwhile: the lease is gone).
        inst = j.get_instance(self.conn, tenant, instance)
        if inst is not None and inst["lease"] is not None:
            j.notify_kill(self.conn, int(inst["lease"]))

    def _kill_stopped_elsewhere(self, aid: int) -> None:
        for act in self.acts.all():
            if act.aid == aid and act.state != SETTLED:
                launcher.kill_group(act.pid)
                detail = "stopped by an operator request through another node"
                self.messages.settle(act, outcome.KILLED_BY_OPERATOR, detail, time.monotonic())

    # ------------------------------------------------------------------ scheduling & launch

    def _schedule(self, now: float, mono: float) -> None:
        self._prepare(now, mono)
        nxt = j.next_wake(self.conn)
        self.wake_seen = (self.conn.total_changes, nxt)
        self.more_due = False
        if nxt is None or nxt > now:
            return
        launched = 0
        order = (
            self.tenants[self.rr % max(1, len(self.tenants)) :]
            + self.tenants[: self.rr % max(1, len(self.tenants))]
        )
        self.rr += 1
        progress = True
        while progress:
            progress = False
            for tenant in order:
                if self.acts.active >= self.cfg.server.max_activations:
                    return
                if launched >= MAX_LAUNCHES_PER_TICK:
                    self.more_due = True
                    return
                most = self.cfg.limits_for(tenant).max_concurrent
                # More than `most` exiting: its stragglers hold back its own launches. One
                # exiting at `max_concurrent = 1` must not: the next step would wait for a reap.
                running = self.acts.running(tenant)
                if running >= most or self.acts.exiting(tenant) > most:
                    continue
                if (
                    self.uids is not None
                    and tenant not in self.prepared.waiting  # its prepared one has a uid
                    and not self.uids.has_free(tenant)
                ):
                    # Its uids are all busy and every other uid is another tenant's.
                    self._make_room(tenant)
                    continue
                busy = self.node.busy_elsewhere(self.conn, tenant, running, most)
                if busy is None:  # another node is launching its work: look again shortly
                    self.more_due = True
                if busy is not False:
                    continue
                due = j.due_instances(self.conn, tenant, now, 1)
                if due:
                    self._start_step(tenant, due[0], now, mono)
                    launched += 1
                    progress = True

    def _start_step(self, tenant: str, instance: str, now: float, mono: float) -> None:
        """Give a due step a process: one prepared for its tenant, else a new one; then prepare
        the tenant's next when its work looks steady."""
        limits = self.cfg.limits_for(tenant)
        act, stale = self.prepared.take(tenant, limits)
        for old in stale:
            self._stop_prepared(old, "its tenant's limits changed since it was launched")
        if act is None:
            self._launched(self.launcher.launch(tenant, instance, "run", now, mono))
        else:
            self._give_step(act, instance, now)
        steady = self.prepared.launched(tenant, mono, self.cfg.server.prepared_idle_s)
        if steady and tenant not in self.to_prepare:
            self.to_prepare.append(tenant)

    def _prepare(self, now: float, mono: float) -> None:
        """Launch the prepared activations the last tick asked for, up to `prepared_per_tenant`
        waiting per tenant, while there is room: at most `max_activations` wait at once, and
        one never takes a tenant's last free uid."""
        server = self.cfg.server
        for tenant in self.to_prepare:
            for _ in range(self.prepared.missing(tenant, server.prepared_per_tenant)):
                if len(self.prepared) >= server.max_activations or (
                    self.uids is not None and not self.uids.has_free(tenant)
                ):
                    break
                self._launched(self.launcher.launch(tenant, None, "run", now, mono, prepared=True))
        self.to_prepare.clear()

    def _launched(self, act: Activation | None) -> None:
        """Watch a launched activation's hello deadline; none launched (another node took the
        uid picked) means look again next tick."""
        if act is None:
            self.more_due = True
        else:
            self.next_deadline = min(self.next_deadline, act.deadline_mono)

    def _give_step(self, act: Activation, instance: str, now: float) -> None:
        """Give a prepared activation its step: it holds the instance's lease and its tenant's
        concurrency slot from now on, and gets its Activate as soon as it has said Hello."""
        act.instance, act.bound_mono = instance, time.monotonic()
        act.log = act.log.bind(instance=instance)
        self.acts.hold_slot(act)
        j.update_activation(self.conn, act.aid, instance=instance, bound_at=now)
        engine.launched(self.conn, act.tenant, instance, act.aid, now)
        if act.state == PARKED:
            self.messages.activate(act, now, act.bound_mono)

    def _stop_prepared(self, act: Activation, why: str) -> None:
        """Stop a prepared activation that never got a step: recorded as `unused`."""
        self.prepared.forget(act)
        # Not forked yet (pid 0): once the fork server names it, it is killed as a straggler.
        launcher.kill_group(act.pid)
        self.messages.settle(act, outcome.UNUSED, why, time.monotonic(), committed=True)

    def _make_room(self, tenant: str) -> None:
        """A step of `tenant` is due and finds no free sandbox uid: give up another tenant's
        prepared activation, if one waits; its uid is free once its process is reaped, a tick
        or two later. A prepared activation must never be why a due step waits for long."""
        if (act := self.prepared.oldest(but=tenant)) is not None:
            self._stop_prepared(act, "its slot was needed for a due step")
            self.more_due = True

    def _check_deadlines(self, now: float, mono: float) -> None:
        """Act on every deadline passed, and note the soonest one left for the poll timeout
        (launches later in the tick lower it): one pass over the running activations."""
        for failed in self.fork_servers.check(mono, self.cfg.server.fork_server_idle_s):
            self.launcher.fork_server_failed(failed)
        grace = self.cfg.server.settled_grace_s
        soonest = math.inf
        for act in self.acts.all():
            self._check_deadline(act, now, mono, grace)
            if act in self.acts:
                limit = act.settled_mono + grace if act.settled_mono else act.deadline_mono
                soonest = min(soonest, limit)
        self.next_deadline = soonest

    def _check_deadline(self, act: Activation, now: float, mono: float, grace: float) -> None:
        if act.state == SETTLED:
            if act.settled_mono is not None and mono > act.settled_mono + grace:
                self.reaper.kill_straggler(act)
            return
        if mono <= act.deadline_mono:
            return
        if act.state == PARKED:
            self._stop_prepared(act, f"no step for it within {self.cfg.server.prepared_idle_s:g} s")
            return
        launcher.kill_group(act.pid)
        if act.state == LAUNCHED:
            self.messages.settle(
                act,
                outcome.NEVER_CONNECTED,
                f"no Hello within {self.cfg.server.hello_timeout_s:g} s",
                mono,
            )
            if act.pid == 0:  # still waiting for the fork server: there is nothing to reap
                self.reaper.unreaped(act, now, mono)
        else:
            limit = act.deadline_mono - (act.hello_mono or act.launched_mono)
            self.messages.settle(
                act, outcome.WALL_TIMEOUT, f"still running after {limit:.3g} s", mono
            )

    # ------------------------------------------------------------------ drain

    def _stop_remaining(self, how: str, detail: str) -> None:
        """Drain deadline passed, or this node was fenced: kill what still runs; its steps
        re-run after restart (or already re-run on the node that fenced this one)."""
        mono = time.monotonic()
        with j.transaction(self.conn):
            for act in self.acts.all():
                launcher.kill_group(act.pid)
                self.messages.settle(act, how, detail, mono)
                if act.pid == 0:  # the fork server never answered for it: nothing to reap
                    self.reaper.unreaped(act, time.time(), mono)
        deadline = mono + 5.0
        while self.acts.any_pid() and time.monotonic() < deadline:
            with j.transaction(self.conn):
                self.reaper.reap_exited(time.time(), time.monotonic())
            if self.acts.any_pid():
                time.sleep(0.01)  # bounded: waiting for killed children to become reapable
        self.log.info("supervisor.drained")


def _group(name: str) -> int:
    """`[server] api_group` as a gid; -1 when unset."""
    if not name:
        return -1
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise StartupError(f"server.api_group: no group named {name!r}") from None


def _set_child_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise StartupError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


def serve(
    config_path: str | None, state_dir: str | None = None, runtime_dir: str | None = None
) -> int:
    """`stepvisor serve`: validate config, recover, bind, loop until SIGTERM."""
    try:
        cfg = with_dirs(load(config_path), state_dir, runtime_dir)
        paths = resolve_paths(cfg)
    except ConfigError as exc:
        print(f"error CONFIG: {exc}", file=sys.stderr)
        return 2
    readable = sys.stdout.isatty()  # people read a terminal; a pipe or the journal gets JSON
    if config_path is None:
        cfg = with_embedded_log(cfg, paths)  # opened once `start` has made the state dir
        logs.configure(cfg.server.log_level, readable=readable)
    else:
        logs.configure(cfg.server.log_level, cfg.server.log_file, readable=readable)
    try:
        return Supervisor(cfg, paths, config_path, (state_dir, runtime_dir)).run()
    except StartupError as exc:
        print(f"error STARTUP: {exc}", file=sys.stderr)
        return 1
