"""A real supervisor process in a temp dir, and helpers to wait on conditions with deadlines."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import psycopg
import pytest

from stepvisor import Client
from stepvisor.client import StepVisorError
from supervisor import disk

# PostgreSQL fixtures, imported here so that every test can ask for them.
from tests.pg import own_pg_cluster, pg_cluster, pg_db, pg_url  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def wait_for(cond: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    """Poll `cond` until it returns a truthy value; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def wait_gone(pid: int, timeout_s: float, what: str) -> None:
    """Wait until process `pid` has exited (gone, or a zombie nobody reaped yet)."""

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, timeout_s, what)


def reaped_activations(client: Any, tenant: str, instance: str) -> list[dict[str, Any]]:
    """The instance's activation records once every one is reaped: an instance is complete as
    soon as its last result is committed, and that activation's timings are recorded a moment
    later, when it has exited."""

    seen: list[dict[str, Any]] = []

    def reaped() -> list[dict[str, Any]] | None:
        acts: list[dict[str, Any]] = client.history(tenant, instance)["activations"]
        seen[:] = acts
        return acts if all(a["total_ms"] is not None for a in acts) else None

    try:
        return wait_for(reaped, 10, f"every activation of {tenant}/{instance} to be reaped")
    except AssertionError as exc:  # say which one, and what is known of it
        fields = ("id", "pid", "seq", "outcome", "detail")
        left = [{k: a.get(k) for k in fields} for a in seen if a["total_ms"] is None]
        raise AssertionError(f"{exc}; not reaped: {left}") from None


class Daemon:
    """`stepvisor serve` as a child process with its own state, runtime dir and log file."""

    def __init__(self, base: Path, config: str = "", server: str = "", database: str = "") -> None:
        self.database = database  # a PostgreSQL URL, or empty for the embedded SQLite file
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.state = base / "state"
        self.run_dir = base / "run"
        self.config_path = base / "stepvisor.toml"
        self.log_path = base / "supervisor.log"
        self.endpoint = f"ipc://{self.run_dir / 'api.sock'}"
        self.write_config(config, server)
        self.proc: subprocess.Popen[bytes] | None = None
        self.clients: list[Client] = []

    def write_config(self, extra: str = "", server: str = "") -> None:
        """Write stepvisor.toml: our [server] keys plus `server` lines, then `extra` tables."""
        server = textwrap.dedent(server)
        head = ["[server]", f'state_dir = "{self.state}"', f'runtime_dir = "{self.run_dir}"']
        if self.database and "database" not in server:
            head.append(f'database = "{self.database}"')
        for key, value in (("hello_timeout_s", "20"), ("drain_timeout_s", "10")):
            if key not in server:
                head.append(f"{key} = {value}")
        self.config_path.write_text("\n".join(head) + "\n" + server + textwrap.dedent(extra))

    def start(self, env: dict[str, str] | None = None) -> Daemon:
        """Start it and wait until it answers ping; `env` is added to the environment."""
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stepvisor.cli", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.base,
            env={**os.environ, **(env or {})},
        )
        log.close()
        probe = Client(self.endpoint, timeout_s=0.5)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited: {self.log_path.read_text()[-3000:]}")
            try:
                return probe.ping(timeout_s=0.5)
            except StepVisorError:
                return False

        wait_for(up, 30, "supervisor to answer ping")
        probe.close()
        return self

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`stepvisor --socket <this daemon> ARGS...`, as a user would run it."""
        return subprocess.run(
            [sys.executable, "-m", "stepvisor.cli", "--socket", self.endpoint, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def client(self, timeout_s: float = 30.0) -> Client:
        c = Client(self.endpoint, timeout_s=timeout_s)
        self.clients.append(c)
        return c

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("supervisor did not stop") from None

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the daemon's database behind its back, on whichever backend it uses."""
        if self.database:
            with psycopg.connect(self.database) as pg:
                return [tuple(r) for r in pg.execute(sql.replace("?", "%s"), args)]
        uri = f"file:{self.state / 'stepvisor.db'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            return [tuple(r) for r in db.execute(sql, args)]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_bytes().splitlines():
            if line.startswith(b"{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    out.append(orjson.loads(line))
        return out

    def stray_output(self, limit: int = 6000) -> str:
        """The tail of what its output holds besides JSON log lines: a traceback, a library's
        warning on stderr. `logs` drops those; an assertion on how it exited should show them."""
        lines = self.log_path.read_bytes().splitlines()
        stray = b"\n".join(line for line in lines if not line.startswith(b"{"))
        return stray.decode(errors="replace")[-limit:]

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.logs()
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
        ]


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    # ipc:// paths must fit in sun_path (108 bytes): pytest's tmp_path is often too long.
    path = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))
    path.chmod(0o711)  # activations with sandbox uids must reach the sockets below it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shared(tmp_short: Path) -> Path:
    """A directory tenant code may write (tests record side effects there): world-writable for
    sandbox uids, and granted to tenants with `writable_paths` (see `SHARED_CONFIG`)."""
    path = tmp_short / "shared"
    path.mkdir(mode=0o777)
    path.chmod(0o777)
    return path


