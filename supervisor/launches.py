"""Starting activations: from a tenant (and an instance, or none for one prepared ahead, or a
deploy to inspect) to a process that will say Hello. A sandbox uid, the activation's row, its
scratch and cgroups, then a fork server's process or a spawned one, and what to do when any of
that fails. The supervisor decides what to launch and when (`daemon._schedule`); this starts it.
"""

from __future__ import annotations

import errno
import secrets
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from protocol.errors import ErrorCode, ProtocolError
from supervisor import engine, isolation, launcher, outcome
from supervisor import journal as j
from supervisor.activation import LAUNCHED, SETTLED, Activation, DeployRequest
from supervisor.activation_messages import ActivationMessages
from supervisor.activations import Activations
from supervisor.cluster import Node
from supervisor.config import Config, Limits, Paths
from supervisor.disk import ScratchSpace
from supervisor.fork_servers import Failed, ForkServers
from supervisor.journal.db import Db
from supervisor.output import OutputCapture
from supervisor.prepared import Prepared
from supervisor.reaper import Reaper


class Sandboxing(NamedTuple):
    """The isolation every launch applies, resolved once at start."""

    layers: dict[str, isolation.Layer]
    cgroups: isolation.Cgroups | None
    uids: isolation.UidPool | None
    root_needs_uid: bool  # tenant code never runs as root: a uid is a must


