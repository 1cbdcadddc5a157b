"""Deleting activations' scratch dirs without holding up the loop.

A tenant decides how many files its scratch holds, and deleting a hundred thousand of them takes
the loop seconds that belong to every tenant. A scratch dir of a few entries is deleted at once;
a larger one is renamed into a trash dir on the same file system (one rename, however large) and
one `rm -rf` child at a time empties the trash while the loop goes on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

INLINE_ENTRIES = 64  # a scratch dir with at most this many entries is deleted in the loop
TRASH = ".trash"  # beside the tenant's activation dirs: the same file system (its tmpfs)
BATCH = 256  # trash entries one `rm` is given


class Janitor:
    def __init__(self) -> None:
        self.rm = shutil.which("rm", path="/usr/bin:/bin")
        self.proc: subprocess.Popen[bytes] | None = None
        self.trash: set[Path] = set()  # trash dirs that may hold something

    def remove(self, scratch: str, entries: int) -> None:
        """Delete an exited activation's scratch dir; `entries` is how many it was seen with."""
        if entries == 0:
            try:
                os.rmdir(scratch)  # the usual case, and one syscall where rmtree makes several
                return
            except FileNotFoundError:
                return
            except OSError:
                pass  # something appeared since it was measured: remove it all
        if entries <= INLINE_ENTRIES or self.rm is None:
            shutil.rmtree(scratch, ignore_errors=True)
            return
        path = Path(scratch)
        trash = path.parent / TRASH
        try:
            trash.mkdir(mode=0o700, exist_ok=True)
            os.rename(path, trash / path.name)
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)
            return
        self.trash.add(trash)

    def tick(self) -> None:
        """Start the next `rm` once the last one is done and something waits in a trash dir."""
        if self.proc is not None:
            if self.proc.poll() is None:
                return
            self.proc = None
        if not self.trash or self.rm is None:
            return
        batch: list[str] = []
        for trash in list(self.trash):
            try:
                with os.scandir(trash) as it:
                    batch += [e.path for _, e in zip(range(BATCH - len(batch)), it, strict=False)]
            except OSError:
                pass
            if len(batch) < BATCH:  # emptied by this batch, as far as we know
                self.trash.discard(trash)
            if len(batch) >= BATCH:
                break
        if batch:
            # rm never follows a symlink and stays on the trash's file system.
            self.proc = subprocess.Popen(
                [self.rm, "-rf", "--one-file-system", "--", *batch],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
            )
