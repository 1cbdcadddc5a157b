"""Entry point of one activation: `python -I -m sandbox_host --endpoint E --ppid P --sandbox J`.

The one-time token arrives on stdin, never on the command line (other users can read argv); the
supervisor sends it once the process sits in its cgroups. Every isolation layer is applied before
the Activate message, and so before any tenant byte, is received.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser(prog="sandbox_host")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--ppid", type=int, required=True)
    parser.add_argument("--sandbox", required=True, help="JSON of supervisor.launcher.Sandbox")
    args = parser.parse_args()
    token = sys.stdin.readline().strip()
    if not token:
        os._exit(64)
    os.umask(0o007)  # private to the tenant's group: its other activations may use its files

    import msgspec

    from protocol.limits import PROTOCOL_VERSION
    from protocol.messages import Activate, Hello
    from sandbox_host import isolation, limits
    from sandbox_host.channel import EXIT_NO_ACTIVATE, Channel
    from sandbox_host.runtime import Runtime, _Stop

    box = msgspec.json.decode(args.sandbox)
    limits.no_new_privs()
    if box.get("network_namespace"):
        isolation.leave_network()
    if box.get("landlock"):
        # Before any thread exists: Landlock binds this thread and what it creates later.
        isolation.restrict_filesystem(
            isolation.default_read_only() + list(box["read_only"]),
            [box["scratch"], "/dev/null", *box["read_write"]],
        )
    if box.get("uid") is not None:
        isolation.drop_privileges(box["uid"], box["gid"])
    limits.die_with_parent(args.ppid)  # after the uid change, which clears it
    channel = Channel(args.endpoint, token)
    # Imports are done and the socket's I/O thread exists; now cap what tenant code may use.
    limits.apply_rlimits(
        memory_mib=box["memory_mib"],
        cpu_seconds=box["cpu_seconds"],
        max_processes=box["max_pids"] if box.get("uid") is not None else None,
    )
    channel.send(Hello(token=token, pid=os.getpid(), protocol_version=PROTOCOL_VERSION))
    act = channel.recv(EXIT_NO_ACTIVATE)
    if not isinstance(act, Activate):
        os._exit(EXIT_NO_ACTIVATE)
    if box.get("seccomp"):
        # Connected: from here on no new socket at all (the supervisor's API included).
        isolation.deny_new_sockets(allow_inet=box.get("allow_inet", False))
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    runtime = Runtime(act, channel)
    with contextlib.suppress(_Stop):  # only when tenant code swallowed the exit
        runtime.inspect() if act.mode == "inspect" else runtime.run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
