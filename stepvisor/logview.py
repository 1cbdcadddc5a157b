"""`stepvisor logs`: read (and follow) the supervisor's JSON log, filter it, render it for people.

The log is the supervisor's `log_file`, or its journal when it runs under systemd without one
(read through `journalctl`, whose `-o cat` gives back the same JSON lines). Tenant output is in
the same stream (`tenant.output`), attributed to its tenant, instance and step.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from stepvisor.render import visible

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
FOLLOW_POLL_S = 0.2  # how often a followed file is checked for new lines
_FIRST = ("outcome", "step")  # right after the event name; then the other fields by name
# In the line's prefix (or, for tenant output, its body) instead of as key=value:
_NOT_FIELDS = {"timestamp", "level", "tenant", "instance", "activation", "component", "event"}


@dataclass(frozen=True)
class Filter:
    tenant: str | None = None
    instance: str | None = None
    level: str = "debug"
    since: float | None = None  # epoch seconds

    def accepts(self, rec: dict[str, Any]) -> bool:
        if self.tenant is not None and rec.get("tenant") != self.tenant:
            return False
        if self.instance is not None and rec.get("instance") != self.instance:
            return False
        if LEVELS.get(str(rec.get("level")), 20) < LEVELS[self.level]:
            return False
        return self.since is None or _epoch(rec.get("timestamp")) >= self.since


def _epoch(stamp: Any) -> float:
    try:
        return dt.datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return 0.0


def parse(line: str) -> dict[str, Any] | None:
    """One log line as a record; None for a line that is not one of ours (say, a traceback
    printed before logging was set up)."""
    if not line.startswith("{"):
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def render(rec: dict[str, Any]) -> str:
    """`2026-11-25 14:13:29.112 info  acme/ann#12  activation.finished outcome=ok ...`

    One line, whatever the record holds: control and format characters in any of its strings
    (a tenant's output above all) come out escaped (`render.visible`), so a tenant cannot
    overwrite the line or fake one of another tenant's."""
    stamp = str(rec.get("timestamp", ""))[:23].replace("T", " ")
    who = ""
    if rec.get("tenant"):
        who = str(rec["tenant"]) + (f"/{rec['instance']}" if rec.get("instance") else "")
        who += f"#{rec['activation']}" if rec.get("activation") else ""
    if rec.get("event") == "tenant.output":
        step = f"[{rec['step']}] " if rec.get("step") else ""
        body = f"{step}{rec.get('stream', 'stdout')}: {rec.get('line', '')}"
    else:
        parts = [str(rec.get("event", "?"))]
        rest = sorted(k for k in rec if k not in _NOT_FIELDS and k not in _FIRST)
        for key in (*_FIRST, *rest):
            if rec.get(key) is not None:
                parts.append(f"{key}={_value(rec[key])}")
        body = " ".join(parts)
    return visible(f"{stamp:<23} {rec.get('level', '')!s:<7} {who}  {body}".rstrip())


def _value(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v) if (" " in v or not v) else v
    return json.dumps(v, separators=(",", ":"))


def _shown(line: str, flt: Filter, as_json: bool) -> str | None:
    """The line as shown, or None when filtered out. Raw lines (`--json`, or not a record)
    are escaped too: JSON escapes control characters but not, unless ASCII-only, bidi ones."""
    rec = parse(line)
    if rec is None:  # not ours: shown only when nothing is filtered
        return None if as_json or flt != Filter() else visible(line)
    if not flt.accepts(rec):
        return None
    return visible(line) if as_json else render(rec)


def _tail(lines: Iterator[str], flt: Filter, as_json: bool, keep: int | None) -> list[str]:
    """The last `keep` matching lines of what is there already (all of them with a `since`)."""
    out: deque[str] = deque(maxlen=None if flt.since is not None else keep)
    for line in lines:
        if (shown := _shown(line.rstrip("\n"), flt, as_json)) is not None:
            out.append(shown)
    return list(out)


def from_file(
    path: str, flt: Filter, *, as_json: bool, keep: int | None, follow: bool
) -> Iterator[str]:
    """Matching lines of the log file; with `follow`, then each new one as it is written. A file
    that is rotated (replaced or truncated) meanwhile is reopened from its start."""
    with open(path, errors="replace") as f:
        yield from _tail(f, flt, as_json, keep)
        if not follow:
            return
        partial = ""
        inode = os.fstat(f.fileno()).st_ino
        while True:
            chunk = f.read()
            if chunk:
                *done, partial = (partial + chunk).split("\n")
                yield from (s for line in done if (s := _shown(line, flt, as_json)) is not None)
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_ino != inode or st.st_size < f.tell()):
                f.close()
                f = open(path, errors="replace")  # noqa: SIM115 - reopened at each rotation
                inode, partial = os.fstat(f.fileno()).st_ino, ""
                continue
            time.sleep(FOLLOW_POLL_S)  # as tail -f: poll for growth


def from_journal(
    unit: str, flt: Filter, *, as_json: bool, keep: int | None, follow: bool
) -> Iterator[str]:
    """The same from systemd's journal: what is there, then (`follow`) from its cursor on."""
    journalctl = shutil.which("journalctl")
    if journalctl is None:
        raise OSError("the supervisor logs to the journal, but journalctl is not installed")
    cmd = [journalctl, "--unit", unit, "--output", "cat", "--no-pager", "--show-cursor"]
    if flt.since is not None:
        cmd.append(f"--since=@{int(flt.since)}")
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=True)
    lines = done.stdout.splitlines()
    cursor = ""
    if lines and lines[-1].startswith("-- cursor: "):
        cursor = lines.pop().removeprefix("-- cursor: ")
    yield from _tail(iter(lines), flt, as_json, keep)
    if not follow:
        return
    more = [journalctl, "--unit", unit, "--output", "cat", "--no-pager", "--follow"]
    more += [f"--after-cursor={cursor}"] if cursor else ["--lines=0"]
    proc = subprocess.Popen(more, stdout=subprocess.PIPE, text=True, errors="replace")
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if (shown := _shown(line.rstrip("\n"), flt, as_json)) is not None:
                yield shown
    finally:
        proc.terminate()
        proc.wait()
