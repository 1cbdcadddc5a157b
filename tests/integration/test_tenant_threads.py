"""Threads and forks in tenant steps behave as in any Python process. The fork server's nursery
skips the standard library's at-fork callbacks while it forks spares (`sandbox_host.fork_hooks`);
every activation must have them back, or a fork made by tenant code would leave the child with
the parent's other threads still listed as alive."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import Daemon, deploy_source

THREADS_AND_FORK = """
from stepvisor import workflow


def probe():
    import json, logging, os, threading

    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the step's own child, forked while `worker` runs
        seen = {"threads": threading.active_count(),
                "main": threading.current_thread() is threading.main_thread()}
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
        logging.getLogger("probe").warning("from the child")  # its locks were re-made
        seen["thread_in_child"] = not t.is_alive()
        os.write(w, json.dumps(seen).encode())
        os._exit(0)
    os.close(w)
    child = json.loads(os.read(r, 4096))
    os.waitpid(pid, 0)
    threads_here = threading.active_count()
    release.set()
    worker.join()
    return {"child": child, "threads_in_step": threads_here}


@workflow("threads")
def threads(event, step):
    return step.do("probe", probe, retries={"limit": 0})
"""


@pytest.mark.sqlite_only
def test_a_fork_in_a_step_runs_the_at_fork_callbacks(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(server='launch_mode = "fork"\n')
    with daemon.client(timeout_s=60) as c:
        deploy_source(c, "acme", THREADS_AND_FORK)
        c.create("acme", "threads", id="t1")
        st = c.wait("acme", "t1", timeout_s=60)
    assert st["status"] == "complete", st.get("error")
    assert st["output"] == {
        "child": {"threads": 1, "main": True, "thread_in_child": True},
        "threads_in_step": 2,
    }
