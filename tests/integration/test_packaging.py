"""What `pip install` of stepvisor builds: every module of every package in the wheel, and no
deprecation warning from our packaging."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("protocol", "supervisor", "sandbox_host", "stepvisor")


def test_the_wheel_holds_every_module_and_the_build_warns_of_nothing(tmp_path: Path) -> None:
    # A copy of what git tracks: a build dir left in the work tree must not fill in for a
    # package the configuration forgot.
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    src = tmp_path / "src"
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path / "wheel"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    said = built.stdout + built.stderr
    assert "eprecat" not in said, said
    [wheel] = out.glob("stepvisor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {n for n in tracked if n.endswith(".py") and n.startswith(PACKAGES)}
    assert modules - names == set()
