"""`stepvisor.toml`, parsed once into frozen, validated types. Errors name the key path."""

from __future__ import annotations

import os
import re
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import psycopg
from psycopg.conninfo import conninfo_to_dict

from protocol.limits import TENANT_RE
from supervisor.journal.db import safe_url

T = TypeVar("T")
PosInt = Annotated[int, msgspec.Meta(ge=1)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
IPC_PATH_MAX = 100  # sun_path is 108 bytes; keep a margin


class ConfigError(Exception):
    """The config file is missing, unreadable or invalid; the message names the key."""


# Each limit's type once, shared by [defaults] and the optional [tenants.NAME] overrides.
MemoryMiB = Annotated[int, msgspec.Meta(ge=64, le=1 << 20)]
CpuSeconds = Annotated[int, msgspec.Meta(ge=1, le=86_400)]
TimeoutS = Annotated[float, msgspec.Meta(gt=0, le=86_400)]
MaxConcurrent = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
MaxInstances = Annotated[int, msgspec.Meta(ge=1)]
MaxFailures = Annotated[int, msgspec.Meta(ge=1, le=100)]
MaxPids = Annotated[int, msgspec.Meta(ge=8, le=1_000_000)]
CpuQuota = Annotated[float, msgspec.Meta(ge=0, le=1024)]
DiskMiB = Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]
RetentionDays = Annotated[float, msgspec.Meta(ge=0, le=36_500)]
MaxSteps = Annotated[int, msgspec.Meta(ge=1, le=100_000)]
MaxStateMiB = Annotated[int, msgspec.Meta(ge=1, le=1024)]
AbsPath = Annotated[str, msgspec.Meta(pattern=r"^/")]


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-tenant limits. Every activation of the tenant runs under these."""

    memory_mib: MemoryMiB = 512  # the tenant's memory (cgroup) and each activation's address space
    cpu_seconds: CpuSeconds = 60  # CPU time of one activation
    timeout_s: TimeoutS = 600.0  # wall-clock cap of one step
    max_concurrent: MaxConcurrent = 4  # running activations
    max_instances: MaxInstances = 1_000_000  # live (non-terminal) instances
    max_activation_failures: MaxFailures = 5
    max_pids: MaxPids = 128  # processes + threads of the tenant (cgroup) and of one activation
    cpu_quota: CpuQuota = 0.0  # CPUs the tenant may use at once (cgroup); 0 = no quota
    network: bool = False  # False: private network namespace and no sockets
    python: str = ""  # the tenant's own interpreter / virtualenv python; empty: the server's
    readable_paths: tuple[AbsPath, ...] = ()  # extra read-only paths (Landlock)
    writable_paths: tuple[AbsPath, ...] = ()  # extra read-write paths (Landlock)
    # scratch space of all the tenant's running activations together (a tmpfs; its pages also
    # count toward memory_mib); writable_paths are not bounded by it
    disk_mib: DiskMiB = 256
    # finished (complete, errored, terminated) instances are deleted, with their journal,
    # events and activation records, this long after they finished; 0 keeps them forever
    retention_days: RetentionDays = 30.0
    # journaled commands (steps, sleeps, waits) of one instance; each activation replays them all
    max_steps: MaxSteps = 10_000
    # step results journaled for one instance: every activation of it carries them all
    max_state_mib: MaxStateMiB = 64


class TenantOverrides(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    memory_mib: MemoryMiB | None = None
    cpu_seconds: CpuSeconds | None = None
    timeout_s: TimeoutS | None = None
    max_concurrent: MaxConcurrent | None = None
    max_instances: MaxInstances | None = None
    max_activation_failures: MaxFailures | None = None
    max_pids: MaxPids | None = None
    cpu_quota: CpuQuota | None = None
    network: bool | None = None
    python: str | None = None
    readable_paths: tuple[AbsPath, ...] | None = None
    writable_paths: tuple[AbsPath, ...] | None = None
    disk_mib: DiskMiB | None = None
    retention_days: RetentionDays | None = None
    max_steps: MaxSteps | None = None
    max_state_mib: MaxStateMiB | None = None


Mode = Literal["auto", "required", "off"]


class Isolation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which isolation layers to use. auto: when the host supports it (else warn); required:
    refuse to start without it; off: never."""

    uid: Mode = "auto"  # a sandbox uid/gid per running activation (needs root)
    cgroup: Mode = "auto"  # per-tenant cgroups for memory, CPU quota and pids (needs root)
    # private network namespace for tenants without `network`, and a private IPC namespace for
    # every activation (root)
    network: Mode = "auto"
    landlock: Mode = "auto"  # filesystem: read-only interpreter, read-write scratch only
    seccomp: Mode = "auto"  # no new sockets (only IPv4/IPv6 for tenants with `network`)
    disk: Mode = "auto"  # a tmpfs of disk_mib per tenant for its scratch dirs (needs root)
    sandbox_uid_range: tuple[
        Annotated[int, msgspec.Meta(ge=1000, le=4_294_967_294)],
        Annotated[int, msgspec.Meta(ge=1000, le=4_294_967_294)],
    ] = (900_000, 999_999)
    # Each tenant's activations share one group (base + the tenant's number), so files a step
    # writes under `writable_paths` stay usable by the tenant's next activation and no other.
    sandbox_gid_base: Annotated[int, msgspec.Meta(ge=1000, le=4_000_000_000)] = 2_000_000


