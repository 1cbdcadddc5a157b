"""Which isolation layers this host supports, and the supervisor's side of them: sandbox uids and
per-tenant cgroups. What happens inside the activation lives in `sandbox_host.isolation`."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from supervisor import disk
from supervisor.config import Config, Limits

LAYERS = ("uid", "cgroup", "network", "landlock", "seccomp", "disk")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpu")
CGROUP_NAME_PREFIX = "stepvisor-"
KEPT_PER_TENANT = 16  # empty activation cgroups kept for a tenant's next activations


class IsolationError(Exception):
    """A layer the config requires is not available on this host, or tenant code would run as
    root; `layers` names the layers at fault."""

    def __init__(self, message: str, layers: list[str]) -> None:
        super().__init__(message)
        self.layers = layers


@dataclass(frozen=True)
class Layer:
    name: str
    available: bool
    enabled: bool
    detail: str  # why unavailable, or how it is provided


def landlock_abi() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(0, int(libc.syscall(444, None, 0, 1)))  # landlock_create_ruleset(VERSION)


def unreadable_by_others(paths: list[str]) -> str | None:
    """Why a process with another uid could not use these paths (a dir not o+x, a file not
    o+r), or None. Sandbox uids must read the interpreter, its library and the import path."""
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            continue
        for parent in [*reversed(path.parents), path]:
            mode = parent.stat().st_mode
            need = 0o005 if parent == path and parent.is_dir() else 0o001
            if parent == path and not parent.is_dir():
                need = 0o004
            if mode & need != need:
                return f"{parent} (mode {mode & 0o777:o}) keeps sandbox uids from {raw}"
    return None


# What `python -I` reads, as the interpreter itself reports it.
_ASK_PATHS = "import json, sys; print(json.dumps([sys.base_prefix, sys.prefix, *sys.path]))"


def interpreter_paths(python: str) -> list[str]:
    """What an activation (`python -I`) reads: the interpreter, its prefixes, its import path.
    The supervisor's own is known in-process (its cwd, which `python -m` puts on its path, is not
    among them); another one is asked, once, as root (which reads whatever is there)."""
    real = os.path.realpath(python)  # resolved only to check it, never to run it
    if python == sys.executable:
        cwd = os.getcwd()
        imports = [p for p in sys.path if os.path.isabs(p) and p != cwd]
        return [python, real, sys.base_prefix, sys.prefix, *imports]
    try:
        out = subprocess.run(
            [python, "-I", "-c", _ASK_PATHS], capture_output=True, timeout=30, check=True
        ).stdout
        asked = [str(p) for p in json.loads(out) if os.path.isabs(str(p))]
    except (OSError, ValueError, subprocess.SubprocessError):
        asked = []  # it does not run at all: launching it fails, with its own error
    return [python, real, *asked]


def interpreter_blocked(python: str, *, ask: bool = True) -> str | None:
    """Why a sandbox uid could not run `python`, or None. Without `ask` only the interpreter's
    path, its target and their directories are looked at: a few stat calls, cheap enough for
    every launch."""
    paths = interpreter_paths(python) if ask else [python, os.path.realpath(python)]
    if blocked := unreadable_by_others(paths):
        return blocked
    real = Path(os.path.realpath(python))
    with contextlib.suppress(OSError):
        if not real.stat().st_mode & 0o001:
            return f"{real} (mode {real.stat().st_mode & 0o777:o}) is not executable by others"
    return None


def not_root_fix(python: str, why: str, key: str = "the interpreter") -> str:
    """The fail-closed refusal: tenant code would otherwise run as root. Names the fixes."""
    return (
        f"{key} {python} is not usable by sandbox uids ({why}), and tenant code never runs as "
        "root: install stepvisor in a virtualenv made from a system python (not under /root), "
        "or chmod o+rx the directories in the way (o+r its files), or set [isolation] "
        'uid = "off" to run tenant code as root without capabilities (not recommended)'
    )


def tenant_interpreter_errors(cfg: Config) -> list[str]:
    """`[defaults]`/`[tenants.NAME]` interpreters that sandbox uids could not run (a cheap look,
    see `interpreter_blocked`): when the supervisor is root and `uid` is not off, each is a
    config error naming its key."""
    if os.geteuid() != 0 or cfg.isolation.uid == "off":
        return []
    pythons = [("defaults.python", cfg.defaults.python)]
    pythons += [(f"tenants.{t}.python", o.python or "") for t, o in cfg.tenants.items()]
    errors = []
    for key, python in pythons:
        if python and (why := interpreter_blocked(python, ask=False)):
            errors.append(f"`{key}`: " + not_root_fix(python, why, "the interpreter"))
    return errors


def cgroup_moves(mounts: str | None = None, features: str | None = None) -> str:
    """Whether moving a process into a cgroup takes the kernel's fast path, and if not, how to
    get it. Every activation joins its cgroups; without `favordynmods` each join takes a global
    lock whose writer waits for an RCU grace period, which measured 0.5 ms at the median and 14
    ms at the 90th percentile on a 2-CPU host (with it: 0.6 ms at the 90th). The lock is one for
    all hierarchies, so any cgroup2 mount with the option speeds every join; it is off by
    default because it makes every fork and exit on the host a little dearer, so stepvisor
    never sets it itself. `mounts`, `features`: /proc/mounts and the kernel's cgroup features."""
    if mounts is None:
        with open("/proc/mounts") as f:
            mounts = f.read()
    if features is None:
        try:
            with open("/sys/kernel/cgroup/features") as f:
                features = f.read()
        except OSError:
            features = ""
    v2 = []
    for line in mounts.splitlines():
        fields = line.split(" ")
        if len(fields) < 4 or fields[2] not in ("cgroup", "cgroup2"):
            continue
        point = fields[1].encode().decode("unicode_escape")
        options = fields[3].split(",")
        if "favordynmods" in options:
            return f"fast (favordynmods on {point})"
        if fields[2] == "cgroup2":
            v2.append((point, options))
    if "favordynmods" not in features.split():
        return "slow path (this kernel has no favordynmods: 6.0 or later has)"
    if not v2:
        return "slow path (no cgroup2 mount to set favordynmods on)"
    point, options = v2[0]
    # A remount sets exactly the flags it is given: keep the ones the mount has.
    keep = ",".join(o for o in options if o not in ("rw", "ro", "relatime", "seclabel"))
    opts = ",".join(filter(None, ["remount", keep, "favordynmods"]))
    return (
        "slow path: joining a cgroup can wait for an RCU grace period (ms);"
        f" on a host given to stepvisor: mount -o {opts} {point}"
    )


