"""Collecting activations' processes: each one's exit status and rusage, what it left behind
(its process group, its cgroup, its sandbox uid's processes), its record, and the uid and
scratch it held. The supervisor owns one `Reaper`; its loop calls `reap` every tick, and hands
it the activations it gives up on (`kill_straggler`, `unreaped`)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from supervisor import launcher, outcome, records
from supervisor.activation import SETTLED, Activation
from supervisor.activation_messages import ActivationMessages
from supervisor.activations import Activations
from supervisor.config import Config
from supervisor.fork_servers import ForkServers
from supervisor.isolation import Cgroups, UidPool
from supervisor.janitor import Janitor
from supervisor.journal.db import Db
from supervisor.output import OutputCapture
from supervisor.stats import Stats

# Exits are looked for when SIGCHLD says a child changed state, and at least this often anyway
# (one waitid per running activation per tick was a tenth of the loop's time when busy).
REAP_SCAN_S = 1.0


class Reaper:
    def __init__(
        self,
        conn: Db,
        acts: Activations,
        messages: ActivationMessages,
        output: OutputCapture,
        stats: Stats,
        janitor: Janitor,
        fork_servers: ForkServers,
        cgroups: Cgroups | None,
        uids: UidPool | None,
        *,
        config: Callable[[], Config],
    ) -> None:
        """`config()`: the supervisor's config now (a reload replaces it)."""
        self.conn = conn
        self.acts = acts
        self.messages = messages
        self.output = output
        self.stats = stats
        self.janitor = janitor
        self.fork_servers = fork_servers
        self.cgroups = cgroups
        self.uids = uids
        self.config = config
        self.child_exited = True  # SIGCHLD came since the last look for exits
        self.next_scan = 0.0  # look for exits by then even without a SIGCHLD

    def kill_straggler(self, act: Activation) -> None:
        """Its fate is decided but something of it is still there: the process that reported,
        or what it left behind (a setsid grandchild holding its pipes). Kill all of it; the
        reap that follows records it. Once per activation."""
        if act.lingered:
            return
        act.lingered = True
        act.log.warning("activation.lingered", grace_s=self.config().server.settled_grace_s)
        launcher.kill_group(act.pid)
        self._kill_leftovers(act)

    def _kill_leftovers(self, act: Activation) -> None:
        """Kill what the activation left outside its process group (setsid, double fork): by
        its cgroup, or without cgroups by its sandbox uid, before that uid is handed out again."""
        if self.cgroups is not None:
            act.oom_killed |= self.cgroups.kill(act.tenant, act.aid)
        elif act.uid is not None:
            launcher.kill_uid(act.uid)

    def reap(self, now: float, mono: float) -> None:
        """Collect what exited, when a SIGCHLD came (`child_exited`) or REAP_SCAN_S passed."""
        if not self.child_exited and mono < self.next_scan:
            return
        # Cleared before looking: a child that exits during this pass sends a SIGCHLD the next
        # tick handles.
        self.child_exited = False
        self.next_scan = mono + REAP_SCAN_S
        self.reap_exited(now, mono)

    def reap_exited(self, now: float, mono: float) -> None:
        """Collect every activation whose process has exited: settle it from its exit status
        if nothing else did, record it, and free what it held."""
        for pid, act in self.acts.with_pid():
            try:
                # Look without reaping: while the exited leader is a zombie its pid, and so its
                # process group id, cannot be reused, so killing the group hits only what the
                # activation left behind (a step's background children).
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                    continue
                launcher.kill_group(pid)
                if self.cgroups is not None:  # also what left the group (setsid, double fork)
                    act.oom_killed |= self.cgroups.kill(act.tenant, act.aid)
                _, status, usage = os.wait4(pid, 0)
            except ChildProcessError:
                status, usage = 0, None
            if act.proc is not None:
                act.proc.returncode = os.waitstatus_to_exitcode(status)
            self.output.drain(act)
            cpu_s = (usage.ru_utime + usage.ru_stime) if usage else 0.0
            if act.state != SETTLED:
                how, detail = outcome.classify_exit(
                    status, cpu_s, act.limits.cpu_seconds, oom_killed=act.oom_killed
                )
                self.messages.settle(act, how, detail, mono)
            self._finish_record(act, status, usage, now, time.monotonic())
            self._forget(act)
        if self.config().server.launch_mode == "fork":
            self._reap_orphans()

    def _reap_orphans(self) -> None:
        """As a child subreaper we inherit what activations orphan (after their cgroup is killed,
        say): reap those so no zombie stays. Not while a fork request is unanswered: an unknown
        zombie may then be that activation, whose exit status is its own to collect."""
        while not self.fork_servers.waiting:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or self.acts.has_pid(info.si_pid):
                return  # nothing exited, or an activation the next pass reaps properly
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)

    def unreaped(self, act: Activation, now: float, mono: float) -> None:
        """Record and forget an activation with no process to reap: it never started, or its
        fork server failed before naming its pid (`_forget` kills it by cgroup or uid)."""
        self._finish_record(act, None, None, now, mono)
        self._forget(act)

    def _finish_record(
        self, act: Activation, status: int | None, usage: Any, now: float, mono: float
    ) -> None:
        records.finish(self.conn, self.stats, act, status, usage, now, mono)

    def _forget(self, act: Activation) -> None:
        self.acts.forget(act)
        self.output.forget(act)
        if act.proc is not None:
            for stream in (act.proc.stdout, act.proc.stderr):
                if stream is not None:
                    stream.close()
        self._kill_leftovers(act)
        if self.uids is not None and act.uid is not None:
            self.uids.release(act.uid)
        self.janitor.remove(act.scratch, act.scratch_entries)

    def kill_all(self) -> None:
        """Kill every activation and wait for them, recording nothing: the database cannot be
        written. The next start (or another node) re-runs their steps."""
        for act in self.acts.all():
            launcher.kill_group(act.pid)
            self._kill_leftovers(act)
        deadline = time.monotonic() + 5.0
        while self.acts.any_pid() and time.monotonic() < deadline:
            for pid, _ in self.acts.with_pid():
                try:
                    done = os.waitpid(pid, os.WNOHANG)[0] == pid
                except ChildProcessError:
                    done = True
                if done:
                    self.acts.drop_pid(pid)
            if self.acts.any_pid():
                time.sleep(0.01)  # bounded: waiting for killed children to become reapable