class Launcher:
    """Starts the activations the supervisor's loop decides on, and settles those that fail to
    start; it answers with the activation started (or None), the loop keeps the deadlines."""

    def __init__(
        self,
        conn: Db,
        paths: Paths,
        node: Node,
        acts: Activations,
        prepared: Prepared,
        messages: ActivationMessages,
        reaper: Reaper,
        output: OutputCapture,
        fork_servers: ForkServers,
        scratch: ScratchSpace,
        sandbox: Sandboxing,
        log: Any,
        *,
        config: Callable[[], Config],
    ) -> None:
        self.conn = conn
        self.paths = paths
        self.node = node
        self.acts = acts
        self.prepared = prepared
        self.messages = messages
        self.reaper = reaper
        self.output = output
        self.fork_servers = fork_servers
        self.scratch = scratch
        self.layers = sandbox.layers
        self.cgroups = sandbox.cgroups
        self.uids = sandbox.uids
        self.root_needs_uid = sandbox.root_needs_uid
        self.tenant_numbers: dict[str, int] = {}  # stable once given: tenants are never removed
        self.log = log
        self.config = config  # a reload replaces the config: always the current one

    def launch(
        self,
        tenant: str,
        instance: str | None,
        kind: str,
        now: float,
        mono: float,
        deploy: DeployRequest | None = None,
        prepared: bool = False,
    ) -> Activation | None:
        """Start an activation of `tenant` (for `instance`, or prepared ahead, or to inspect a
        deploy): its uid, row, scratch and cgroups, then a fork server's process or a spawned
        one. Returns it (its hello deadline is the caller's to watch), also when it failed to
        start (it is settled and recorded then); None when another node took the uid picked
        meanwhile: the caller tries again next tick."""
        cfg = self.config()
        limits = cfg.limits_for(tenant)
        # Stamped now, not at the tick's start: earlier work in this tick (reaping the activation
        # whose slot this one takes, say) is not this activation's.
        launched_at, launched_mono = time.time(), time.monotonic()
        acquired = self.uids.acquire(tenant) if self.uids is not None else None
        uid = gid = None
        if acquired is not None:
            uid, claimed = acquired
            # Committed with this tick, like the activation's own row. Another node may have
            # given the uid to another tenant meanwhile: then it is that tenant's, and this
            # launch waits for the next tick.
            if claimed and (owner := j.claim_uid(self.conn, uid, tenant)) != tenant:
                assert self.uids is not None
                self.uids.taken(uid, owner)
                if deploy is not None:
                    raise ProtocolError(
                        ErrorCode.UNAVAILABLE,
                        "another node just gave the sandbox uid picked to another tenant:"
                        " retry the deploy",
                    )
                return None
            gid = cfg.isolation.sandbox_gid_base + self._tenant_number(tenant)
        aid = j.insert_activation(self.conn, tenant, instance, kind, launched_at, self.node.id)
        if instance is not None:
            engine.launched(self.conn, tenant, instance, aid, now)
        token = secrets.token_hex(16)
        act = Activation(
            aid=aid,
            token=token,
            tenant=tenant,
            kind=kind,
            instance=instance,
            limits=limits,
            scratch=launcher.scratch_path(self.paths, tenant, aid),
            uid=uid,
            gid=gid,
            launched_at=launched_at,
            launched_mono=launched_mono,
            deadline_mono=mono + cfg.server.hello_timeout_s,
            deploy=deploy,
            prepared=prepared,
        )
        self.acts.add(act, with_step=not prepared)
        if prepared:
            # Its slots (`max_activations`, its tenant's `max_concurrent`) are taken when a
            # step is given to it; until then prepared ones are capped on their own.
            self.prepared.add(act)
        try:
            if self.uids is not None and uid is None:
                # Never without one: the launch paths wait for a free uid (`_schedule`,
                # `launch_inspection`), so this is a bug; refuse rather than run as root.
                raise OSError(errno.EAGAIN, "no free sandbox uid")
            if self.root_needs_uid and uid is None:  # `_check_uid_reach` makes this a bug too
                raise OSError(errno.EPERM, "no sandbox uid, and tenant code never runs as root")
            if why := self.interpreter_refusal(limits):
                raise OSError(errno.EACCES, why)
            if why := self.scratch.prepare(tenant, limits.disk_mib):
                self.log.warning("disk.limit_refused", tenant=tenant, reason=why)
            launcher.make_scratch(self.paths, tenant, aid, uid, gid)
            if self.cgroups is not None and (refused := self.cgroups.tenant(tenant, limits)):
                self.log.warning("cgroup.limits_refused", tenant=tenant, refused=refused)
            if cfg.server.launch_mode == "fork":
                python = limits.python or self.paths.python
                procs = () if self.cgroups is None else self.cgroups.prepare(tenant, aid)
                box = msgspec.structs.replace(self._sandbox(act), cgroup_procs=procs)
                failed = self.fork_servers.request(act, python, box, cfg.server.fork_spares)
                if failed is None:
                    return act  # on_fork_server records it when the fork server answers
                self.fork_server_failed(failed)
                self.log.warning("zygote.fallback", detail="spawning a fresh interpreter instead")
        except OSError as exc:
            self._launch_failed(act, exc, mono)
            return act
        self.spawn(act, now, mono)
        return act

    def spawn(self, act: Activation, now: float, mono: float) -> None:
        try:
            self._started(act, launcher.spawn(self.paths, act.limits, self._sandbox(act)), now)
        except OSError as exc:
            self._launch_failed(act, exc, mono)

    def on_fork_server(self, python: str, now: float, mono: float) -> None:
        """Record the activations a fork server has answered for."""
        answered, failed = self.fork_servers.answers(python, lambda a: a in self.acts)
        for act, proc in answered:
            if act.state == SETTLED:
                # The fork server hands the request to a spare before it answers: descheduled in
                # between, its activation can report and be settled first. It is still ours to
                # reap and record, and its slot is held until then.
                act.log.info("zygote.late_answer", pid=proc.pid, outcome=act.outcome)
            try:
                self._started(act, proc, now)
            except OSError as exc:
                self._launch_failed(act, exc, mono)
        if failed is not None:
            self.fork_server_failed(failed)

    def fork_server_failed(self, failed: Failed) -> None:
        """The activations a failed fork server never answered for: spawned instead, or
        settled when a spare had taken the request already."""
        now, mono = time.time(), time.monotonic()
        for act in failed.abandoned:
            if act not in self.acts:
                continue
            if act.state != LAUNCHED:
                # A spare took the request and said Hello, but its pid never came: it cannot be
                # reaped by pid. Decide its fate (a step it started counts as a failed attempt),
                # and the reaper kills it by its cgroup or uid, and collects it as an orphan.
                self.messages.settle(
                    act, outcome.CRASHED, f"the fork server failed: {failed.why}", mono
                )
                self.reaper.unreaped(act, now, mono)
                continue
            self.log.warning("zygote.fallback", detail="spawning a fresh interpreter instead")
            self.spawn(act, now, mono)

    def _started(self, act: Activation, proc: Any, now: float) -> None:
        """The activation's process exists. A spawned one waits for us to put it in its cgroups
        and then give it its token; a forked one has done both itself."""
        act.proc = proc
        act.pid = proc.pid
        if proc.stdin is not None:
            if self.cgroups is not None:
                self.cgroups.add(act.tenant, act.aid, act.pid)
            launcher.send_token(act.proc, act.token)
        self.acts.started(act)
        self.output.watch(act)
        j.update_activation(self.conn, act.aid, pid=act.pid, pid_started=now)

    def _launch_failed(self, act: Activation, exc: OSError, mono: float) -> None:
        launcher.kill_group(act.pid)
        self.messages.settle(act, outcome.CRASHED, f"could not start the activation: {exc}", mono)
        if act.proc is not None:
            act.proc.wait()
        self.reaper.unreaped(act, time.time(), time.monotonic())  # no reap follows

    def _tenant_number(self, tenant: str) -> int:
        number = self.tenant_numbers.get(tenant)
        if number is None:
            number = j.tenant_number(self.conn, tenant)
            if number:  # 0: not numbered yet (the caller numbers it first; asked again then)
                self.tenant_numbers[tenant] = number
        return number

    def _sandbox(self, act: Activation) -> launcher.Sandbox:
        on = {name: layer.enabled for name, layer in self.layers.items()}
        return launcher.sandbox_for(on, act.limits, act.scratch, act.uid, act.gid)

    def interpreter_refusal(self, limits: Limits) -> str | None:
        """Why a tenant's own interpreter cannot run its activations now (sandbox uids could not
        read it, say after it was reinstalled in a private place), or None. Checked at every
        launch, cheaply; the supervisor's own was checked in full at start."""
        if self.uids is None or not limits.python or limits.python == self.paths.python:
            return None
        why = isolation.interpreter_blocked(limits.python, ask=False)
        return (
            isolation.not_root_fix(limits.python, why, "the tenant's interpreter") if why else None
        )