def runtime_unreachable(runtime_dir: Path) -> str | None:
    """Sandbox uids must reach the sandbox socket: every parent must be searchable."""
    for parent in [runtime_dir, *runtime_dir.parents]:
        if not parent.stat().st_mode & 0o001:
            return (
                f"activations run as sandbox uids and cannot reach the runtime dir "
                f"{runtime_dir}: {parent} is not searchable by others "
                "(chmod o+x it, or pick another runtime_dir)"
            )
    return None


def _available(
    name: str, cgroups: Cgroups | None, cgroup_why: str, python: str
) -> tuple[bool, str]:
    root = os.geteuid() == 0
    if name == "disk":
        if not root:
            return False, "needs root (to mount a tmpfs per tenant)"
        why = disk.probe()
        return (False, why) if why else (True, "a tmpfs of disk_mib per tenant for its scratch")
    if name == "uid":
        if not root:
            return False, "needs root"
        blocked = interpreter_blocked(python)
        if blocked:
            return False, blocked
        return True, "a sandbox uid/gid per activation"
    if name == "network":
        # Its IPC namespace (SysV objects, POSIX message queues) rides on the same layer.
        detail = "private network and IPC namespaces"
        return (True, detail) if root else (False, "needs root (so do IPC namespaces)")
    if name == "landlock":
        abi = landlock_abi()
        return (abi > 0, f"Landlock ABI {abi}") if abi else (False, "kernel has no Landlock")
    if name == "seccomp":
        ok = platform.machine() in ("x86_64", "aarch64")
        return (ok, "socket filter") if ok else (False, f"no filter for {platform.machine()}")
    if cgroups is not None:
        return True, cgroups.describe()
    return False, cgroup_why


