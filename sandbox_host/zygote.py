"""The fork server: a pre-imported, single-threaded process that hands out one activation process
per request, forked before the request arrives.

`python -I -m sandbox_host.zygote --ppid P --control-fd N [--spares K]` with a SOCK_SEQPACKET
socket. Each request is a `protocol.launch.ForkRequest` (JSON) with three fds attached (the
activation's stdin, stdout, stderr); the answer is a `ForkReply` with the activation's pid.

Forking is the slow part of a launch (the page tables of a pre-imported interpreter), so the
zygote keeps K *spares*: processes forked ahead of time that wait, blank, for a request. A request
goes to a spare over its own socket and the reply goes back at once.

The zygote never forks a spare itself: it has read requests (tokens, uids, cgroup paths, tenant
names), and a process forked from it would carry them into another tenant's activation. Before
it reads its first request it forks the *nursery*, which only ever forks spares: it is asked for
one with a byte and answers with the spare's pid and socket, so a spare's memory is the nursery's,
which has never seen a request. The nursery also forks while the zygote forwards requests.

A spare is the supervisor's child, which waits for it like a spawned activation. Where the host
allows (`sibling.probe`), the nursery is the supervisor's child too and forks each spare with
clone(CLONE_PARENT); otherwise each spare is forked twice: the middle process exits at once, so
the spare is re-parented to the supervisor (a child subreaper), and the nursery hands a spare
over only once its middle process is reaped. A spare holds nothing but its own socket, has
no tenant and no token until it is given a request, and exits when its socket closes (the zygote
is gone).

Given a request, the activation does not wait for the supervisor: it joins its cgroups itself,
applies its isolation and connects with the token it was given. Neither the zygote, the nursery
nor an activation starts a thread (an activation speaks ZMTP itself: `sandbox_host.channel`),
which is also why the nursery may skip the standard library's at-fork callbacks in the spares
it forks (`sandbox_host.fork_hooks`); each spare restores them before anything else.

A request's `netns` names the tenant whose private network namespace the activation enters. The
zygote makes one per tenant and keeps it while the tenant is active (NETNS_IDLE_S): creating a
namespace for every activation and tearing it down again cost more than a millisecond of CPU each.
Activations of one tenant then share a namespace that has only a loopback interface, which is
down and which they, without privileges, cannot bring up; other tenants never see it. IPC
namespaces are cheap, so each activation makes its own (`activation.run`).
"""

from __future__ import annotations

import gc
import os
import select
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

# Everything an activation imports, loaded once here instead of once per activation.
import cloudpickle  # noqa: F401
import msgspec

from protocol.launch import ExitCode, ForkReply, ForkRequest
from sandbox_host import activation, fork_hooks, isolation, limits, warmup
from sandbox_host import runtime as _runtime  # noqa: F401
from sandbox_host.sibling import SiblingFork, probe
from stepvisor import sdk as _sdk  # noqa: F401

MAX_REQUEST_BYTES = 1 << 20
NETNS_IDLE_S = 60.0  # a tenant's network namespace is dropped after this long without a request
_NETNS_FD = 3  # where a spare puts the namespace it was given, for `activation.run`
# The interpreter's read-only paths, opened once by the nursery for every spare's Landlock rules
# (`isolation.open_targets`), above the fds a spare is given.
_TARGETS: dict[str, isolation.Target] = {}
_TARGETS_LOWEST_FD = 64
# Made here, at import: msgspec builds a struct type's decoding tables on first use, which each
# spare would otherwise do again (and pay for in page faults).
_REQUESTS = msgspec.json.Decoder(ForkRequest)
_REPLIES = msgspec.json.Encoder()


class Spare(NamedTuple):
    pid: int
    sock: socket.socket  # the zygote's end; the request and its fds go here