def writable(path: Path, **defaults: object) -> str:
    """A [defaults] table granting tenants `path` read-write, plus other default limits."""
    lines = [f'writable_paths = ["{path}"]', *(f"{k} = {v}" for k, v in defaults.items())]
    return "[defaults]\n" + "\n".join(lines) + "\n"


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The database the test's supervisors use: every test with a daemon runs on both, but for
    one marked `sqlite_only` (it reads the SQLite file itself) or `postgresql_only`."""
    return str(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped = [], []
    for item in items:
        backend = getattr(item, "callspec", None) and item.callspec.params.get("backend")
        other = {"sqlite": "postgresql_only", "postgresql": "sqlite_only"}.get(backend or "")
        (dropped if other and item.get_closest_marker(other) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def database(request: pytest.FixtureRequest, backend: str) -> str:
    """`[server] database` for the test's supervisors: a fresh PostgreSQL database, or empty."""
    return str(request.getfixturevalue("pg_db")) if backend == "postgresql" else ""


@pytest.fixture
def make_daemon(tmp_short: Path, database: str) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(config: str = "", server: str = "", start: bool = True) -> Daemon:
        d = Daemon(tmp_short / f"d{len(made)}", config, server, database)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        for c in d.clients:
            c.close()
        if d.alive():
            d.stop(signal.SIGKILL)
        # Activations die with their supervisor (PDEATHSIG); make sure none is left behind,
        # nor the cgroups a SIGKILLed supervisor could not remove.
        if d.proc is not None:
            os.system(f"pkill -KILL -f 'sandbox_host --endpoint ipc://{d.run_dir}' 2>/dev/null")
            remove_cgroups(d.state)
            unmount_scratch(d.run_dir)


def unmount_scratch(run_dir: Path) -> None:
    """The tenants' scratch tmpfs mounts a SIGKILLed supervisor left (its next start would
    sweep them; a test's supervisor has no next start)."""
    for point in disk.mounts_under(run_dir):
        with contextlib.suppress(disk.DiskError):
            disk.unmount(point)


def _listed(walk: Callable[[], list[Path]]) -> list[Path]:
    """A directory walk over cgroups that are being removed as it runs: a directory that
    vanishes between being listed and being entered means walking again."""
    for _ in range(20):
        try:
            return walk()
        except FileNotFoundError:
            continue
    return walk()


def remove_cgroups(state_dir: Path) -> None:
    """What a SIGKILLed supervisor leaves: its activations' cgroups, emptied as they die."""
    name = "stepvisor-" + hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]
    for base in _listed(lambda: list(Path("/sys/fs/cgroup").glob(f"*/**/{name}"))):
        try:
            tenants = [t for t in base.iterdir() if t.is_dir()]
            leaves = [a for t in tenants for a in t.iterdir() if a.is_dir()]
        except FileNotFoundError:  # removed meanwhile: what is left is retried below
            tenants, leaves = [], []
        for leaf in leaves + tenants + [base]:

            def gone(leaf: Path = leaf) -> bool:
                with contextlib.suppress(OSError):
                    for pid in (leaf / "cgroup.procs").read_text().split():
                        with contextlib.suppress(OSError):
                            os.kill(int(pid), signal.SIGKILL)
                try:
                    leaf.rmdir()
                except FileNotFoundError:
                    return True
                except OSError:
                    return False
                return True

            wait_for(gone, 10, f"cgroup {leaf} to empty")


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon()


def deploy_source(client: Client, tenant: str, source: str, filename: str = "wf.py") -> dict:
    return client.deploy(tenant, textwrap.dedent(source), filename=filename)
