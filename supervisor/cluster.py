"""This supervisor as one node of those sharing a database.

A node renews its lease (`nodes.heartbeat_at`) from the loop every `lease_s / 4`. A node whose
lease has lapsed is fenced by the first other node to notice, which re-runs the steps it was
running; a fenced node that comes back finds out at its next heartbeat and stops (and each of
its activations' commits is fenced on its own by `journal.hold_lease`). On PostgreSQL a node
also LISTENs for other nodes' wake-ups, so work created on one starts on any within
milliseconds; the loop's poll of the wake-up index is the fallback.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import psycopg
import zmq

from supervisor import journal as j
from supervisor import recovery
from supervisor.journal.db import Db

EXIT_FENCED = 75  # EX_TEMPFAIL: systemd's Restart=on-failure brings the node back, fresh


class NodeFenced(Exception):
    """Another node took this node's work: its lease lapsed (it was paused, or cut off)."""


class NodeConflict(Exception):
    """Another live node has this node's name."""


def default_node_id(state_dir: Path) -> str:
    """The host's name and a short hash of the state dir: stable across restarts, so a node
    that restarts takes back its own work at once, and distinct for two nodes on one host."""
    host = socket.gethostname().split(".")[0][:40] or "node"
    return f"{host}-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:6]}"


class Node:
    """This node: its name and lease, and (PostgreSQL) its LISTEN connection in the poller.
    `url` is the shared database's, or empty on the embedded SQLite (a single node)."""

    def __init__(
        self, node_id: str, lease_s: float, state_dir: Path, url: str, poller: zmq.Poller, log: Any
    ) -> None:
        self.id = node_id
        self.lease_s = lease_s
        self.state_dir = state_dir
        self.url = url
        self.poller = poller
        self.log = log
        self.next_beat = 0.0  # monotonic
        self.listener: psycopg.Connection[Any] | None = None
        self.listener_fd = -1  # kept: a closed connection no longer says its fd
        self.wake_others = False  # this tick made work due: NOTIFY the other nodes

    @property
    def beat_every_s(self) -> float:
        return self.lease_s / 4

    def register(self, conn: Db, now: float, mono: float) -> None:
        """Say this node is up. Refused (NodeConflict) while another live node has its name:
        two nodes with one name would each take the other's work for their own. The same
        host and state dir is this node's last run (its state dir lock proves it is gone)."""
        host = socket.gethostname()
        other = j.get_node(conn, self.id)
        if (
            other is not None
            and other["stopped_at"] is None
            and other["fenced_at"] is None
            and (other["host"], other["state_dir"]) != (host, str(self.state_dir))
            and now - other["heartbeat_at"] < self.lease_s
        ):
            raise NodeConflict(
                f"node {self.id} is running on {other['host']} (pid {other['pid']}, state dir "
                f"{other['state_dir']}): give this node another [server] node_name"
            )
        j.register_node(conn, self.id, host, os.getpid(), str(self.state_dir), now)
        self.next_beat = mono + self.beat_every_s

    def beat(self, conn: Db, now: float, mono: float) -> bool:
        """When due: renew the lease, fence the nodes whose leases lapsed and make the steps they
        were running due again here. Whether work became due. Raises NodeFenced if this node
        was fenced itself."""
        if mono < self.next_beat:
            return False
        self.next_beat = mono + self.beat_every_s
        if self.url and self.listener is None:
            self.listen()  # lost earlier (say, the database restarted): try again
        if not j.heartbeat(conn, self.id, now):
            raise NodeFenced(
                f"node {self.id} was fenced by another node: its lease ({self.lease_s:g} s)"
                " lapsed and its running steps were re-run elsewhere"
            )
        lost = j.fence_lapsed_nodes(conn, self.id, now - self.lease_s, now)
        for other in lost:
            why = f"node {other} stopped renewing its lease"
            n = recovery.requeue(conn, other, now, why, self.log)
            self.log.warning("node.fenced_other", node=other, interrupted=n)
        self.wake_others |= bool(lost)
        return bool(lost)

    def busy_elsewhere(self, conn: Db, tenant: str, mine: int, most: int) -> bool | None:
        """With other nodes: whether the tenant's `max_concurrent` is used up across the
        cluster (`mine`: its steps running here), counted under the tenant's lock, which this
        transaction then holds until it commits its launches; None when another node holds the
        lock (it is launching the tenant's work: look again shortly). SQLite: never busy."""
        if conn.dialect == "sqlite":
            return False
        if not j.try_lock_tenant(conn, tenant):
            return None
        return mine + j.leased_elsewhere(conn, tenant, self.id) >= most

    # ------------------------------------------------------------------ wake-ups (PostgreSQL)

    def listen(self) -> None:
        """LISTEN on a connection of its own (autocommit), its fd in the loop's poller. On
        failure the loop's poll of the wake-up index still finds the work, a little later."""
        if not self.url:
            return
        try:
            self.listener = psycopg.connect(self.url, autocommit=True)
            self.listener.execute(f"LISTEN {j.WAKE_CHANNEL}")
            self.listener.execute(f"LISTEN {j.KILL_CHANNEL}")
        except psycopg.Error as exc:
            self.log.warning("node.listen_failed", error=str(exc).strip())
            self.close()
            return
        self.listener_fd = self.listener.fileno()
        self.poller.register(self.listener_fd, zmq.POLLIN)

    def notifications(self, ready: dict[Any, int]) -> tuple[bool, list[int]]:
        """What other nodes said, drained without blocking: whether work may be due, and the
        activations an operator stopped through another node (to kill, if they run here)."""
        if self.listener is None or self.listener_fd not in ready:
            return False, []
        due, kills = False, []
        try:
            for note in self.listener.notifies(timeout=0):
                if note.channel == j.KILL_CHANNEL and note.payload.isdigit():
                    kills.append(int(note.payload))
                else:
                    due = True
        except psycopg.Error as exc:
            self.log.warning("node.listen_lost", error=str(exc).strip())
            self.close()
            due = True  # look, in case what woke us was a notification
        return due, kills

    def notify_if_woke(self, conn: Db) -> None:
        if self.wake_others:
            j.notify_wake(conn)
            self.wake_others = False

    def close(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(KeyError, zmq.ZMQError):
                self.poller.unregister(self.listener_fd)
            with contextlib.suppress(psycopg.Error):
                self.listener.close()
            self.listener, self.listener_fd = None, -1
