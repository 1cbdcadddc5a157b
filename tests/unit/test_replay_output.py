"""sandbox_host.runtime in-process: tenant output shows on a first run, not on replay."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.unit.runtime_harness import Outcome, failure_of, ok


@contextmanager
def fd_streams() -> Iterator[None]:
    """Point sys.stdout/sys.stderr at fds 1/2, as in a real activation.

    capfd points sys.stdout at its capture file directly, bypassing fd 1, and installs that only
    once the test body starts, so this is entered inside the test.
    """
    saved = sys.stdout, sys.stderr
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


PRINTS = """
import sys

@workflow("w")
def w(event, step):
    print("before a")
    print("err before a", file=sys.stderr)
    step.do("a", lambda: 1)
    print("after a")
    print("err after a", file=sys.stderr)
    step.do("b", lambda: 2)
    print("after b")
"""


def test_output_is_shown_on_the_first_run(
    activate: Callable[..., Outcome], capfd: pytest.CaptureFixture[str]
) -> None:
    with fd_streams():
        activate(PRINTS)
    out, err = capfd.readouterr()
    assert "before a" in out and "err before a" in err
    assert "after a" not in out  # the activation ended with step "a"


def test_output_of_replayed_code_is_suppressed(
    activate: Callable[..., Outcome], capfd: pytest.CaptureFixture[str]
) -> None:
    with fd_streams():
        activate(PRINTS, [ok(0, "a", 1)])
        out, err = capfd.readouterr()
        assert "before a" not in out and "err before a" not in err  # printed by the first run
        assert "after a" in out and "err after a" in err  # new in this activation
        assert "after b" not in out
        # the runtime gave fds 1 and 2 back
        print("still visible")
        print("still visible on stderr", file=sys.stderr)
    out, err = capfd.readouterr()
    assert "still visible" in out and "still visible on stderr" in err


def test_output_is_restored_when_replay_fails(
    activate: Callable[..., Outcome], capfd: pytest.CaptureFixture[str]
) -> None:
    with fd_streams():
        out = activate(
            """
            @workflow("w")
            def w(event, step):
                print("replaying")
                raise ValueError("mid-replay")
        """,
            [ok(0, "a", 1)],
        )
        print("after the failure")
    assert failure_of(out).type == "ValueError"
    captured = capfd.readouterr().out
    assert "replaying" not in captured
    assert "after the failure" in captured
