"""Sibling forks (clone with CLONE_PARENT), as the nursery makes spares: the child belongs to
the caller's parent from birth and behaves as a child of os.fork would, in the ways a step may
rely on (its own thread id for signals, forking again, threads, imports)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from sandbox_host import sibling

# Run as our child C: C forks a sibling S (our child too) that reports on itself.
CHILD = """
import json, os, signal, sys, threading
from sandbox_host import sibling

fork = sibling.probe()
if fork is None:
    print(json.dumps(None)); sys.exit(0)
r, w = os.pipe()
pid = fork.fork()
if pid == 0:
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append("raise"))
    signal.raise_signal(signal.SIGUSR1)  # raise() signals the thread id the C library holds
    t = threading.Thread(target=lambda: got.append("thread")); t.start(); t.join()
    grandchild = os.fork()
    if grandchild == 0:
        os._exit(7)
    _, status = os.waitpid(grandchild, 0)
    import decimal  # an import after the fork: the import lock was reset
    report = {"pid": os.getpid(), "ppid": os.getppid(), "tid": threading.get_native_id(),
              "got": got, "grandchild": os.waitstatus_to_exitcode(status)}
    os.write(w, json.dumps(report).encode()); os._exit(0)
os.close(w)
with os.fdopen(r) as f:
    print(json.dumps({"clone_pid": pid, "me": os.getpid(), "report": json.loads(f.read())}))
"""


# Our child P: runs C, then reaps whatever became its children (C's siblings) and reports.
PARENT = """
import json, os, subprocess, sys
c = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True)
reaped = {}
while True:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    reaped[pid] = os.waitstatus_to_exitcode(status)
print(json.dumps({"me": os.getpid(), "rc": c.returncode, "stderr": c.stderr,
                  "child": json.loads(c.stdout or "null"), "reaped": reaped}))
"""


def test_a_sibling_is_the_callers_parents_child_and_a_whole_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PARENT), textwrap.dedent(CHILD)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["rc"] == 0, out["stderr"]
    if out["child"] is None:
        pytest.skip("sibling forks are unavailable on this host (machine or C library)")
    report = out["child"]["report"]
    assert report["pid"] == out["child"]["clone_pid"] != out["child"]["me"]
    assert report["ppid"] == out["me"]  # the caller's parent's child, not the caller's
    assert report["tid"] == report["pid"]
    assert report["got"] == ["raise", "thread"]
    assert report["grandchild"] == 7
    # The caller's parent reaped it (and the probe's own check), both exited cleanly.
    assert out["reaped"][str(report["pid"])] == 0
    assert set(out["reaped"].values()) == {0}


def test_probe_refuses_a_process_with_threads() -> None:
    import threading

    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert sibling.probe() is None
    finally:
        stop.set()
        t.join()