def resolve(cfg: Config, state_dir: Path, python: str) -> tuple[dict[str, Layer], Cgroups | None]:
    """Decide each layer: enabled when available and not off; IsolationError when a required
    layer is missing, or when tenant code would run as root: a root supervisor whose `uid` layer
    is not off but unavailable (its interpreter `python` unreadable by sandbox uids) fails
    closed, whatever the mode."""
    cgroups, why = (None, "turned off")
    if cfg.isolation.cgroup != "off":
        cgroups, why = Cgroups.detect(state_dir)
    layers: dict[str, Layer] = {}
    missing: list[str] = []
    for name in LAYERS:
        mode = getattr(cfg.isolation, name)
        available, detail = _available(name, cgroups, why, python)
        if mode == "required" and not available:
            missing.append(name)
        layers[name] = Layer(name, available, available and mode != "off", detail)
    as_root = os.geteuid() == 0 and cfg.isolation.uid != "off" and not layers["uid"].available
    if missing or as_root:
        if cgroups is not None:
            cgroups.close()  # do not leave this run's cgroup directories behind
        if as_root:
            raise IsolationError(not_root_fix(python, layers["uid"].detail), ["uid"])
        raise IsolationError(
            "required isolation unavailable: "
            + ", ".join(f"{n} ({layers[n].detail})" for n in missing),
            missing,
        )
    if not layers["cgroup"].enabled:
        cgroups = None
    return layers, cgroups


