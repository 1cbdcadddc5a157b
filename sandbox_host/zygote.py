"""The fork server: a pre-imported, single-threaded process that forks one activation per request.

`python -I -m sandbox_host.zygote --ppid P --control-fd N` with a SOCK_SEQPACKET socket. Each
request is JSON {id, endpoint, ppid, token, scratch, env, sandbox} with three fds attached (the
activation's stdin, stdout, stderr). The zygote forks twice: the middle process exits at once, so
the activation is re-parented to the supervisor (a child subreaper), which waits for it like a
spawned one. The activation does not wait for the supervisor: it joins its cgroups itself, applies
its isolation, and connects with the token it was given, waiting only (before PDEATHSIG is bound)
until the middle process is gone. The reply {id, pid} is sent once the middle process is reaped,
so the pid is then the supervisor's child. The zygote never creates a zmq Context or a thread:
each activation makes its own after the fork.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import sys
import time
from typing import Any

# Everything an activation imports, loaded once here instead of once per activation.
import cloudpickle  # noqa: F401
import msgspec  # noqa: F401
import zmq  # noqa: F401

from sandbox_host import activation, limits
from sandbox_host import runtime as _runtime  # noqa: F401
from stepvisor import sdk as _sdk  # noqa: F401


def _child(request: dict[str, Any], fds: list[int], control: socket.socket) -> None:
    started = time.monotonic()
    control.close()
    os.setsid()  # its own session and process group, as a spawned activation has
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
    os.closerange(3, 1 << 16)  # close_range(2): nothing of the zygote's stays open
    os.chdir(request["scratch"])
    os.environ.clear()
    os.environ.update(request["env"])
    ppid = request["ppid"]
    # Our parent is the middle process until it exits and we are re-parented to the supervisor;
    # watch for that while we isolate ourselves, and wait for it before binding PDEATHSIG.
    middle = os.getppid()
    gate = None
    if middle != ppid:
        with contextlib.suppress(ProcessLookupError):
            gate = os.pidfd_open(middle)
    activation.run(
        request["endpoint"],
        ppid,
        request["sandbox"],
        started,
        request["token"],
        before_parent_check=lambda: _await_reparent(gate, ppid),
    )


def _await_reparent(gate: int | None, ppid: int) -> None:
    """Block until the middle process has exited (its pidfd turns readable) and we are the
    supervisor's child; exit if that does not happen (the supervisor itself is gone)."""
    if gate is not None:
        select.select([gate], [], [], 5.0)
        os.close(gate)
    deadline = time.monotonic() + 5.0
    while os.getppid() != ppid:
        if time.monotonic() > deadline:
            os._exit(75)
        os.sched_yield()


def serve(control: socket.socket) -> None:
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(control, 1 << 20, 3)
        except OSError:
            return
        if not data:
            return  # the supervisor closed its end
        request = json.loads(data)
        r, w = os.pipe()
        middle = os.fork()
        if middle == 0:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                try:
                    _child(request, fds, control)
                finally:
                    os._exit(70)
            os.write(w, str(pid).encode())
            os._exit(0)
        os.close(w)
        for fd in fds:
            os.close(fd)
        pid = int(os.read(r, 32) or b"0")
        os.close(r)
        os.waitpid(middle, 0)  # now the activation's parent is the supervisor
        control.send(json.dumps({"id": request["id"], "pid": pid}).encode())


def main() -> None:
    parser = argparse.ArgumentParser(prog="sandbox_host.zygote")
    parser.add_argument("--ppid", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args()
    limits.die_with_parent(args.ppid)
    control = socket.socket(fileno=args.control_fd)
    sys.stdout.flush()
    serve(control)


if __name__ == "__main__":
    main()
