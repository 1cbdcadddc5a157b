"""`doctor`'s word on how fast a process joins a cgroup: fast with favordynmods on any cgroup
mount, otherwise the remount to run, keeping the flags the mount has (a remount sets exactly
the flags it is given: leaving out nsdelegate would drop it)."""

from __future__ import annotations

import pytest

from supervisor.isolation import cgroup_moves

V2_SYSTEMD = (
    "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,"
    "memory_recursiveprot 0 0\n"
)
HYBRID = "cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0\n"
FEATURES = "nsdelegate\nfavordynmods\nmemory_localevents\n"


@pytest.mark.parametrize(
    ("mounts", "features", "said"),
    [
        (
            V2_SYSTEMD.replace("memory_recursiveprot", "memory_recursiveprot,favordynmods"),
            FEATURES,
            "fast (favordynmods on /sys/fs/cgroup)",
        ),
        (
            HYBRID + "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime,favordynmods 0 0\n",
            FEATURES,
            "fast (favordynmods on /sys/fs/cgroup/unified)",
        ),
        (
            V2_SYSTEMD,
            FEATURES,
            "mount -o remount,nosuid,nodev,noexec,nsdelegate,memory_recursiveprot,favordynmods"
            " /sys/fs/cgroup",
        ),
        (
            HYBRID + "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n",
            FEATURES,
            "mount -o remount,favordynmods /sys/fs/cgroup/unified",
        ),
        (HYBRID, FEATURES, "no cgroup2 mount to set favordynmods on"),
        (V2_SYSTEMD, "nsdelegate\n", "this kernel has no favordynmods"),
    ],
)
def test_cgroup_moves_says_fast_or_how_to_make_it_so(mounts: str, features: str, said: str) -> None:
    assert said in cgroup_moves(mounts, features)


def test_this_hosts_answer_is_one_of_them() -> None:
    answer = cgroup_moves()
    assert answer.startswith(("fast (favordynmods on ", "slow path"))