class UidPool:
    """Hands out sandbox uids so that no two running activations share one and no uid ever
    serves two tenants: a uid, once given to a tenant, is owned by it for good (the journal keeps
    the owners across restarts, `sandbox_uids`), and a tenant takes one of its own free uids,
    oldest first, before it claims a new one. New uids are claimed cycling from a random start
    per supervisor run.

    What outlives an activation under its uid: files it wrote under the tenant's
    `writable_paths` (or, without Landlock, in world-writable dirs such as /tmp), owned by the uid,
    which its owner reads whatever their mode. Since the uid never serves another tenant, those
    files reach only that tenant's later activations, which share its group anyway. Nothing else
    stays: its processes are killed with its cgroup and process group before the uid is freed;
    its scratch dir is removed; its SysV IPC objects and POSIX message queues are in its own IPC
    namespace, destroyed with it; the kernel's per-uid user keyring cannot be written (seccomp
    denies add_key, keyctl and request_key)."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self.next = low + secrets.randbelow(high - low + 1)
        self.used: set[int] = set()
        self.owner: dict[int, str] = {}
        self.free: dict[str, deque[int]] = {}  # tenant → its own uids no activation holds

    def load(self, owners: dict[int, str]) -> None:
        """The owners recorded by earlier runs (uids outside today's range do not matter)."""
        for uid, tenant in sorted(owners.items()):
            if self.low <= uid <= self.high and uid not in self.owner:
                self.owner[uid] = tenant
                self.free.setdefault(tenant, deque()).append(uid)

    def acquire(self, tenant: str) -> tuple[int, bool] | None:
        """(uid, newly claimed: the caller records the owner before using it), or None when the
        tenant has no free uid and none is left unowned."""
        own = self.free.get(tenant)
        if own:
            uid = own.popleft()
            self.used.add(uid)
            return uid, False
        if len(self.owner) > self.high - self.low:
            return None
        while self.next in self.owner:  # ends: an unowned uid exists
            self.next = self.low if self.next >= self.high else self.next + 1
        uid = self.next
        self.next = self.low if uid >= self.high else uid + 1
        self.owner[uid] = tenant
        self.used.add(uid)
        return uid, True

    def taken(self, uid: int, owner: str) -> None:
        """`acquire` offered `uid` as unowned, but another node gave it to `owner` first."""
        self.used.discard(uid)
        self.owner[uid] = owner
        self.free.setdefault(owner, deque()).append(uid)

    def release(self, uid: int) -> None:
        if uid in self.used:
            self.used.discard(uid)
            self.free.setdefault(self.owner[uid], deque()).append(uid)

    def has_free(self, tenant: str | None = None) -> bool:
        """Whether `tenant` (None: some tenant) could acquire a uid now."""
        if len(self.owner) <= self.high - self.low:
            return True
        if tenant is None:
            return len(self.used) < len(self.owner)
        return bool(self.free.get(tenant))


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass
class Cgroups:
    """One cgroup per tenant (its limits hold across its concurrent activations), with one child
    per activation so that everything an activation started can be found and killed."""

    version: Literal[1, 2]
    bases: dict[str, Path]  # controller → this supervisor's directory (v2: one shared dir)
    applied: dict[str, Limits] = field(default_factory=dict)
    refused: dict[str, Limits] = field(default_factory=dict)  # limits the kernel would not take
    # The distinct base directories as strings: an activation's cgroups are made, read and
    # removed on every launch and reap, where pathlib's objects cost more than the syscalls.
    roots: list[str] = field(init=False)
    # Empty activation cgroups kept per tenant for its next activations: making and removing
    # three cgroups (v1) per activation cost ~0.3 ms of the supervisor's CPU, most in the kernel.
    # Only a cgroup found empty is kept, and only for the tenant it was made for.
    free: dict[str, list[str]] = field(default_factory=dict)  # tenant → leaf names
    leaves: dict[int, tuple[str, str]] = field(default_factory=dict)  # activation → tenant, leaf
    oom_before: dict[tuple[str, str], int] = field(default_factory=dict)  # leaf's kills so far

    def __post_init__(self) -> None:
        self.roots = sorted({str(base) for base in self.bases.values()})

    @classmethod
    def detect(cls, state_dir: Path) -> tuple[Cgroups | None, str]:
        if os.geteuid() != 0:
            return None, "needs root"
        # Stable across restarts, distinct per state dir: recovery finds what a dead run left.
        name = CGROUP_NAME_PREFIX + hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]
        own = _own_cgroups()
        if (CGROUP_ROOT / "cgroup.controllers").exists():  # unified hierarchy only
            return cls._detect_v2(own.get("", "/"), name)
        bases = {}
        for ctrl in CONTROLLERS:
            mount = CGROUP_ROOT / ctrl
            if ctrl not in own or not mount.is_dir():
                return None, f"cgroup v1 controller {ctrl} is not mounted"
            base = mount / own[ctrl].lstrip("/") / name
            try:
                base.mkdir(exist_ok=True)
            except OSError as exc:
                return None, f"cannot create {base}: {exc.strerror}"
            bases[ctrl] = base
        return cls(1, bases), ""

    @classmethod
    def _detect_v2(cls, own: str, name: str) -> tuple[Cgroups | None, str]:
        parent = CGROUP_ROOT / own.lstrip("/")
        enabled = set((parent / "cgroup.controllers").read_text().split())
        if not set(CONTROLLERS) <= enabled:
            return None, f"cgroup v2 lacks {sorted(set(CONTROLLERS) - enabled)} here"
        try:
            # A v2 cgroup with controllers for its children may hold no process: move the
            # supervisor into a leaf of its (delegated) cgroup first.
            leaf = parent / "supervisor"
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            _write(parent / "cgroup.subtree_control", "+memory +pids +cpu")
            base = parent / name
            base.mkdir(exist_ok=True)
            _write(base / "cgroup.subtree_control", "+memory +pids +cpu")
        except OSError as exc:
            return None, (
                f"cgroup v2 subtree {parent} is not delegated to us ({exc.strerror}); "
                "run under systemd with Delegate=yes"
            )
        return cls(2, dict.fromkeys(CONTROLLERS, base)), ""

    def describe(self) -> str:
        return f"cgroup v{self.version} at {sorted({str(b) for b in self.bases.values()})[0]}"

    # -- tenants

    def tenant(self, tenant: str, limits: Limits) -> list[str]:
        """Create the tenant's cgroups and (re)apply its limits when they changed. These limits
        hold for all the tenant's activations at once, running ones included.

        Returns the limits the kernel refused this time, reported once per new set of limits
        (say, a lower memory limit than the tenant's running activations use now: EBUSY on v1).
        The launch goes on under the old value and the next one tries again."""
        if self.applied.get(tenant) == limits:
            return []
        mem = limits.memory_mib * 1024 * 1024
        quota = int(limits.cpu_quota * 100_000)
        writes: list[tuple[Path, str]]
        if self.version == 2:
            d = self.bases["memory"] / tenant
            d.mkdir(exist_ok=True)
            _write(d / "cgroup.subtree_control", "+memory +pids +cpu")
            writes = [(d / "memory.max", str(mem))]
            if (d / "memory.swap.max").exists():
                writes.append((d / "memory.swap.max", "0"))
            writes += [
                (d / "pids.max", str(limits.max_pids)),
                (d / "cpu.max", f"{quota} 100000" if quota else "max 100000"),
            ]
        else:
            for base in self.bases.values():
                (base / tenant).mkdir(exist_ok=True)
            m = self.bases["memory"] / tenant
            # v1 wants memory <= memory+swap at every moment: raise the second first.
            order = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
            if mem > int((m / order[0]).read_text()):
                order.reverse()
            # memsw is absent without swap accounting
            writes = [(m / name, str(mem)) for name in order if (m / name).exists()]
            c = self.bases["cpu"] / tenant
            writes += [
                (self.bases["pids"] / tenant / "pids.max", str(limits.max_pids)),
                (c / "cpu.cfs_period_us", "100000"),
                (c / "cpu.cfs_quota_us", str(quota) if quota else "-1"),
            ]
        refused = []
        for path, value in writes:
            try:
                _write(path, value)
            except OSError as exc:
                refused.append(f"{path.parent.name}/{path.name} = {value}: {exc.strerror}")
        if not refused:
            self.applied[tenant] = limits
            self.refused.pop(tenant, None)
            return []
        if self.refused.get(tenant) == limits:
            return []  # reported already
        self.refused[tenant] = limits
        return refused

    def _oom_kills(self, tenant: str, leaf: str) -> int:
        """The kernel's count of OOM kills in one activation cgroup since it was made."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        text = _read(f"{self.bases['memory']}/{tenant}/{leaf}/{name}")
        for line in (text or b"").splitlines():
            key, _, value = line.partition(b" ")
            if key == b"oom_kill":
                return int(value)
        return 0

    # -- activations

    def prepare(self, tenant: str, activation: int) -> tuple[str, ...]:
        """The activation's own cgroups, made now or kept empty from an earlier activation of
        the same tenant; returns their cgroup.procs files."""
        if activation in self.leaves:  # prepared already (a spawned activation's `add`)
            leaf = self.leaves[activation][1]
        elif pool := self.free.get(tenant):
            leaf = pool.pop()
            self.leaves[activation] = (tenant, leaf)
        else:
            leaf = f"act-{activation}"
            self.leaves[activation] = (tenant, leaf)
            for root in self.roots:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(f"{root}/{tenant}/{leaf}")
        return tuple(f"{root}/{tenant}/{leaf}/cgroup.procs" for root in self.roots)

    def add(self, tenant: str, activation: int, pid: int) -> None:
        """Put a just-started activation (still waiting for its token) in its cgroups."""
        for procs in self.prepare(tenant, activation):
            with open(procs, "w") as f:
                f.write(str(pid))

    def kill(self, tenant: str, activation: int) -> bool:
        """SIGKILL every process left in the activation's cgroup, including ones that left its
        process group; then keep the cgroup, empty, for the tenant's next activation (or remove
        it when the tenant has enough kept). Returns whether the kernel OOM-killed a process of
        the activation. Once per activation: later calls do nothing and return False.

        The OOM count is read once, with the cgroup empty: every kill of the activation's
        processes is in it, none of a later user's. It is the activation's own cgroup, not the
        tenant's: v1 counts a kill in the victim's cgroup only, so no sibling's is confused
        with it."""
        if activation not in self.leaves:  # killed already: its cgroup may be another's now
            return False
        tenant, leaf = self.leaves.pop(activation)
        dirs = [f"{root}/{tenant}/{leaf}" for root in self.roots]
        emptied = _emptied(dirs)
        kills = self._oom_kills(tenant, leaf)
        oom = kills > self.oom_before.pop((tenant, leaf), 0)
        pool = self.free.setdefault(tenant, [])
        if emptied and len(pool) < KEPT_PER_TENANT:
            self.oom_before[tenant, leaf] = kills
            pool.append(leaf)
        else:
            _kill_and_remove(dirs)
        return oom

    def drop(self, tenant: str) -> None:
        """Remove a tenant's kept activation cgroups and its own directories, all empty by now:
        for `doctor`'s probe, a tenant whose cgroups nothing will reuse. Leaves the base
        directories alone (a running supervisor may use them)."""
        for leaf in self.free.pop(tenant, []):
            self.oom_before.pop((tenant, leaf), None)
            _kill_and_remove([f"{root}/{tenant}/{leaf}" for root in self.roots])
        self.applied.pop(tenant, None)
        for root in self.roots:
            with contextlib.suppress(OSError):
                os.rmdir(f"{root}/{tenant}")

    def close(self) -> None:
        """At shutdown: remove the (empty) tenant cgroups and this supervisor's own directory."""
        self.free.clear()
        self.sweep()
        for base in {*self.bases.values()}:
            for d in [*(p for p in base.iterdir() if p.is_dir()), base]:
                with contextlib.suppress(OSError):
                    d.rmdir()

    def sweep(self) -> int:
        """Recovery: kill whatever a previous run left in any activation cgroup."""
        dirs = {str(leaf) for base in self.bases.values() for leaf in base.glob("*/act-*")}
        return _kill_and_remove(sorted(dirs))