class Server(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    state_dir: str = ""  # empty: the user's state dir
    runtime_dir: str = ""  # empty: the user's runtime dir; holds the ipc sockets
    api_endpoint: str = ""  # empty: ipc://<runtime_dir>/api.sock
    sandbox_endpoint: str = ""  # empty: ipc://<runtime_dir>/sandbox.sock
    launch_mode: Literal["fork", "spawn"] = "fork"  # spawn: a fresh interpreter per activation
    # fork mode: activation processes the fork server keeps forked ahead of requests
    fork_spares: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2
    # a fork server for a tenant's own interpreter stops after this long without requests
    fork_server_idle_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 60.0
    python: str = ""  # interpreter for activations; empty: the supervisor's own sys.executable
    # activations launched ahead for a tenant with steady work: isolated and connected before
    # its next step is due, so that step need not wait for a process; 0: never
    prepared_per_tenant: Annotated[int, msgspec.Meta(ge=0, le=8)] = 1
    # a prepared activation no step took within this long is stopped; also how close together
    # a tenant's launches must come to count as steady work
    prepared_idle_s: Annotated[float, msgspec.Meta(gt=0, le=20)] = 1.0
    max_activations: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 16  # global cap
    hello_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    drain_timeout_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 30.0
    # an activation whose fate is decided (its result journaled) and whose processes are still
    # there after this long is killed, whole cgroup and process group
    settled_grace_s: Annotated[float, msgspec.Meta(gt=0, le=10)] = 1.0
    require_declared_tenants: bool = False  # only [tenants.NAME] may deploy
    # how often the loop deletes what outlived its tenant's retention_days (small batches)
    retention_interval_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 60.0
    # acked: whatever is acknowledged (a result, a create, an event, a control) is on disk first;
    # full: every commit is synced; normal: none is (a power loss may drop the last commits)
    synchronous: Literal["acked", "full", "normal"] = "acked"
    # a remote API for platform backends, secured with CURVE keys (`stepvisor keys new`), e.g.
    # "tcp://0.0.0.0:7700"; empty: none
    tcp_endpoint: str = ""
    # the state database: empty, the embedded SQLite file in state_dir; or a PostgreSQL libpq URL
    # shared by every node, e.g. "postgresql://stepvisor@db.internal:5432/stepvisor" or
    # "postgresql:///stepvisor?host=/run/postgresql" (a unix socket)
    database: str = ""
    # with a shared database: this node's name (empty: the host name and a hash of state_dir),
    # and how long a node that stopped renewing its lease keeps its running work before another
    # node fences it and re-runs that work (the loop renews it every lease_s / 4)
    node_name: Annotated[str, msgspec.Meta(pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})?$")] = ""
    lease_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 10.0
    # members of this group may use the ipc:// API socket (0660); empty: root's group only
    api_group: str = ""
    log_file: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    server: Server = Server()
    isolation: Isolation = Isolation()
    defaults: Limits = Limits()
    tenants: dict[str, TenantOverrides] = {}

    def limits_for(self, tenant: str) -> Limits:
        """The tenant's limits: its overrides on top of `[defaults]`."""
        over = self.tenants.get(tenant)
        if over is None:
            return self.defaults
        changes = {f: v for f in over.__struct_fields__ if (v := getattr(over, f)) is not None}
        return msgspec.structs.replace(self.defaults, **changes)


EMBEDDED_LOG = "stepvisor.log"  # the embedded default's log file, in its state dir


class Paths(msgspec.Struct, frozen=True):
    """Where things live, resolved from `[server]` and the environment."""

    state_dir: Path
    runtime_dir: Path
    db: Path
    api_endpoint: str
    sandbox_endpoint: str
    python: str


# One rule for the embedded default's directories: root's are the system's, the ones the unit
# file makes (so `stepvisor` as root finds the service's socket); anyone else's are the XDG
# ones. Root ignores XDG_* on purpose: a login shell's XDG_RUNTIME_DIR (/run/user/0) is 0700,
# and sandbox uids could not reach the sandbox socket in it.


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/stepvisor")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "stepvisor"


def default_runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/stepvisor")
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "stepvisor"
    return Path(tempfile.gettempdir()) / f"stepvisor-{os.getuid()}"


def default_api_endpoint() -> str:
    return f"ipc://{default_runtime_dir() / 'api.sock'}"


def resolve_paths(cfg: Config) -> Paths:
    state = Path(cfg.server.state_dir) if cfg.server.state_dir else default_state_dir()
    runtime = Path(cfg.server.runtime_dir) if cfg.server.runtime_dir else default_runtime_dir()
    api = cfg.server.api_endpoint or f"ipc://{runtime / 'api.sock'}"
    sandbox = cfg.server.sandbox_endpoint or f"ipc://{runtime / 'sandbox.sock'}"
    for key, ep in (("server.api_endpoint", api), ("server.sandbox_endpoint", sandbox)):
        if not ep.startswith("ipc://"):
            raise ConfigError(f"{key}: only ipc:// endpoints are supported, got {ep!r}")
        if len(ep) - len("ipc://") > IPC_PATH_MAX:
            raise ConfigError(f"{key}: socket path longer than {IPC_PATH_MAX} characters: {ep!r}")
    return Paths(
        state_dir=state,
        runtime_dir=runtime,
        db=state / "stepvisor.db",
        api_endpoint=api,
        sandbox_endpoint=sandbox,
        python=cfg.server.python or sys.executable,
    )


def parse(text: str, *, source: str = "<config>") -> Config:
    """Parse and validate TOML text. Raises ConfigError naming the offending key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    tenants = raw.pop("tenants", {})
    if not isinstance(tenants, dict):
        raise ConfigError(f"{source}: `tenants` must be a table of [tenants.NAME] tables")
    overrides: dict[str, TenantOverrides] = {}
    for name, table in tenants.items():
        if not TENANT_RE.match(name):
            raise ConfigError(
                f"{source}: `tenants.{name}`: invalid tenant name {name!r} (lowercase letters, "
                "digits, '-' and '_', starting with a letter or digit, at most 63)"
            )
        # One tenant at a time: msgspec's error path does not name dict keys.
        overrides[name] = _convert(table, TenantOverrides, f"tenants.{name}", source)
    cfg = msgspec.structs.replace(_convert(raw, Config, "", source), tenants=overrides)
    if cfg.server.python and not os.access(cfg.server.python, os.X_OK):
        raise ConfigError(f"{source}: `server.python`: {cfg.server.python!r} is not executable")
    pythons = [("defaults", cfg.defaults.python)]
    pythons += [(f"tenants.{t}", o.python) for t, o in overrides.items() if o.python]
    for name, python in pythons:
        if python and not os.access(python, os.X_OK):
            raise ConfigError(f"{source}: `{name}.python`: {python!r} is not executable")
    low, high = cfg.isolation.sandbox_uid_range
    if high - low + 1 < cfg.server.max_activations:
        raise ConfigError(
            f"{source}: `isolation.sandbox_uid_range`: needs at least `server.max_activations` "
            f"({cfg.server.max_activations}) uids"
        )
    tcp = cfg.server.tcp_endpoint
    if tcp and not re.match(r"^tcp://[^:/]+:(\d+|\*)\Z", tcp):
        raise ConfigError(f"{source}: `server.tcp_endpoint`: expected tcp://HOST:PORT, got {tcp!r}")
    if why := database_error(cfg.server.database):
        raise ConfigError(f"{source}: `server.database`: {why}")
    resolve_paths(cfg)
    return cfg


def database_error(url: str) -> str | None:
    """Why `[server] database` cannot name a PostgreSQL database, or None (empty is SQLite)."""
    if not url:
        return None
    if not url.startswith(("postgresql://", "postgres://")):
        return f"expected a postgresql:// URL (or nothing, for SQLite), got {url[:40]!r}"
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        return f"not a valid libpq URL: {exc}"
    return None


def with_embedded_log(cfg: Config, paths: Paths) -> Config:
    """The embedded default keeps a log file in its state dir (`stepvisor logs` reads it), as a
    config file may say with `log_file`."""
    server = msgspec.structs.replace(cfg.server, log_file=str(paths.state_dir / EMBEDDED_LOG))
    return msgspec.structs.replace(cfg, server=server)


def with_dirs(cfg: Config, state_dir: str | None, runtime_dir: str | None) -> Config:
    """`cfg` with the state and runtime directories given on the command line, if any."""
    if not (state_dir or runtime_dir):
        return cfg
    server = msgspec.structs.replace(
        cfg.server,
        state_dir=state_dir or cfg.server.state_dir,
        runtime_dir=runtime_dir or cfg.server.runtime_dir,
    )
    return msgspec.structs.replace(cfg, server=server)


# Read once at start-up: a reload that changes one of these is refused as a whole.
RESTART_KEYS = frozenset(
    {
        "server.state_dir",
        "server.runtime_dir",
        "server.api_endpoint",
        "server.sandbox_endpoint",
        "server.api_group",
        "server.tcp_endpoint",
        "server.python",
        "server.launch_mode",
        "server.fork_spares",
        "server.synchronous",
        "server.database",
        "server.node_name",
        "server.log_file",
        "server.log_level",
    }
)
RESTART_SECTIONS = ("isolation.",)  # layers, uid and gid ranges: resolved once, at start-up


def diff(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Every setting that differs, by dotted key (`tenants.acme.memory_mib`): (old, new). It is
    logged and sent to the client: a database URL shows without its password."""
    a, b = _flatten(msgspec.to_builtins(old)), _flatten(msgspec.to_builtins(new))
    changes = {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
    if "server.database" in changes:
        was, now = (safe_url(v) if v else v for v in changes["server.database"])
        changes["server.database"] = (was, now if now != was else f"{now} (password changed)")
    return changes


def needs_restart(changes: dict[str, tuple[Any, Any]]) -> list[str]:
    return [k for k in changes if k in RESTART_KEYS or k.startswith(RESTART_SECTIONS)]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix.removesuffix("."): value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flatten(item, f"{prefix}{key}."))
    return out


def _convert(value: object, kind: type[T], prefix: str, source: str) -> T:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        # msgspec says "Expected `int`, got `str` - at `$.defaults.memory_mib`": keep the path,
        # rooted at `prefix`.
        text = str(exc).replace("`$.", f"`{prefix}." if prefix else "`")
        text = text.replace("`$`", f"`{prefix}`")
        if prefix and " - at " not in text:
            text += f" - at `{prefix}`"
        raise ConfigError(f"{source}: {text}") from None


def load(path: str | os.PathLike[str] | None) -> Config:
    """Load the config file at `path`, or the embedded default when `path` is None."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read config {path}: not UTF-8 text") from None
    return parse(text, source=str(path))
