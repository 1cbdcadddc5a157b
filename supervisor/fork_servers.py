"""Fork-mode launches: one fork server per interpreter, asked without blocking the loop.

The supervisor's own interpreter has a fork server from start-up to shutdown; a tenant with an
interpreter of its own (`[tenants.X] python`) gets one on its first launch, stopped again after
`fork_server_idle_s` without requests, so an idle tenant keeps no process. A fork server that
dies or stops answering is closed, and the activations it had not started are handed back
(`Failed`): the supervisor spawns them instead, or settles those a spare had already taken. The
next launch starts a new one.

The supervisor owns one `ForkServers` and hands it launches; it answers with what happened and
the supervisor decides what each activation does next. Nothing here settles, records or spawns.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq

from protocol.launch import Sandbox
from supervisor import launcher
from supervisor.activation import Activation
from supervisor.config import Paths
from supervisor.zygote import REPLY_TIMEOUT_S, ForkedProcess, Zygote, ZygoteError


@dataclass
class Failed:
    """A fork server closed because it failed, and the activations it never answered for."""

    python: str
    why: str
    abandoned: list[Activation] = field(default_factory=list)


class ForkServers:
    def __init__(self, paths: Paths, poller: zmq.Poller, log: Any) -> None:
        self.paths = paths
        self.poller = poller
        self.log = log
        self.zygotes: dict[str, Zygote] = {}  # interpreter → its fork server
        self.forking: dict[tuple[str, int], Activation] = {}  # (interpreter, request id) → it
        self.failures: Counter[str] = Counter()  # interpreter → fork servers lost since start

    @property
    def waiting(self) -> bool:
        """Whether a request is unanswered: its activation may exist already, pid unknown."""
        return bool(self.forking)

    def start(self, python: str, spares: int) -> Zygote:
        zygote = Zygote(python, spares)
        self.zygotes[python] = zygote
        # Polled for its hang-up only: its answers are read at every loop iteration while a
        # request is open (`due`). Waking for each answer cost an iteration of its own per
        # activation, though nothing waits for the pid: the activation's Hello, which needs
        # it, comes milliseconds later and is handled after the answers.
        self.poller.register(zygote.fileno(), zmq.POLLERR)
        self.log.info("zygote.started", pid=zygote.proc.pid, python=python)
        return zygote

    def request(self, act: Activation, python: str, box: Sandbox, spares: int) -> Failed | None:
        """Ask `python`'s fork server (starting it if there is none) for the activation's
        process. None once asked; a `Failed` when it cannot take the request: the caller then
        spawns `act`, and deals with the activations the failed fork server abandoned."""
        try:
            zygote = self.zygotes.get(python) or self.start(python, spares)
            self.forking[python, zygote.request(self.paths, box, act.token, act.tenant)] = act
            return None
        except (ZygoteError, OSError) as exc:
            return self._fail(python, str(exc)) or Failed(python, str(exc))

    def due(self, ready: Iterable[Any]) -> list[str]:
        """The interpreters whose fork servers to read this tick: those with a request open,
        and those that hung up."""
        fds = set(ready)
        return [python for python, z in self.zygotes.items() if z.pending or z.fileno() in fds]

    def answers(
        self, python: str, live: Callable[[Activation], bool]
    ) -> tuple[list[tuple[Activation, ForkedProcess]], Failed | None]:
        """The processes a fork server has forked since the last look, for the activations that
        are still `live`; the others (given up on meanwhile: hello deadline, drain) are killed
        here, and as our (sub)reaped children collected with the orphans."""
        failed = None
        try:
            replies = self.zygotes[python].replies()
        except ZygoteError as exc:
            replies, failed = [], self._fail(python, str(exc))
        out = []
        for rid, proc in replies:
            act = self.forking.pop((python, rid), None)
            if act is None or not live(act):
                launcher.kill_group(proc.pid)
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
                continue
            out.append((act, proc))
        return out, failed

    def check(self, mono: float, idle_s: float) -> list[Failed]:
        """Close fork servers that stopped answering (returned) and tenants' ones idle for
        `idle_s`; the supervisor's own keeps running."""
        failed = []
        for python, zygote in list(self.zygotes.items()):
            if zygote.stuck(mono):
                why = f"the fork server did not answer a request within {REPLY_TIMEOUT_S:g} s"
                if (f := self._fail(python, why)) is not None:
                    failed.append(f)
            elif (
                python != self.paths.python
                and not zygote.pending
                and (mono - zygote.last_used > idle_s)
            ):
                self.log.info("zygote.stopped", pid=zygote.proc.pid, python=python, reason="idle")
                self._close(python)
        return failed

    def view(self, mono: float, spares: int) -> list[dict[str, Any]]:
        """Each interpreter's fork server, for `stats`: running or stopped (idle, or failed and
        not needed since), what it has not answered yet, and how often it failed."""
        out = []
        for python in sorted(set(self.zygotes) | set(self.failures)):
            zygote = self.zygotes.get(python)
            view: dict[str, Any] = {
                "python": python,
                "state": "stopped" if zygote is None else "running",
                "failures": self.failures[python],
            }
            if zygote is not None:
                view |= {
                    "pid": zygote.proc.pid,
                    "pending": len(zygote.pending),
                    "spares": spares,
                    "idle_s": round(mono - zygote.last_used, 1),
                }
            out.append(view)
        return out

    def close(self) -> None:
        for python in list(self.zygotes):
            self._close(python)

    def _close(self, python: str) -> list[int]:
        zygote = self.zygotes.pop(python)
        with contextlib.suppress(KeyError):
            self.poller.unregister(zygote.fileno())
        return zygote.close()

    def _fail(self, python: str, why: str) -> Failed | None:
        """Close a failed fork server; None when there is none (failed already)."""
        zygote = self.zygotes.get(python)
        if zygote is None:
            return None
        self.log.warning("zygote.failed", error=why, pid=zygote.proc.pid, python=python)
        self.failures[python] += 1
        abandoned = [
            act
            for rid in self._close(python)
            if (act := self.forking.pop((python, rid), None)) is not None
        ]
        return Failed(python, why, abandoned)
