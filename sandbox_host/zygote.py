"""The fork server: a pre-imported, single-threaded process that hands out one activation process
per request, forked before the request arrives.

`python -I -m sandbox_host.zygote --ppid P --control-fd N [--spares K]` with a SOCK_SEQPACKET
socket. Each request is JSON {id, endpoint, ppid, token, scratch, env, sandbox} with three fds
attached (the activation's stdin, stdout, stderr).

Forking is the slow part of a launch (page tables of a pre-imported interpreter, twice), so the
zygote keeps K *spares*: processes forked ahead of time that wait, blank, for a request. A request
goes to a spare over its own socket, the reply {id, pid} goes back at once, and the zygote then
forks a replacement while no request waits. Each spare is forked twice: the middle process exits
at once, so the spare is re-parented to the supervisor (a child subreaper), which waits for it like
a spawned activation; the zygote keeps a spare only once its middle process is reaped. A spare
holds nothing of the zygote's but its own socket, has no tenant and no token until it is given a
request, and exits when its socket closes (the zygote is gone).

Given a request, the activation does not wait for the supervisor: it joins its cgroups itself,
applies its isolation and connects with the token it was given. The zygote never creates a zmq
Context or a thread: each activation makes its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import socket
import sys
import time
from collections import deque
from typing import Any, NamedTuple

# Everything an activation imports, loaded once here instead of once per activation.
import cloudpickle  # noqa: F401
import msgspec  # noqa: F401
import zmq  # noqa: F401

from sandbox_host import activation, limits
from sandbox_host import runtime as _runtime  # noqa: F401
from stepvisor import sdk as _sdk  # noqa: F401

MAX_REQUEST_BYTES = 1 << 20


class Spare(NamedTuple):
    pid: int
    sock: socket.socket  # the zygote's end; the request and its fds go here


def _fork_spare() -> Spare:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(r)
        pid = os.fork()
        if pid == 0:
            os.close(w)
            try:
                _spare(theirs)
            finally:
                os._exit(70)
        os.write(w, str(pid).encode())
        os._exit(0)
    os.close(w)
    theirs.close()
    pid = int(os.read(r, 32) or b"0")
    os.close(r)
    os.waitpid(middle, 0)  # now the spare's parent is the supervisor
    return Spare(pid, ours)


def _spare(sock: socket.socket) -> None:
    """A forked process waiting for its request; then one activation's life."""
    fd = sock.fileno()
    os.closerange(3, fd)  # the zygote's control socket and other spares' sockets: not ours
    os.closerange(fd + 1, 1 << 16)
    os.setsid()  # its own session and process group, as a spawned activation has
    data, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST_BYTES, 3)
    if not data or len(fds) != 3:
        os._exit(0)  # the zygote is gone (or confused): never used
    started = time.monotonic()
    sock.close()
    request: dict[str, Any] = json.loads(data)
    for target, src in zip((0, 1, 2), fds, strict=True):
        os.dup2(src, target)
    os.closerange(3, 1 << 16)
    os.chdir(request["scratch"])
    os.environ.clear()
    os.environ.update(request["env"])
    ppid = request["ppid"]
    activation.run(
        request["endpoint"],
        ppid,
        request["sandbox"],
        started,
        request["token"],
        before_parent_check=lambda: _check_parent(ppid),
    )


def _check_parent(ppid: int) -> None:
    """PDEATHSIG must name the supervisor: a spare is its child once its middle process is
    reaped, which happens before any request reaches it; anything else means it is gone."""
    if os.getppid() != ppid:
        os._exit(75)


def _assign(spare: Spare, data: bytes, fds: list[int]) -> bool:
    try:
        socket.send_fds(spare.sock, [data], fds)
        return True
    except OSError:  # it died while waiting (killed by hand, say): the caller uses another
        return False
    finally:
        spare.sock.close()


def serve(control: socket.socket, keep: int) -> None:
    spares: deque[Spare] = deque()
    while True:
        # Fork replacements only while no request waits: a request never waits for a spare
        # that is not its own.
        if len(spares) < keep and not select.select([control], [], [], 0)[0]:
            spares.append(_fork_spare())
            continue
        try:
            data, fds, _, _ = socket.recv_fds(control, MAX_REQUEST_BYTES, 3)
        except OSError:
            return
        if not data:
            return  # the supervisor closed its end
        request = json.loads(data)
        while True:
            spare = spares.popleft() if spares else _fork_spare()
            if _assign(spare, data, fds):
                break
        for fd in fds:
            os.close(fd)
        control.send(json.dumps({"id": request["id"], "pid": spare.pid}).encode())


def main() -> None:
    parser = argparse.ArgumentParser(prog="sandbox_host.zygote")
    parser.add_argument("--ppid", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--spares", type=int, default=2, help="processes forked ahead")
    args = parser.parse_args()
    limits.die_with_parent(args.ppid)
    control = socket.socket(fileno=args.control_fd)
    sys.stdout.flush()
    # Everything imported so far is shared with every activation by copy-on-write; keep the
    # collector from walking (and so writing to) those pages in each child.
    gc.collect()
    gc.freeze()
    serve(control, max(0, args.spares))


if __name__ == "__main__":
    main()
