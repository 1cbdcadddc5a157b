"""Fork-mode launches: one fork server per interpreter, asked without blocking the loop.

The supervisor's own interpreter has a fork server from start-up to shutdown; a tenant with an
interpreter of its own (`[tenants.X] python`) gets one on its first launch, stopped again after
`fork_server_idle_s` without requests, so an idle tenant keeps no process. A fork server that
dies or stops answering is closed and what it had not started is spawned instead; the next
launch starts a new one. A mixin of `daemon.Supervisor`, which owns the poller and the
activations.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from supervisor import launcher, outcome
from supervisor.activation import LAUNCHED, SETTLED, Activation
from supervisor.config import Config, Paths
from supervisor.isolation import Cgroups
from supervisor.journal.db import Db
from supervisor.zygote import REPLY_TIMEOUT_S, Zygote, ZygoteError


class ForkServers:
    """Launching activations through fork servers; mixed into `daemon.Supervisor`."""

    cfg: Config
    paths: Paths
    conn: Db
    poller: zmq.Poller
    cgroups: Cgroups | None
    zygotes: dict[str, Zygote]  # interpreter → its fork server
    running: dict[str, Activation]  # token → activation, until reaped
    forking: dict[tuple[str, int], Activation]  # (interpreter, request id) → activation
    zygote_failures: Counter[str]  # interpreter → fork servers lost since start
    log: Any

    # the supervisor's own launch steps
    _sandbox: Callable[[Activation], launcher.Sandbox]
    _started: Callable[[Activation, Any, float], None]
    _launch_failed: Callable[[Activation, OSError, float], None]
    _settle: Callable[..., None]
    _finish_record: Callable[[Activation, int | None, Any, float, float], None]
    _forget: Callable[[Activation], None]

    def _request_fork(self, act: Activation) -> bool:
        """Ask the activation's fork server (starting it if there is none) for its process.
        False when it cannot take the request: the caller spawns instead."""
        python = act.limits.python or self.paths.python
        procs = () if self.cgroups is None else self.cgroups.prepare(act.tenant, act.aid)
        box = msgspec.structs.replace(self._sandbox(act), cgroup_procs=procs)
        try:
            zygote = self.zygotes.get(python) or self._start_zygote(python)
            self.forking[python, zygote.request(self.paths, box, act.token, act.tenant)] = act
            return True
        except (ZygoteError, OSError) as exc:
            self._zygote_failed(python, str(exc))
            return False

    def _start_zygote(self, python: str) -> Zygote:
        zygote = Zygote(python, self.cfg.server.fork_spares)
        self.zygotes[python] = zygote
        self.poller.register(zygote.fileno(), zmq.POLLIN)
        self.log.info("zygote.started", pid=zygote.proc.pid, python=python)
        return zygote

    def _on_zygote(self, python: str, now: float, mono: float) -> None:
        """Record the activations a fork server has answered for."""
        try:
            replies = self.zygotes[python].replies()
        except ZygoteError as exc:
            replies = []
            self._zygote_failed(python, str(exc))
        for rid, proc in replies:
            act = self.forking.pop((python, rid), None)
            if act is None or act.token not in self.running:
                # Given up on and forgotten meanwhile (hello deadline, drain): it has its token,
                # so stop it; as our (sub)reaped child it is collected by _reap_orphans.
                launcher.kill_group(proc.pid)
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
                continue
            if act.state == SETTLED:
                # The fork server hands the request to a spare before it answers: descheduled in
                # between, its activation can report and be settled first. It is still ours to
                # reap and record, and its slot is held until then.
                act.log.info("zygote.late_answer", pid=proc.pid, outcome=act.outcome)
            try:
                self._started(act, proc, now)
            except OSError as exc:
                self._launch_failed(act, exc, mono)

    def _check_zygotes(self, mono: float) -> None:
        for python, zygote in list(self.zygotes.items()):
            if zygote.stuck(mono):
                why = f"the fork server did not answer a request within {REPLY_TIMEOUT_S:g} s"
                self._zygote_failed(python, why)
            elif (
                python != self.paths.python
                and not zygote.pending
                and mono - zygote.last_used > self.cfg.server.fork_server_idle_s
            ):
                self.log.info("zygote.stopped", pid=zygote.proc.pid, python=python, reason="idle")
                self._close_zygote(python)

    def fork_server_view(self, mono: float) -> list[dict[str, Any]]:
        """Each interpreter's fork server, for `stats`: running or stopped (idle, or failed and
        not needed since), what it has not answered yet, and how often it failed."""
        out = []
        for python in sorted(set(self.zygotes) | set(self.zygote_failures)):
            zygote = self.zygotes.get(python)
            view: dict[str, Any] = {
                "python": python,
                "state": "stopped" if zygote is None else "running",
                "failures": self.zygote_failures[python],
            }
            if zygote is not None:
                view |= {
                    "pid": zygote.proc.pid,
                    "pending": len(zygote.pending),
                    "spares": self.cfg.server.fork_spares,
                    "idle_s": round(mono - zygote.last_used, 1),
                }
            out.append(view)
        return out

    def _close_zygote(self, python: str) -> list[int]:
        zygote = self.zygotes.pop(python)
        with contextlib.suppress(KeyError):
            self.poller.unregister(zygote.fileno())
        return zygote.close()

    def _zygote_failed(self, python: str, why: str) -> None:
        """Close the fork server; what it never answered is spawned instead."""
        zygote = self.zygotes.get(python)
        if zygote is None:
            return
        self.log.warning("zygote.failed", error=why, pid=zygote.proc.pid, python=python)
        self.zygote_failures[python] += 1
        abandoned = self._close_zygote(python)
        now, mono = time.time(), time.monotonic()
        for rid in abandoned:
            act = self.forking.pop((python, rid), None)
            if act is None or act.token not in self.running:
                continue
            if act.state != LAUNCHED:
                # A spare took the request and said Hello, but its pid never came: it cannot be
                # reaped by pid. Decide its fate (a step it started counts as a failed attempt),
                # and `_forget` kills it by its cgroup or uid; _reap_orphans collects it.
                self._settle(act, outcome.CRASHED, f"the fork server failed: {why}", mono)
                self._finish_record(act, None, None, now, mono)
                self._forget(act)
                continue
            self.log.warning("zygote.fallback", detail="spawning a fresh interpreter instead")
            try:
                self._started(act, launcher.spawn(self.paths, act.limits, self._sandbox(act)), now)
            except OSError as exc:
                self._launch_failed(act, exc, mono)