def _fork_spare(sibling: SiblingFork | None, restore: Callable[[], None]) -> Spare:
    """In the nursery: fork one spare that is the supervisor's child by the time this returns:
    with `sibling` (the nursery is then the supervisor's child) at once, else through a middle
    process that exits, which re-parents it. `restore`: what the spare runs first (it puts back
    the at-fork callbacks the nursery skips)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if sibling is not None:
        pid = sibling.fork()
        if pid == 0:
            restore()
            ours.close()
            try:
                _spare(theirs)
            finally:
                os._exit(ExitCode.SPARE_FAILED)
        theirs.close()
        return Spare(pid, ours)
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(r)
        pid = os.fork()
        if pid == 0:
            restore()
            os.close(w)
            try:
                _spare(theirs)
            finally:
                os._exit(ExitCode.SPARE_FAILED)
        os.write(w, str(pid).encode())
        os._exit(0)
    os.close(w)
    theirs.close()
    pid = int(os.read(r, 32) or b"0")
    os.close(r)
    os.waitpid(middle, 0)  # now the spare's parent is the supervisor
    return Spare(pid, ours)


def _close_all_but(lowest: int, keep: Iterable[int]) -> None:
    for fd in sorted(keep):
        if fd >= lowest:
            os.closerange(lowest, fd)
            lowest = fd + 1
    os.closerange(lowest, 1 << 16)


def _spare(sock: socket.socket) -> None:
    """A forked process waiting for its request; then one activation's life."""
    targets = [t.fd for t in _TARGETS.values()]
    # The nursery's socket and other spares' sockets: not ours.
    _close_all_but(3, [sock.fileno(), *targets])
    os.setsid()  # its own session and process group, as a spawned activation has
    limits.set_name("sv-spare")
    data, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST_BYTES, 4)
    if not data or len(fds) not in (3, 4):
        os._exit(0)  # the zygote is gone (or confused): never used
    started = time.monotonic()
    limits.set_name("sv-activation")
    sock.close()
    request = _REQUESTS.decode(data)
    for target, src in zip((0, 1, 2, _NETNS_FD), fds, strict=False):  # netns: optional
        os.dup2(src, target)
    _close_all_but(len(fds), targets)
    os.chdir(request.sandbox.scratch)
    # Only what differs from the fork server's environment (BASE_ENV), which the spare has:
    # clear() and update() run generic mapping code, ~40 page faults more in a fresh fork.
    env = request.env
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
    ppid = request.ppid
    activation.run(
        request.endpoint,
        ppid,
        request.sandbox,
        started,
        request.token,
        before_parent_check=lambda: _check_parent(ppid),
        netns_fd=_NETNS_FD if len(fds) == 4 else None,
        targets=_TARGETS,
    )


def _check_parent(ppid: int) -> None:
    """PDEATHSIG must name the supervisor: a spare is its child from birth (a sibling fork) or
    once its middle process is reaped, before any request reaches it; anything else means the
    supervisor is gone."""
    if os.getppid() != ppid:
        os._exit(ExitCode.ORPHANED)


def _assign(spare: Spare, data: bytes, fds: list[int]) -> bool:
    try:
        socket.send_fds(spare.sock, [data], fds)
        return True
    except OSError:  # it died while waiting (killed by hand, say): the caller uses another
        return False
    finally:
        spare.sock.close()


class NurseryGone(Exception):
    """The nursery exited or answered nonsense: the zygote exits and the supervisor restarts it."""


class Nursery:
    """The zygote's handle on the process that forks its spares."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        self.asked = 0  # spares asked for and not yet received

    @classmethod
    def start(cls, close: list[socket.socket], supervisor: int) -> Nursery:
        """Fork the nursery; `close`: sockets of the zygote's it must not keep. Where sibling
        forks work it is the supervisor's child, and so are the spares it forks with them."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        zygote = os.getpid()
        sibling = probe()
        pid = os.fork() if sibling is None else sibling.fork()
        if pid == 0:
            try:
                ours.close()
                for sock in close:
                    sock.close()
                limits.die_with_parent(zygote if sibling is None else supervisor)
                limits.set_name("sv-nursery")
                _nurse(theirs, sibling)
            finally:
                os._exit(0)
        theirs.close()
        return cls(ours, pid)

    def ask(self) -> None:
        self.sock.send(b"+")
        self.asked += 1

    def receive(self) -> Spare:
        """The next spare; blocks until the nursery has forked it."""
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 32, 1)
        except OSError as exc:
            raise NurseryGone(f"nursery connection failed: {exc}") from None
        if not data or len(fds) != 1:
            raise NurseryGone(f"nursery answered {data!r} with {len(fds)} fds")
        self.asked -= 1
        return Spare(int(data), socket.socket(fileno=fds[0]))


def _nurse(sock: socket.socket, sibling: SiblingFork | None) -> None:
    """The nursery's loop: one spare per byte received; ends when the zygote is gone."""
    _TARGETS.update(isolation.open_targets(isolation.default_read_only(), _TARGETS_LOWEST_FD))
    restore = fork_hooks.quiet()  # this process has one thread: see fork_hooks
    while True:
        try:
            asked = sock.recv(64)
        except OSError:
            return
        if not asked:
            return
        for _ in asked:
            spare = _fork_spare(sibling, restore)
            try:
                socket.send_fds(sock, [str(spare.pid).encode()], [spare.sock.fileno()])
            except OSError:
                return  # the zygote is gone; the spare sees its socket close and exits
            finally:
                spare.sock.close()


