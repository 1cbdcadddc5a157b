"""The test harness journals what a real supervisor journals, entry for entry, for generated
workflows: steps that fail and retry (or fail for good and are caught), sleeps, and waits for
events that come or time out."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepvisor.testing import WorkflowEnv, WorkflowFailed
from tests.conftest import Daemon

HEADER = "from stepvisor import workflow, NonRetryableError, StepFailed, WaitTimeout\n"

steps = st.tuples(
    st.just("step"),
    st.integers(0, 3),  # attempts that fail
    st.integers(0, 2),  # retries allowed
    st.booleans(),  # fails non-retryably
)
sleeps = st.tuples(st.just("sleep"), st.sampled_from([0, 0.05, 0.2]))
waits = st.tuples(st.just("wait"), st.sampled_from(["a", "b"]), st.booleans())  # type, sent
commands = st.lists(st.one_of(steps, sleeps, waits), min_size=1, max_size=6)
_ids = itertools.count()


def source_of(cmds: list[tuple[Any, ...]], returns: bool) -> str:
    lines = [HEADER, '@workflow("w")', "def w(event, step):", "    out = []"]
    for i, cmd in enumerate(cmds):
        name = f"c{i}"
        if cmd[0] == "step":
            _, fails, limit, final = cmd
            error = "NonRetryableError" if final else "ValueError"
            lines += [
                f"    def s{i}(ctx):",
                f"        if ctx.attempt <= {fails}:",
                f"            raise {error}(f'attempt {{ctx.attempt}} of {name}')",
                f"        return '{name}#' + str(ctx.attempt)",
                "    try:",
                f"        out.append(step.do({name!r}, s{i}, "
                f"retries={{'limit': {limit}, 'delay': 0, 'backoff': 'constant'}}))",
                "    except StepFailed as exc:",
                "        out.append(exc.error_type)",
            ]
        elif cmd[0] == "sleep":
            lines.append(f"    step.sleep({name!r}, {cmd[1]})")
        else:
            lines += [
                "    try:",
                f"        out.append(step.wait_for_event({name!r}, type={cmd[1]!r}, "
                "timeout=0.3)['payload'])",
                "    except WaitTimeout:",
                "        out.append('timeout')",
            ]
    lines.append("    return out" if returns else "    raise RuntimeError(repr(out))")
    return "\n".join(lines) + "\n"


def comparable(entries: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What both journal: everything but times (an event's timestamp is its arrival time)."""
    out = []
    for e in entries:
        result = e["result"]
        if e["kind"] == "wait_event" and isinstance(result, dict):
            result = {k: v for k, v in result.items() if k != "timestamp"}
        error = e["error"] and (e["error"]["type"], e["error"]["message"])
        failed = [(a["type"], a["message"]) for a in e["failed_attempts"]]
        out.append(
            (e["seq"], e["kind"], e["name"], e["status"], e["attempts"], result, error, failed)
        )
    return out


def harness_journal(source: str, events: list[tuple[str, Any]]) -> tuple[str, Any, list]:
    with WorkflowEnv.from_source(source) as env:
        run = env.start("w")
        for type_, payload in events:
            run.send_event(type_, payload)
        try:
            output = run.result()
        except WorkflowFailed as failed:
            output = failed.error and (failed.error.type, failed.error.message)
        entries = [
            {
                "seq": e.seq,
                "kind": e.kind,
                "name": e.name,
                "status": e.status,
                "attempts": e.attempts,
                "result": e.result,
                "error": e.error and {"type": e.error.type, "message": e.error.message},
                "failed_attempts": [
                    {"type": a.type, "message": a.message} for a in e.failed_attempts
                ],
            }
            for e in run.journal
        ]
        return run.status, output, comparable(entries)


def daemon_journal(daemon: Daemon, source: str, events: list[tuple[str, Any]]) -> tuple:
    c = daemon.client()
    c.deploy("parity", source, filename="workflows.py")
    iid = f"p{next(_ids)}"
    c.create("parity", "w", None, id=iid)
    for type_, payload in events:
        c.send_event("parity", iid, type_, payload)
    st_ = c.wait("parity", iid, timeout_s=60)
    h = c.history("parity", iid)
    entries = [
        dict(e, failed_attempts=[a["error"] for a in e["failed_attempts"]]) for e in h["entries"]
    ]
    output = (
        st_["output"]
        if st_["status"] == "complete"
        else (
            st_["error"]["type"],
            st_["error"]["message"],
        )
    )
    return st_["status"], output, comparable(entries)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(commands, st.booleans())
def test_the_harness_journals_what_the_supervisor_journals(
    daemon: Daemon, cmds: list[tuple[Any, ...]], returns: bool
) -> None:
    source = source_of(cmds, returns)
    # each wait whose event is sent gets it up front: buffered, it is consumed by the wait
    events = [(c[1], {"for": f"c{i}"}) for i, c in enumerate(cmds) if c[0] == "wait" and c[2]]
    assert harness_journal(source, events) == daemon_journal(daemon, source, events), source
