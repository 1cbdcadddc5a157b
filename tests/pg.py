"""A throwaway PostgreSQL cluster for the tests: initdb and pg_ctl in a temp dir, unix socket only.

`pg_url` (session-scoped) is a libpq URL of the cluster's `stepvisor` database; `pg_db` is a fresh
database per test, dropped afterwards. Without PostgreSQL's server binaries a test using either
skips outside CI and fails in CI (CI=true), saying what is missing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

SERVER_BINARIES = ("initdb", "pg_ctl")
DEBIAN_BIN_DIRS = Path("/usr/lib/postgresql")  # Debian keeps server binaries off PATH, per version
SUPERUSER = "postgres"
DATABASE = "stepvisor"
# The socket file is named after the port even without a TCP listener; naming it in the URL too
# keeps a developer's PGPORT from pointing libpq at another file.
PORT = 5432
CTL_TIMEOUT_S = 60
SETTINGS = {
    "listen_addresses": "''",  # unix socket only: no port clash with anything else on the machine
    "port": str(PORT),
    # A throwaway cluster need not survive a crash, so skip what makes one durable.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
}


def missing(reason: str) -> NoReturn:
    """Skip outside CI; in CI a test whose PostgreSQL is missing must fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _version_key(path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in path.name.split("."))
    except ValueError:
        return (-1,)


def find_binaries() -> dict[str, Path] | None:
    """initdb and pg_ctl: from PATH, else Debian's newest installed version."""
    on_path = {name: shutil.which(name) for name in SERVER_BINARIES}
    if all(on_path.values()):
        return {name: Path(str(found)) for name, found in on_path.items()}
    versions = sorted(DEBIAN_BIN_DIRS.glob("*/bin"), key=lambda b: _version_key(b.parent))
    for bin_dir in reversed(versions):
        if all((bin_dir / name).is_file() for name in SERVER_BINARIES):
            return {name: bin_dir / name for name in SERVER_BINARIES}
    return None


def cluster_owner() -> pwd.struct_passwd | None:
    """Who runs initdb and pg_ctl: both refuse root, so as root the `postgres` system user (or
    `nobody`) owns the cluster; otherwise we do (None)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    missing("running as root, and neither a `postgres` nor a `nobody` user can own the cluster")


def server_env() -> dict[str, str]:
    # The server reads PGPORT, PGDATA and friends; a developer's settings must not leak in.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}


class Cluster:
    """One initdb'd data directory and its postmaster, all under a short temp dir."""

    def __init__(self, binaries: dict[str, Path], owner: pwd.struct_passwd | None) -> None:
        self.binaries = binaries
        self.owner = owner
        # Under /tmp, not pytest's tmp_path: the socket's path must fit in sun_path (108 bytes).
        self.base = Path(tempfile.mkdtemp(prefix="svpg-", dir="/tmp"))
        self.data = self.base / "data"
        self.socket_dir = self.base / "s"
        self.log = self.base / "postgres.log"
        self.socket_dir.mkdir()
        if owner is not None:
            for path in (self.base, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        # The socket is reachable by every local user, as in Debian's /run/postgresql: the tests
        # prove that tenant code cannot use it all the same. The data dir stays the owner's.
        self.base.chmod(0o711)
        self.socket_dir.chmod(0o755)

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run initdb or pg_ctl as the cluster's owner; fail with its output if it fails."""
        owner = self.owner
        done = subprocess.run(
            [str(self.binaries[tool]), *args],
            cwd=self.base,  # the owner may not be able to reach the test's working directory
            env=server_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CTL_TIMEOUT_S + 30,
            check=False,
            user=None if owner is None else owner.pw_uid,
            group=None if owner is None else owner.pw_gid,
            extra_groups=None if owner is None else [],  # drop root's supplementary groups
        )
        if done.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {done.stderr}{done.stdout}{log}")
        return done

    def start(self, durable: bool = False) -> None:
        """initdb and start; `durable`: keep fsync and synchronous commits (for benchmarks)."""
        self.run(
            "initdb",
            f"--pgdata={self.data}",
            f"--username={SUPERUSER}",
            "--auth=trust",  # reachable only by a socket in a dir only the owner and root enter
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        settings = {**SETTINGS, "unix_socket_directories": f"'{self.socket_dir}'"}
        if durable:
            settings |= {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("".join(f"{key} = {value}\n" for key, value in settings.items()))
        self.resume()
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))

    def resume(self) -> None:
        """Start the postmaster on the existing data directory and wait until it accepts."""
        self.run(
            "pg_ctl",
            "start",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-s",
            "-t",
            str(CTL_TIMEOUT_S),
        )

    def halt(self) -> None:
        """Stop the postmaster at once, as a crash would (the data stays: see `resume`)."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            try:
                self.run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-s")
            except (RuntimeError, subprocess.TimeoutExpired):
                # Never leave a postmaster behind: its pid is the file's first line.
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)

    def stop(self) -> None:
        """Stop the postmaster without a checkpoint (nothing here is kept) and remove it all."""
        self.halt()
        shutil.rmtree(self.base, ignore_errors=True)

    def url(self, dbname: str) -> str:
        """A libpq URL of `dbname` over the cluster's socket, as its superuser."""
        host = quote(str(self.socket_dir), safe="")
        return f"postgresql:///{quote(dbname)}?host={host}&port={PORT}&user={SUPERUSER}"


def _cluster(durable: bool = False) -> Iterator[Cluster]:
    binaries = find_binaries()
    if binaries is None:
        missing(
            "PostgreSQL server binaries (initdb, pg_ctl) are not on PATH nor under "
            f"{DEBIAN_BIN_DIRS}/*/bin: install Debian's `postgresql` package (.ci/run does)"
        )
    cluster = Cluster(binaries, cluster_owner())
    try:
        cluster.start(durable)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    yield from _cluster()


@pytest.fixture
def own_pg_cluster() -> Iterator[Cluster]:
    """A cluster of the test's own, which it may crash and start again (`halt`, `resume`):
    durable, as a server whose crash a test survives must be."""
    yield from _cluster(durable=True)


@pytest.fixture(scope="session")
def pg_url(pg_cluster: Cluster) -> str:
    """The throwaway cluster's `stepvisor` database, shared by the whole session."""
    return pg_cluster.url(DATABASE)


@pytest.fixture
def pg_db(pg_cluster: Cluster) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_cluster.url("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    yield pg_cluster.url(name)
    with psycopg.connect(pg_cluster.url("postgres"), autocommit=True) as admin:
        # FORCE: a connection the test leaked must not keep its database alive.
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
