"""Activation cgroups kept for a tenant's next activations: reused only empty, never by two
activations at once, never across tenants, and an OOM kill in one never counts against the next
activation that uses it. Real cgroups, real processes (root and cgroups needed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import isolation
from supervisor.config import Limits


@pytest.fixture
def cgroups(tmp_short: Path) -> Iterator[isolation.Cgroups]:
    found, why = isolation.Cgroups.detect(tmp_short / "state")
    if found is None:
        pytest.skip(f"no cgroups here: {why}")
    yield found
    found.close()


def join_and_run(procs: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter that first puts itself in the given cgroups."""
    prologue = f"import os\nfor p in {procs!r}:\n    open(p, 'w').write(str(os.getpid()))\n"
    return subprocess.run(
        [sys.executable, "-c", prologue + textwrap.dedent(code)], capture_output=True, text=True
    )


def test_an_oom_kill_is_the_activations_own_not_the_next_ones(
    cgroups: isolation.Cgroups,
) -> None:
    assert cgroups.tenant("acme", Limits(memory_mib=64)) == []
    procs = cgroups.prepare("acme", 1)
    hog = join_and_run(
        procs,
        """
        block = bytearray(256 * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1
        """,
    )
    assert hog.returncode == -9  # the kernel's OOM killer: SIGKILL
    assert cgroups.kill("acme", 1)  # an OOM kill

    again = cgroups.prepare("acme", 2)
    assert again == procs  # the same cgroup, kept empty for the tenant's next activation
    killed = join_and_run(again, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert killed.returncode == -9
    assert not cgroups.kill("acme", 2)  # a SIGKILL, not an OOM kill: counted from reuse


def test_kept_cgroups_are_one_activations_at_a_time_and_one_tenants(
    cgroups: isolation.Cgroups,
) -> None:
    cgroups.tenant("acme", Limits())
    cgroups.tenant("globex", Limits())
    first, second = cgroups.prepare("acme", 1), cgroups.prepare("acme", 2)
    assert first != second  # running at once: never the same cgroup
    assert not cgroups.kill("acme", 1)
    assert not cgroups.kill("acme", 1)  # a second kill (reap, then leftovers): a no-op
    assert cgroups.free["acme"] == [first[0].split("/")[-2]]  # kept once, not twice
    assert cgroups.prepare("globex", 3) not in (first, second)  # never another tenant's
    assert cgroups.prepare("acme", 4) == first


def test_a_cgroup_with_a_straggler_is_emptied_before_it_is_kept(
    cgroups: isolation.Cgroups,
) -> None:
    cgroups.tenant("acme", Limits())
    procs = cgroups.prepare("acme", 1)
    straggler = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, time\n"
            f"for p in {procs!r}:\n    open(p, 'w').write(str(os.getpid()))\n"
            "print('in', flush=True)\ntime.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert straggler.stdout is not None and straggler.stdout.readline() == "in\n"
    cgroups.kill("acme", 1)  # what an activation left behind (a double fork, say) dies here
    assert straggler.wait(timeout=10) == -9
    for p in cgroups.prepare("acme", 2):
        assert Path(p).read_text() == ""
