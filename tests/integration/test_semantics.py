"""Workflow semantics end to end: real supervisor, real activation processes, real journal."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from tests.conftest import Daemon, deploy_source, wait_for, wait_gone, writable


def run(
    daemon: Daemon,
    source: str,
    params: object = None,
    *,
    tenant: str = "acme",
    workflow: str = "w",
    iid: str = "i1",
    timeout_s: float = 60,
) -> dict:
    c = daemon.client()
    deploy_source(c, tenant, source)
    c.create(tenant, workflow, params, id=iid)
    return c.wait(tenant, iid, timeout_s=timeout_s)


def history(daemon: Daemon, iid: str = "i1", tenant: str = "acme") -> dict:
    return daemon.client().history(tenant, iid)


def test_retries_with_backoff_and_ctx_attempt(daemon: Daemon) -> None:
    st = run(
        daemon,
        """
        from stepvisor import workflow

        def flaky(ctx):
            if ctx.attempt < 3:
                raise ConnectionError(f"attempt {ctx.attempt} failed")
            return {"attempt": ctx.attempt}

        @workflow("w")
        def w(event, step):
            return step.do("flaky", flaky,
                           retries={"limit": 4, "delay": 0.05, "backoff": "exponential"})
    """,
    )
    assert st["status"] == "complete"
    assert st["output"] == {"attempt": 3}
    (entry,) = history(daemon)["entries"]
    assert (entry["status"], entry["attempts"]) == ("ok", 3)
    assert st["activations"] == 3 + 1  # three attempts, one to return


def test_exhausted_retries_raise_catchable_step_failed(daemon: Daemon) -> None:
    st = run(
        daemon,
        """
        from stepvisor import StepFailed, workflow

        def always_fails():
            raise KeyError("missing")

        @workflow("w")
        def w(event, step):
            try:
                step.do("doomed", always_fails, retries={"limit": 2, "delay": 0})
            except StepFailed as exc:
                return {"caught": exc.error_type, "step": exc.step}
    """,
    )
    assert st["output"] == {"caught": "KeyError", "step": "doomed"}
    (entry,) = history(daemon)["entries"]
    assert (entry["status"], entry["attempts"]) == ("error", 3)  # limit 2 = 1 try + 2 retries
    assert entry["error"]["type"] == "KeyError"


def test_non_retryable_error_fails_at_once(daemon: Daemon) -> None:
    st = run(
        daemon,
        """
        from stepvisor import NonRetryableError, workflow

        @workflow("w")
        def w(event, step):
            step.do("charge", lambda: (_ for _ in ()).throw(NonRetryableError("card declined")),
                    retries={"limit": 5, "delay": 0})
    """,
    )
    assert st["status"] == "errored"
    assert st["error"]["type"] == "StepFailed"
    assert "card declined" in st["error"]["message"]
    (entry,) = history(daemon)["entries"]
    assert entry["attempts"] == 1


def test_uncaught_error_keeps_tenant_traceback_with_source_lines(daemon: Daemon) -> None:
    st = run(
        daemon,
        """
        from stepvisor import workflow

        @workflow("w")
        def w(event, step):
            n = step.do("count", lambda: 41)
            if n == 41:
                raise ValueError(f"unexpected count {n}")
    """,
    )
    assert st["status"] == "errored"
    err = st["error"]
    assert (err["type"], err["message"]) == ("ValueError", "unexpected count 41")
    assert '<acme>/wf.py", line 8, in w' in err["traceback"]
    assert 'raise ValueError(f"unexpected count {n}")' in err["traceback"]
    assert "sandbox_host" not in err["traceback"]


def test_sleep_leaves_no_process_and_resumes(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(
        c,
        "acme",
        """
        import time
        from stepvisor import workflow

        @workflow("w")
        def w(event, step):
            step.sleep("nap", 1.5)
            step.sleep_until("until", time.time() + 0.3)   # only evaluated on the first run
            return "rested"
    """,
    )
    c.create("acme", "w", id="i1")
    wait_for(lambda: c.status("acme", "i1")["status"] == "waiting", 30, "instance to sleep")

    def activations_alive() -> list[psutil.Process]:
        return [
            p
            for p in psutil.process_iter(["cmdline"])
            if str(daemon.run_dir) in " ".join(p.info["cmdline"] or [])
        ]

    # The activation that journaled the sleep exits right after its ack; then nothing runs.
    wait_for(lambda: not activations_alive(), 1.0, "the sleeping instance to have no process")
    assert c.status("acme", "i1")["status"] == "waiting"
    st = c.wait("acme", "i1", timeout_s=30)
    assert st["output"] == "rested"
    kinds = [(e["kind"], e["name"], e["status"]) for e in c.history("acme", "i1")["entries"]]
    assert kinds == [("sleep", "nap", "ok"), ("sleep", "until", "ok")]


def test_events_are_buffered_fifo_per_type(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(
        c,
        "acme",
        """
        from stepvisor import workflow

        @workflow("w")
        def w(event, step):
            step.sleep("let events pile up", 0.5)
            got = [step.wait_for_event(f"w{i}", type=t, timeout=30)["payload"]
                   for i, t in enumerate(["x", "x", "y"])]
            return got
    """,
    )
    c.create("acme", "w", id="i1")
    c.send_event("acme", "i1", "y", "why")
    c.send_event("acme", "i1", "x", 1)
    c.send_event("acme", "i1", "x", 2)
    st = c.wait("acme", "i1", timeout_s=30)
    assert st["output"] == [1, 2, "why"]
    e = c.history("acme", "i1")["entries"][1]
    assert e["result"]["type"] == "x" and e["result"]["timestamp"]


def test_event_wakes_a_waiting_instance(daemon: Daemon) -> None:
    c = daemon.client()
    deploy_source(
        c,
        "acme",
        """
        from stepvisor import workflow

        @workflow("w")
        def w(event, step):
            ev = step.wait_for_event("approval", type="approved", timeout="1 hour")
            return ev["payload"]
    """,
    )
    c.create("acme", "w", id="i1")
    wait_for(lambda: c.status("acme", "i1")["status"] == "waiting", 30, "instance to wait")
    assert c.send_event("acme", "i1", "other", 1)["delivered"] is False
    assert c.send_event("acme", "i1", "approved", {"by": "ann"})["delivered"] is True
    assert c.wait("acme", "i1", timeout_s=30)["output"] == {"by": "ann"}


def test_wait_timeout_raises_inside_workflow(daemon: Daemon) -> None:
    st = run(
        daemon,
        """
        from stepvisor import WaitTimeout, workflow

        @workflow("w")
        def w(event, step):
            try:
                step.wait_for_event("approval", type="approved", timeout=0.3)
            except WaitTimeout as exc:
                return f"timed out waiting for {exc.event_type}"
    """,
    )
    assert st["output"] == "timed out waiting for approved"
    (entry,) = history(daemon)["entries"]
    assert entry["status"] == "timeout"


def test_nondeterminism_is_detected_and_named(daemon: Daemon) -> None:
    st = run(
        daemon,
        """
        import random
        from stepvisor import workflow

        @workflow("w")
        def w(event, step):
            step.do(f"pick-{random.random()}", lambda: 1)   # a different name on every replay
            return "unreachable"
    """,
    )
    assert st["status"] == "errored"
    assert st["error"]["code"] == "NONDETERMINISM"
    assert "pick-" in st["error"]["message"] and "seq 0" in st["error"]["message"]


def test_event_fields_and_params(daemon: Daemon) -> None:
    st = run(
        daemon,
        """
        from stepvisor import workflow

        @workflow("w")
        def w(event, step):
            return {"payload": event.payload, "id": event.instance_id,
                    "ts": event.timestamp.isoformat()}
    """,
        {"email": "a@b.c"},
        iid="order-7",
    )
    assert st["output"]["payload"] == {"email": "a@b.c"}
    assert st["output"]["id"] == "order-7"
    assert st["output"]["ts"].startswith(st["created_at"][:19])


def test_replayed_output_is_logged_once(daemon: Daemon) -> None:
    st = run(
        daemon,
        """
        from stepvisor import workflow

        @workflow("w")
        def w(event, step):
            print("body starts")
            for i in range(3):
                step.do(f"s{i}", lambda i=i: print(f"inside step {i}") or i)
            print("body ends")
            return "done"
    """,
    )
    assert st["status"] == "complete"
    lines = [e["line"] for e in daemon.events("tenant.output", instance="i1")]
    assert sorted(lines) == sorted(
        ["body starts", "inside step 0", "inside step 1", "inside step 2", "body ends"]
    )
    (step1,) = daemon.events("tenant.output", instance="i1", line="inside step 1")
    assert step1["step"] == "s1" and step1["tenant"] == "acme"


def test_a_log_handler_made_at_import_logs_the_new_steps_once(daemon: Daemon) -> None:
    # The module runs again on every replay, with output muted: a handler it makes then must
    # still reach the supervisor once the new step runs.
    st = run(
        daemon,
        """
        import logging, sys
        from stepvisor import workflow

        log = logging.getLogger("tenant")
        log.addHandler(logging.StreamHandler(sys.stderr))
        log.setLevel(logging.INFO)

        @workflow("w")
        def w(event, step):
            for i in range(3):
                step.do(f"s{i}", lambda i=i: log.info("logged by step %d", i) or i)
            return "done"
    """,
    )
    assert st["status"] == "complete"
    lines = [e["line"] for e in daemon.events("tenant.output", instance="i1")]
    assert sorted(lines) == ["logged by step 0", "logged by step 1", "logged by step 2"]


def test_code_is_pinned_per_instance(daemon: Daemon) -> None:
    c = daemon.client()
    v1 = deploy_source(
        c,
        "acme",
        """
        from stepvisor import workflow

        @workflow("w")
        def w(event, step):
            step.sleep("pause", 1)
            return "v1"
    """,
    )["version"]
    c.create("acme", "w", id="old")
    v2 = deploy_source(
        c,
        "acme",
        """
        from stepvisor import workflow

        @workflow("w")
        def w(event, step):
            step.sleep("pause", 0)
            return "v2"
    """,
    )["version"]
    c.create("acme", "w", id="new")
    assert v1 != v2
    assert c.wait("acme", "old", timeout_s=30)["output"] == "v1"
    assert c.wait("acme", "new", timeout_s=30)["output"] == "v2"
    assert c.status("acme", "old")["version"] == v1


def test_step_timeout_kills_the_whole_process_group(make_daemon, shared: Path) -> None:
    daemon = make_daemon(writable(shared))
    pidfile = shared / "grandchild.pid"
    st = run(
        daemon,
        """
        import subprocess, time
        from stepvisor import workflow

        def slow(path):
            child = subprocess.Popen(["sleep", "300"])
            open(path, "w").write(str(child.pid))
            time.sleep(300)

        @workflow("w")
        def w(event, step):
            step.do("slow", lambda: slow(event.payload), timeout=1, retries={"limit": 0})
    """,
        str(pidfile),
    )
    assert st["status"] == "errored"
    (entry,) = history(daemon)["entries"]
    assert entry["error"]["type"] == "StepTimeout"
    outcomes = [a["outcome"] for a in history(daemon)["activations"]]
    assert outcomes[0] == "wall_timeout"
    grandchild = int(pidfile.read_text())
    wait_gone(grandchild, 10, "the step's grandchild to be killed")


@pytest.mark.parametrize(
    ("body", "tenant_cfg", "outcome", "error_type"),
    [
        ("while True: pass", "cpu_seconds = 1", "cpu_limit", "CpuLimitExceeded"),
        ("bytearray(1 << 30)", "memory_mib = 128", "oom", "MemoryError"),
        ("import ctypes; ctypes.string_at(0)", "", "signalled(SIGSEGV)", "ActivationCrashed"),
        ("import os; os._exit(9)", "", "crashed", "ActivationCrashed"),
    ],
    ids=["cpu", "oom", "segfault", "exit"],
)
def test_crashes_are_classified_and_count_as_attempts(
    make_daemon, body: str, tenant_cfg: str, outcome: str, error_type: str
) -> None:
    daemon = make_daemon(f"[tenants.acme]\n{tenant_cfg}\n")
    st = run(
        daemon,
        f"""
        from stepvisor import workflow

        def bad():
            {body}

        @workflow("w")
        def w(event, step):
            step.do("bad", bad, retries={{"limit": 1, "delay": 0}})
    """,
    )
    assert st["status"] == "errored"
    h = history(daemon)
    (entry,) = h["entries"]
    assert (entry["status"], entry["attempts"]) == ("error", 2)  # the crash counted, then retried
    assert entry["error"]["type"] == error_type
    assert [a["outcome"] for a in h["activations"][:2]] == [outcome, outcome]
    assert daemon.alive()


def test_crash_before_any_step_errors_after_bounded_failures(make_daemon) -> None:
    daemon = make_daemon("[tenants.acme]\nmax_activation_failures = 2\n")
    st = run(
        daemon,
        """
        import os
        from stepvisor import workflow

        @workflow("w")
        def w(event, step):
            os._exit(3)
    """,
    )
    assert st["status"] == "errored"
    assert st["error"]["type"] == "ActivationFailed"
    assert "2 activations" in st["error"]["message"]
    assert st["activations"] == 2


def test_long_running_time_is_not_spent_in_the_supervisor(daemon: Daemon) -> None:
    """Another tenant progresses while one tenant's step is busy for seconds."""
    c = daemon.client()
    deploy_source(
        c,
        "slow",
        """
        import time
        from stepvisor import workflow

        @workflow("w")
        def w(event, step):
            step.do("busy", lambda: time.sleep(3))
    """,
    )
    deploy_source(
        c,
        "fast",
        """
        from stepvisor import workflow

        @workflow("w")
        def w(event, step):
            return step.do("quick", lambda: 1)
    """,
    )
    c.create("slow", "w", id="s")
    wait_for(lambda: c.history("slow", "s")["entries"], 30, "the slow step to start")
    c.create("fast", "w", id="f")
    assert c.wait("fast", "f", timeout_s=30)["output"] == 1
    assert c.history("slow", "s")["entries"][0]["status"] == "running"  # still in its step


def test_a_step_leaves_no_background_process_behind(make_daemon, shared: Path) -> None:
    daemon = make_daemon(writable(shared))
    pidfile = shared / "background.pid"
    st = run(
        daemon,
        """
        import subprocess
        from stepvisor import workflow

        def start_background(path):
            child = subprocess.Popen(["sleep", "300"])
            open(path, "w").write(str(child.pid))
            return child.pid

        @workflow("w")
        def w(event, step):
            return step.do("fire and forget", lambda: start_background(event.payload))
        """,
        str(pidfile),
    )
    assert st["status"] == "complete"
    orphan = int(pidfile.read_text())
    wait_for(
        lambda: (
            not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE
        ),
        10,
        "the step's background process to be killed with its activation",
    )
