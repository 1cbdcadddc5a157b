"""Entry point of one activation: `python -I -m sandbox_host --endpoint E --ppid P ...`.

The one-time token arrives on stdin, never on the command line (other users can read argv).
Limits are applied before the Activate message, and so before any tenant byte, is received.
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
    parser.add_argument("--memory-mib", type=int, required=True)
    parser.add_argument("--cpu-seconds", type=int, required=True)
    args = parser.parse_args()
    token = sys.stdin.readline().strip()
    if not token:
        os._exit(64)
    os.umask(0o077)

    from protocol.limits import PROTOCOL_VERSION
    from protocol.messages import Activate, Hello
    from sandbox_host import limits
    from sandbox_host.channel import EXIT_NO_ACTIVATE, Channel
    from sandbox_host.runtime import Runtime, _Stop

    limits.die_with_parent(args.ppid)
    limits.no_new_privs()
    channel = Channel(args.endpoint, token)
    # Imports are done and the socket's I/O thread exists; now cap what tenant code may use.
    limits.apply_rlimits(memory_mib=args.memory_mib, cpu_seconds=args.cpu_seconds)
    channel.send(Hello(token=token, pid=os.getpid(), protocol_version=PROTOCOL_VERSION))
    act = channel.recv(EXIT_NO_ACTIVATE)
    if not isinstance(act, Activate):
        os._exit(EXIT_NO_ACTIVATE)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    runtime = Runtime(act, channel)
    with contextlib.suppress(_Stop):
        runtime.inspect() if act.mode == "inspect" else runtime.run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