def _read(path: str) -> bytes | None:
    """A small kernel file's contents; None when it cannot be read. Three system calls where
    open() makes seven: these are read at every activation's reap."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _kill_in(d: str) -> int | None:
    """SIGKILL every process in cgroup `d`; how many there were, None when `d` is gone."""
    text = _read(f"{d}/cgroup.procs")
    if text is None:
        return None
    pids = [int(p) for p in text.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def _emptied(dirs: list[str]) -> bool:
    """SIGKILL what is in these cgroups until none holds a process (True), or a deadline passes
    or one is gone (False)."""
    deadline = time.monotonic() + 5.0
    for d in dirs:
        while (found := _kill_in(d)) != 0:
            if found is None or time.monotonic() > deadline:
                return False
            time.sleep(0.001)  # bounded: SIGKILLed processes leave within microseconds
    return True


def _kill_and_remove(dirs: list[str]) -> int:
    killed = 0
    deadline = time.monotonic() + 5.0
    for d in dirs:
        while (found := _kill_in(d)) is not None:
            killed += found
            try:
                os.rmdir(d)  # fails with EBUSY until every process is gone
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.001)  # bounded: SIGKILLed processes leave within microseconds
    return killed


def _own_cgroups() -> dict[str, str]:
    """controller → this process's cgroup path ('' for the v2 hierarchy)."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for ctrl in ctrls.split(",") if ctrls else [""]:
            out[ctrl] = path
    return out