class NetNamespaces:
    """One private network namespace per tenant, held open by an fd while the tenant is active.

    Made here, in the zygote, by unsharing and at once returning to the namespace it started in:
    the zygote and its spares stay in the host's namespace throughout."""

    def __init__(self) -> None:
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.held: dict[str, tuple[int, float]] = {}  # tenant → (fd, last used)

    def fd(self, tenant: str) -> int | None:
        """The tenant's namespace; None when one cannot be made (not root): the activation
        then tries itself and reports the kernel's refusal."""
        held = self.held.get(tenant)
        if held is None:
            try:
                isolation.leave_network()
            except OSError:
                return None
            try:
                fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            finally:
                isolation.enter_network(self.home)  # fails only if the kernel is broken: exit
            held = (fd, 0.0)
        self.held[tenant] = (held[0], time.monotonic())
        return held[0]

    def wait_s(self) -> float | None:
        """How long until the next namespace falls idle; None when none is held."""
        if not self.held:
            return None
        oldest = min(last for _, last in self.held.values())
        return max(0.0, oldest + NETNS_IDLE_S - time.monotonic())

    def drop_idle(self) -> None:
        cutoff = time.monotonic() - NETNS_IDLE_S
        for tenant, (fd, last) in list(self.held.items()):
            if last <= cutoff:
                os.close(fd)  # the kernel frees the namespace with its last reference
                del self.held[tenant]


def serve(control: socket.socket, nursery: Nursery, keep: int) -> None:
    spares: deque[Spare] = deque()
    netns = NetNamespaces()
    while True:
        while len(spares) + nursery.asked < keep:
            nursery.ask()
        ready = select.select([control, nursery.sock], [], [], netns.wait_s())[0]
        if not ready:
            netns.drop_idle()
            continue
        if control not in ready:
            spares.append(nursery.receive())
            continue
        try:
            data, fds, _, _ = socket.recv_fds(control, MAX_REQUEST_BYTES, 3)
        except OSError:
            return
        if not data:
            return  # the supervisor closed its end
        request = _REQUESTS.decode(data)
        ns = netns.fd(request.netns) if request.netns is not None else None
        given = fds if ns is None else [*fds, ns]
        while True:
            if not spares:
                if not nursery.asked:
                    nursery.ask()
                spares.append(nursery.receive())
            spare = spares.popleft()
            if _assign(spare, data, given):
                break
        for fd in fds:
            os.close(fd)
        control.send(_REPLIES.encode(ForkReply(id=request.id, pid=spare.pid)))


class Arguments(NamedTuple):
    ppid: int
    control_fd: int
    spares: int = 2  # processes forked ahead


USAGE = "usage: python -I -m sandbox_host.zygote --ppid P --control-fd N [--spares K]"


def parse_arguments(argv: list[str]) -> Arguments:
    """The supervisor's command line for us. Not argparse: its help formatter imports shutil,
    which loads bz2, lzma and zlib, and every activation would inherit their 30 mappings (each
    one more to copy at every fork and to tear down at every exit)."""
    names = {"--ppid": "ppid", "--control-fd": "control_fd", "--spares": "spares"}
    values: dict[str, int] = {}
    if len(argv) % 2:
        raise SystemExit(f"{USAGE}\nan option without its value: {argv[-1]}")
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        if flag not in names or names[flag] in values:
            raise SystemExit(f"{USAGE}\nunknown or repeated option: {flag}")
        try:
            values[names[flag]] = int(value)
        except ValueError:
            raise SystemExit(f"{USAGE}\n{flag} takes an integer, not {value!r}") from None
    if "ppid" not in values or "control_fd" not in values:
        raise SystemExit(f"{USAGE}\n--ppid and --control-fd are required")
    return Arguments(**values)


def main() -> None:
    args = parse_arguments(sys.argv[1:])
    limits.die_with_parent(args.ppid)
    control = socket.socket(fileno=args.control_fd)
    # The activation's own code run once here, so each activation need not quicken it (and copy
    # the pages that writes) itself; see warmup.py.
    try:
        warmup.warm()
    except Exception as exc:  # activations are only slower without it: serve all the same
        print(f"sandbox_host.zygote: warm-up failed: {exc!r}", file=sys.stderr)
    sys.stdout.flush()
    # Everything imported so far is shared with every activation by copy-on-write; keep the
    # collector from walking (and so writing to) those pages in each child.
    gc.collect()
    gc.freeze()
    nursery = Nursery.start([control], args.ppid)  # before any request: spares never see one
    try:
        serve(control, nursery, max(0, args.spares))
    except NurseryGone as exc:
        print(f"sandbox_host.zygote: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
