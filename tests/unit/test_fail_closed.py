"""The checks behind failing closed: private dirs, interpreters sandbox uids can run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from supervisor import config, isolation
from supervisor.dirs import UnsafeDir, ensure_private_dir

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="sandbox uids need root")


def test_a_new_dir_gets_its_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        ensure_private_dir(
            tmp_path / "a" / "run", 0o755, "server.runtime_dir", follow_symlink=False
        )
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "run").stat().st_mode & 0o7777 == 0o755


def test_an_existing_private_dir_of_ours_is_kept_as_it_is(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir(mode=0o711)
    d.chmod(0o711)
    ensure_private_dir(d, 0o700, "server.runtime_dir", follow_symlink=False)
    assert d.stat().st_mode & 0o7777 == 0o711


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775, 0o757])
def test_a_dir_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "run"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(UnsafeDir, match=f"may be written by group or others .*chmod go-w {d}"):
        ensure_private_dir(d, 0o700, "server.runtime_dir", follow_symlink=False)


def test_a_symlink_is_refused_unless_configured(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "run"
    link.symlink_to(target)
    with pytest.raises(UnsafeDir, match="is a symlink"):
        ensure_private_dir(link, 0o700, "server.runtime_dir", follow_symlink=False)
    ensure_private_dir(link, 0o700, "server.runtime_dir", follow_symlink=True)


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("")
    with pytest.raises(UnsafeDir, match="is not a directory"):
        ensure_private_dir(tmp_path / "run", 0o700, "server.state_dir", follow_symlink=True)


@root_only
def test_a_dir_of_another_uid_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    os.chown(d, 12345, 12345)
    with pytest.raises(UnsafeDir, match="belongs to uid 12345, not to this supervisor"):
        ensure_private_dir(d, 0o700, "server.state_dir", follow_symlink=True)


def _script(where: Path, mode: int) -> str:
    where.mkdir(mode=mode)
    where.chmod(mode)
    python = where / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return str(python)


def test_an_interpreter_in_a_private_dir_is_blocked(tmp_short: Path) -> None:
    assert isolation.interpreter_blocked(_script(tmp_short / "open", 0o755), ask=False) is None
    why = isolation.interpreter_blocked(_script(tmp_short / "private", 0o700), ask=False)
    assert why is not None and f"{tmp_short / 'private'} (mode 700)" in why


def test_asking_an_interpreter_finds_its_import_path(tmp_short: Path) -> None:
    paths = isolation.interpreter_paths(_script(tmp_short / "open", 0o755))
    assert sys.prefix in paths and sys.base_prefix in paths


@root_only
def test_tenant_interpreters_are_named_by_their_key(tmp_short: Path) -> None:
    private = _script(tmp_short / "private", 0o700)
    cfg = config.parse(
        f'[tenants.acme]\npython = "{private}"\n[tenants.globex]\npython = "{sys.executable}"\n'
    )
    (error,) = isolation.tenant_interpreter_errors(cfg)
    assert error.startswith(f"`tenants.acme.python`: the interpreter {private} is not usable")
    off = config.parse(f'[isolation]\nuid = "off"\n[tenants.acme]\npython = "{private}"\n')
    assert isolation.tenant_interpreter_errors(off) == []
