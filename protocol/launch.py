"""What the supervisor and a starting activation agree on before any tenant byte: the sandbox the
activation applies to itself, the fork server's request and reply, and the exit codes an
activation reserves to say why it gave up before it could report a result."""

from __future__ import annotations

from enum import IntEnum

import msgspec


class Sandbox(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The isolation an activation applies to itself (spawn mode: `--sandbox` JSON; fork mode:
    inside the fork request)."""

    memory_mib: int
    cpu_seconds: int
    max_pids: int
    scratch: str
    uid: int | None = None  # drop to this uid (root only)
    gid: int | None = None  # and this group, shared by the tenant's activations
    network_namespace: bool = False  # enter the tenant's private network namespace (root only)
    ipc_namespace: bool = False  # a private IPC namespace of its own (root only)
    landlock: bool = False
    read_only: tuple[str, ...] = ()  # on top of the interpreter's own paths
    read_write: tuple[str, ...] = ()  # on top of the scratch dir
    seccomp: bool = False
    allow_inet: bool = False
    # fork mode: the cgroup.procs files it writes itself into first thing (spawn mode: the
    # supervisor moves it, between start and token)
    cgroup_procs: tuple[str, ...] = ()


class ForkRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One activation asked of the fork server; sent with the activation's stdin, stdout and
    stderr attached. `netns` names the tenant whose kept network namespace it enters."""

    id: int
    endpoint: str
    ppid: int
    token: str
    env: dict[str, str]
    sandbox: Sandbox
    netns: str | None = None


class ForkReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The fork server's answer to request `id`: the activation's pid."""

    id: int
    pid: int


class ExitCode(IntEnum):
    """Exit codes an activation reserves for giving up before it could report a result; the
    supervisor names them in the activation's outcome. Tenant code exiting with one of these
    numbers is reported the same way, so they say what probably happened, not what surely did."""

    NO_TOKEN = 64  # it started but was never given its token: the supervisor went away first
    SPARE_FAILED = 70  # a fork server's spare failed before it could become an activation
    NO_ACTIVATE = 71  # it connected but the supervisor never sent Activate
    NO_ACK = 72  # the result was sent but never acknowledged
    REFUSED = 73  # the supervisor refused the result
    ORPHANED = 75  # its parent is not the supervisor: the supervisor died while it started

    @property
    def meaning(self) -> str:
        return _MEANING[self]


_MEANING = {
    ExitCode.NO_TOKEN: "it was never given its token",
    ExitCode.SPARE_FAILED: "the fork server's spare failed before it became an activation",
    ExitCode.NO_ACTIVATE: "it connected but was never sent Activate",
    ExitCode.NO_ACK: "the result was sent but never acknowledged",
    ExitCode.REFUSED: "the supervisor refused its result",
    ExitCode.ORPHANED: "its parent was no longer the supervisor",
}
