"""sandbox_host.zygote's command line: what the supervisor passes, and clear refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sandbox_host.zygote import Arguments, parse_arguments


def test_the_supervisors_command_line() -> None:
    assert parse_arguments(["--ppid", "7", "--control-fd", "5", "--spares", "3"]) == Arguments(
        ppid=7, control_fd=5, spares=3
    )
    assert parse_arguments(["--control-fd", "5", "--ppid", "7"]).spares == 2


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--ppid", "7"], "--ppid and --control-fd are required"),
        (["--ppid", "7", "--control-fd"], "an option without its value: --control-fd"),
        (["--ppid", "x", "--control-fd", "5"], "--ppid takes an integer, not 'x'"),
        (["--ppid", "7", "--control-fd", "5", "--help", "1"], "unknown or repeated option"),
        (["--ppid", "7", "--ppid", "8", "--control-fd", "5"], "unknown or repeated option"),
    ],
)
def test_bad_command_lines_are_refused_with_the_usage(argv: list[str], why: str) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_arguments(argv)
    assert str(exc.value).startswith("usage: python -I -m sandbox_host.zygote")
    assert why in str(exc.value)


def test_the_fork_server_does_not_load_what_it_never_uses() -> None:
    """Every module it imports is mapped into every activation: shutil (through argparse's
    help formatter) brought bz2, lzma and zlib."""
    unused = ("argparse", "shutil", "bz2", "lzma", "zlib")
    code = f"import sys, sandbox_host.zygote; print([m for m in {unused!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
