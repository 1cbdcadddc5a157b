"""One activation's life after start-up, shared by spawn mode (`__main__`) and the fork server:
wait for the token, apply every isolation layer, connect, replay, one command, exit."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import NoReturn

from protocol.launch import ExitCode, Sandbox
from protocol.limits import PROTOCOL_VERSION
from protocol.messages import Activate, Hello
from sandbox_host import isolation, limits
from sandbox_host.channel import Channel
from sandbox_host.runtime import Runtime, _Stop


def run(
    endpoint: str,
    ppid: int,
    box: Sandbox,
    started: float,
    token: str | None = None,
    before_parent_check: Callable[[], None] | None = None,
    netns_fd: int | None = None,
    targets: Mapping[str, isolation.Target] | None = None,
) -> NoReturn:
    """`started`: CLOCK_MONOTONIC when this process's own code began, for the timing marks.
    `token`: given by the fork server; a spawned activation reads it from stdin instead.
    `before_parent_check`: the fork server's wait until we are the supervisor's child.
    `netns_fd`: the tenant's private network namespace, from the fork server; without it a
    private namespace is made here. `targets`: the fork server's paths opened for Landlock
    rules, closed here once the rules are in place."""
    # Forked: join our cgroups ourselves, before anything that uses memory or CPU of note.
    for procs in box.cgroup_procs:
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)  # 3 syscalls where open() makes 7
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    if token is None:
        # Spawned: the supervisor writes the token once this process sits in its cgroups.
        token = sys.stdin.readline().strip()
    if not token:
        os._exit(ExitCode.NO_TOKEN)
    os.umask(0o007)  # private to the tenant's group: its other activations may use its files
    limits.no_new_privs()
    if box.network_namespace:
        if netns_fd is None:
            isolation.leave_network()
        else:
            isolation.enter_network(netns_fd)
    if box.ipc_namespace:
        # Its own, not the tenant's: no one else's SysV objects or POSIX queues are visible,
        # and what it leaves behind the kernel destroys when its last process exits.
        isolation.leave_ipc()
    if netns_fd is not None:
        os.close(netns_fd)
    if box.landlock:
        # Before any thread exists: Landlock binds this thread and what it creates later.
        isolation.restrict_filesystem(
            isolation.default_read_only() + list(box.read_only),
            [box.scratch, "/dev/null", *box.read_write],
            targets,
        )
    for target in (targets or {}).values():
        os.close(target.fd)
    if box.uid is not None:
        isolation.drop_privileges(box.uid, box.gid if box.gid is not None else box.uid)
    elif os.geteuid() == 0:
        # Root without a sandbox uid: keep uid 0, but no capability (not even after an exec).
        isolation.drop_capabilities()
    if before_parent_check is not None:
        before_parent_check()
    limits.die_with_parent(ppid)  # after the uid change, which clears it
    channel = Channel(endpoint, token)  # its own connection: nothing of a parent's is reused
    # Imports are done and the connection exists; now cap what tenant code may use.
    limits.apply_rlimits(
        memory_mib=box.memory_mib,
        cpu_seconds=box.cpu_seconds,
        max_processes=box.max_pids if box.uid is not None else None,
    )
    if box.seccomp:
        # Connected: from here on no new socket (the supervisor's API included) and no call
        # a step has no use for; see isolation.py. Before Hello, so that a prepared activation
        # has it in place while it waits, not after its step arrives.
        isolation.restrict_syscalls(allow_inet=box.allow_inet)
    hello = time.monotonic()
    channel.send(Hello(token=token, pid=os.getpid(), protocol_version=PROTOCOL_VERSION))
    act = channel.recv(ExitCode.NO_ACTIVATE)
    if not isinstance(act, Activate):
        os._exit(ExitCode.NO_ACTIVATE)
    activated = time.monotonic()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    runtime = Runtime(act, channel, marks=(started, hello, activated))
    with contextlib.suppress(_Stop):  # only when tenant code swallowed the exit
        if act.mode == "inspect":
            runtime.inspect()
        elif act.mode == "check":
            runtime.check()
        else:
            runtime.run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
