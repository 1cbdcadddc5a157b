"""The state and runtime directories: made private, or refused when someone else could tamper with
them. A runtime dir in a shared temp dir (no XDG_RUNTIME_DIR) may have been made by another user
before us, to swap our sockets or read what we put there; like ssh-agent and tmux, we refuse a
directory that is not ours or that others may write in."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafeDir(Exception):
    """The directory cannot be used safely; the message names it and the fix."""


def ensure_private_dir(path: Path, mode: int, key: str, *, follow_symlink: bool) -> None:
    """Create `path` with `mode`, or accept the one there only if it is a directory owned by our
    euid that neither group nor others may write. mkdir then lstat: no window in which a
    directory (or a symlink) someone else put there is taken for ours. `follow_symlink` allows a
    configured path to be a symlink to such a directory; a default path in a shared temp dir
    may not be one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=mode)
        created = True
    except FileExistsError:
        created = False
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        if not follow_symlink:
            raise UnsafeDir(
                f"{key} {path} is a symlink, which anyone could have put there: "
                f"remove it, or set {key} to a directory of your own"
            )
        st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDir(f"{key} {path} is not a directory: remove it, or set another {key}")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise UnsafeDir(
            f"{key} {path} belongs to uid {st.st_uid}, not to this supervisor (uid {euid}), "
            f"who could tamper with what it holds: remove it, or set {key} to a directory "
            "of your own"
        )
    if created:
        os.chmod(path, mode)  # the umask may have taken bits the sandbox uids need
    elif st.st_mode & 0o022:
        raise UnsafeDir(
            f"{key} {path} may be written by group or others (mode {st.st_mode & 0o7777:o}): "
            f"chmod go-w {path}, or set {key} to a private directory"
        )
