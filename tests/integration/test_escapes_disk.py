"""Escapes through the disk and the operator's terminal. A tenant filling its scratch space stops
at its `disk_mib` (a tmpfs per tenant), the space is free again once the activation is gone, and
the usage roll-up shows what it held. A tenant printing terminal escapes into its output cannot
overwrite or fake lines in `stepvisor logs`: they come out escaped."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, deploy_source, wait_for
from tests.integration.arena import Arena

FILL = """
import os
written, error = 0, None
chunk = b"x" * (1 << 20)
try:
    for n in range(10_000):  # far more than any disk_mib here: only ENOSPC stops it
        with open(f"fill-{n}", "wb") as f:
            for _ in range(32):  # 32 MiB files: below RLIMIT_FSIZE, so the quota must stop it
                f.write(chunk)
                written += len(chunk)
except OSError as exc:
    error = exc.strerror
for name in os.listdir("."):  # leave the first `keep` files for the usage figure
    if name.startswith("fill-") and int(name[5:]) >= params.get("keep", 0):
        os.unlink(name)
result = {"mib": written >> 20, "error": error}
"""

DISK_MIB = 96  # below the tenant's memory_mib: tmpfs pages are charged to its memory cgroup
EVIL = """
    [tenants.evil]
    memory_mib = 256
    disk_mib = {disk_mib}
    cpu_seconds = 10
    timeout_s = 30
    max_pids = 32
    max_concurrent = 2
"""


@pytest.fixture
def disk_arena(
    make_daemon: Callable[..., Daemon], request: pytest.FixtureRequest
) -> Iterator[Arena]:
    if os.geteuid() != 0:
        pytest.skip("the disk layer mounts a tmpfs per tenant: needs root")
    mode = getattr(request, "param", "fork")  # launch_mode
    arena = Arena(make_daemon(EVIL.format(disk_mib=DISK_MIB), f'launch_mode = "{mode}"\n'))
    arena.need("disk")
    yield arena
    if arena.daemon.alive():  # stopped on purpose by a test that looks at what stop leaves
        arena.assert_unharmed()


@pytest.mark.parametrize("disk_arena", ["fork", "spawn"], indirect=True)
def test_scratch_stops_at_disk_mib_and_is_free_again(disk_arena: Arena) -> None:
    first = disk_arena.attack(FILL, iid="a")["output"]
    assert first["error"] == "No space left on device"
    assert DISK_MIB - 32 <= first["mib"] <= DISK_MIB
    # The same tenant's next activation has the whole space again: the first one's scratch
    # (and the files it left, here one 32 MiB file) went with it.
    second = disk_arena.attack(FILL, iid="b", keep=1)["output"]
    assert second["error"] == "No space left on device"
    assert DISK_MIB - 32 <= second["mib"] <= DISK_MIB
    assert disk_arena.outcomes("a") == ["ok", "ok"]
    rows = disk_arena.client.usage("evil")
    # "b" kept one 32 MiB file in its scratch until it exited: that is what usage reports
    assert rows[0]["scratch_max_kib"] >= 32 * 1024
    table = disk_arena.daemon.cli("usage", "--tenant", "evil").stdout
    assert "scratch MiB" in table.splitlines()[0]


def test_a_reload_resizes_the_tenants_scratch_at_its_next_launch(disk_arena: Arena) -> None:
    assert disk_arena.attack(FILL, iid="a")["output"]["mib"] <= DISK_MIB
    disk_arena.daemon.write_config(EVIL.format(disk_mib=2 * DISK_MIB))
    disk_arena.client.reload()
    out = disk_arena.attack(FILL, iid="b")["output"]
    assert out["error"] == "No space left on device"
    assert 2 * DISK_MIB - 32 <= out["mib"] <= 2 * DISK_MIB


def _scratch_mounts(daemon: Daemon) -> list[str]:
    root = str(daemon.run_dir / "scratch") + "/"
    with open("/proc/self/mountinfo") as f:
        return [p for line in f if (p := line.split(" ")[4]).startswith(root)]


def test_a_killed_supervisors_mounts_are_unmounted_at_its_next_start(disk_arena: Arena) -> None:
    disk_arena.attack("result = 1")
    daemon = disk_arena.daemon
    assert len(_scratch_mounts(daemon)) == 2  # evil's and victim's
    daemon.stop(signal.SIGKILL)
    assert len(_scratch_mounts(daemon)) == 2  # nobody unmounted them
    daemon.start()
    wait_for(lambda: daemon.events("recovery.unmounted_scratch", mounts=2), 30, "the sweep")
    assert _scratch_mounts(daemon) == []  # until a tenant's next launch mounts its own again


def test_scratch_mounts_are_gone_after_stop(disk_arena: Arena) -> None:
    disk_arena.attack("result = len(open('f', 'w').write('x'))")
    disk_arena.assert_unharmed()
    assert _scratch_mounts(disk_arena.daemon)
    assert disk_arena.daemon.stop() == 0
    assert _scratch_mounts(disk_arena.daemon) == []


PRINTER = """
from stepvisor import workflow

@workflow("say")
def say(event, step):
    return step.do("say", lambda: print(event.payload) or "said")
"""
# erase the line, back to its start, then what looks like another tenant's line; a fake newline
# with a whole fake record; a bidi override
SPOOF = (
    "\x1b[2K\rglobex/x#1  [pay] stdout: paid in full"
    "\n2026-11-25 14:13:29.113 info    globex/x#1  activation.finished outcome=ok \u202edone"
)


def test_tenant_output_cannot_spoof_lines_in_logs(
    make_daemon: Callable[..., Daemon], tmp_short: Path
) -> None:
    log = tmp_short / "stepvisor.jsonl"
    daemon = make_daemon(server=f'log_file = "{log}"\n')
    c = daemon.client()
    deploy_source(c, "evil", PRINTER)
    c.create("evil", "say", SPOOF, id="s")
    assert c.wait("evil", "s", timeout_s=60)["status"] == "complete"
    wait_for(lambda: daemon.events("tenant.output", tenant="evil"), 30, "evil's output logged")
    out = daemon.cli("logs", "--tenant", "evil")
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\r" not in out.stdout and "\u202e" not in out.stdout
    mine = [line for line in out.stdout.splitlines() if "stdout:" in line]
    # print() wrote two lines: each is shown as evil's, its escapes visible
    assert len(mine) == 2 and all("evil/s#" in line for line in mine)
    assert "stdout: \\x1b[2K\\rglobex/x#1  [pay] stdout: paid in full" in mine[0]
    assert "\\u202edone" in mine[1]
    assert not any(line.lstrip().startswith("globex") for line in out.stdout.splitlines())
