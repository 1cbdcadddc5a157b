"""Per-tenant scratch space with a size bound: one tmpfs per tenant (root only), holding the
scratch dir of each of the tenant's activations.

RLIMIT_FSIZE bounds one file, not how many: without this, a step fills the runtime dir's disk.
A tmpfs of `disk_mib` per tenant bounds all its activations' scratch together (ENOSPC, "No space
left on device"), and it is gone, contents and all, when unmounted.

Its pages are memory: the kernel charges them to the memory cgroup of the process that wrote
them (v1 and v2), so a tenant's scratch and its processes share its `memory_mib`. A page stays
charged until its file is deleted, which is when the activation's scratch is removed at reap.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MNT_DETACH = 0x2
MEASURE_MAX_ENTRIES = 1_000  # a scratch dir with more is measured in part (a lower bound)


class DiskError(OSError):
    """A tenant's scratch tmpfs could not be mounted or resized; the message says why."""


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def mount_tmpfs(target: Path, size_mib: int, *, remount: bool = False) -> None:
    """mount(2) a tmpfs of `size_mib` at `target` (or resize the one there): no device files,
    no set-uid; root dir 0711 so sandbox uids reach their own scratch dir and list nothing."""
    flags = MS_NOSUID | MS_NODEV | (MS_REMOUNT if remount else 0)
    data = f"size={size_mib}m,mode=0711".encode()
    if _libc().mount(b"stepvisor", str(target).encode(), b"tmpfs", flags, data) != 0:
        err = ctypes.get_errno()
        what = "resize" if remount else "mount"
        raise DiskError(f"cannot {what} a {size_mib} MiB tmpfs at {target}: {os.strerror(err)}")


def unmount(target: Path) -> None:
    """Detach the mount at `target`; the kernel frees it once nothing uses it any more."""
    if _libc().umount2(str(target).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise DiskError(f"cannot unmount {target}: {os.strerror(err)}")


def mounts_under(root: Path) -> list[Path]:
    """Mount points strictly below `root` (from /proc/self/mountinfo), deepest first."""
    found = []
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # field 5 is the mount point, with space, tab, newline and backslash octal-escaped
            point = line.split(" ")[4].encode().decode("unicode_escape")
            if point.startswith(prefix):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def scratch_bytes(scratch: str) -> tuple[int, int]:
    """Bytes the files under `scratch` occupy (allocated blocks, each inode once) and how many
    entries were seen, walking at most MEASURE_MAX_ENTRIES so a tenant's million empty files
    cost us little."""
    total, seen, entries = 0, set(), 0
    stack: list[str] = [scratch]
    while stack and entries < MEASURE_MAX_ENTRIES:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    entries += 1
                    if entries > MEASURE_MAX_ENTRIES:
                        break
                    st = entry.stat(follow_symlinks=False)
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    if st.st_ino not in seen:
                        seen.add(st.st_ino)
                        total += st.st_blocks * 512
        except OSError:
            continue  # vanished or unreadable: count what we can
    return total, entries


@dataclass
class ScratchSpace:
    """`<runtime_dir>/scratch/<tenant>/<activation>`; with `quota`, each tenant dir is a tmpfs
    of the tenant's `disk_mib`, mounted at its first launch and unmounted at `close`."""

    root: Path
    quota: bool
    mounted: dict[str, int] = field(default_factory=dict)  # tenant → its tmpfs size, MiB
    refused: dict[str, int] = field(default_factory=dict)  # tenant → a size it would not take
    prepared: dict[str, int] = field(default_factory=dict)  # tenant → disk_mib its dir is ready for

    def tenant_dir(self, tenant: str) -> Path:
        return self.root / tenant

    def prepare(self, tenant: str, disk_mib: int) -> str | None:
        """Make the tenant's scratch dir, mounting its tmpfs at its first launch (DiskError when
        that fails: the launch fails). A changed `disk_mib` (a reload) resizes it; a size below
        what it holds now is refused: returns why, once per new size, and the old size stays
        until a later launch resizes it. Every launch asks: after the first, it costs a lookup."""
        if self.prepared.get(tenant) == disk_mib:
            return None
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        target = self.tenant_dir(tenant)
        target.mkdir(exist_ok=True, mode=0o711)
        if not self.quota or self.mounted.get(tenant) == disk_mib:
            self.prepared[tenant] = disk_mib
            return None
        if tenant not in self.mounted:
            mount_tmpfs(target, disk_mib)
        else:
            try:
                mount_tmpfs(target, disk_mib, remount=True)
            except DiskError as exc:
                first = self.refused.get(tenant) != disk_mib
                self.refused[tenant] = disk_mib
                return str(exc) if first else None
        self.mounted[tenant] = disk_mib
        self.refused.pop(tenant, None)
        self.prepared[tenant] = disk_mib
        return None

    def sweep(self) -> int:
        """Start-up: unmount what a dead supervisor left mounted here and delete leftover
        scratch dirs (only this supervisor's activations ever use this runtime dir)."""
        self.prepared.clear()
        stale = mounts_under(self.root) if self.root.exists() else []
        for point in stale:
            with contextlib.suppress(DiskError):
                unmount(point)
        if self.root.exists():
            for d in self.root.iterdir():
                if not os.path.ismount(d):
                    shutil.rmtree(d, ignore_errors=True)
        return len(stale)

    def close(self) -> None:
        """At shutdown, once every activation is reaped: unmount each tenant's tmpfs."""
        for tenant in list(self.mounted):
            with contextlib.suppress(DiskError):
                unmount(self.tenant_dir(tenant))
            with contextlib.suppress(OSError):
                self.tenant_dir(tenant).rmdir()
            del self.mounted[tenant]
        self.prepared.clear()


def probe() -> str | None:
    """Why this host cannot give tenants a tmpfs each (say, no CAP_SYS_ADMIN in a container),
    or None: mounts and unmounts a 1 MiB one on a fresh temporary dir."""
    target = Path(tempfile.mkdtemp(prefix="stepvisor-disk-probe-"))
    try:
        mount_tmpfs(target, 1)
        unmount(target)
    except DiskError as exc:
        return str(exc)
    finally:
        with contextlib.suppress(OSError):
            target.rmdir()
    return None
