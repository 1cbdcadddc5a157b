"""Human renderings for the operator commands (`stats`, `usage`) and their time arguments."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from typing import Any

from protocol.messages import USAGE_FIELDS

_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible(text: str) -> str:
    """`text` with every character a terminal would act on instead of show escaped visibly:
    ESC and the other C0 and C1 controls, DEL, carriage return and newline (`\\x1b`, `\\r`,
    `\\n`), bidi overrides and other format characters (`\\u202e`), line separators.

    Tenant strings (output lines, step and workflow names, error messages) go through this
    before they reach an operator's terminal, so they cannot move the cursor, recolour or
    overwrite what is shown, or fake a line of another tenant. What is escaped is what Python
    does not call printable (categories C* and Z* but the space); backslashes are kept as they
    are, so a tenant can print the text `\\x1b`, which is harmless."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    if ch in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[ch]
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float) -> float:
    """`90s`, `30m`, `24h`, `7d`, `2w` ago, or an ISO 8601 date or time (UTC unless it says)."""
    if m := _DURATION.match(text.strip()):
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (90s, 30m, 24h, 7d) nor an ISO date or time"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _pcts(p: dict[str, float | None]) -> str:
    if p["p50"] is None:
        return "-"
    return "/".join(f"{p[k]:.1f}" for k in ("p50", "p95", "p99"))


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in d.items()) or "none"


def nodes(rows: list[dict[str, Any]]) -> str:
    table: list[tuple[str, ...]] = [
        ("node", "host", "pid", "state", "heartbeat", "running", "leases", "started")
    ]
    for r in rows:
        table.append(
            (
                visible(r["node"]) + (" *" if r["self"] else ""),
                visible(r["host"]),
                str(r["pid"]),
                r["state"],
                f"{r['heartbeat_age_s']:.1f} s ago",
                str(r["running"]),
                str(r["leases"]),
                r["started_at"],
            )
        )
    return "\n".join([*columns(table, right_from=2), "* the node that answered"])


def stats(s: dict[str, Any]) -> str:
    lines = stats_summary(s)
    if lines:
        lines.append("")
    lines += columns([TENANT_COLUMNS, *tenant_rows(s)])
    return "\n".join(lines).rstrip()


TENANT_COLUMNS = (
    "tenant",
    "act/s",
    "running",
    "queued",
    "waiting",
    "cold p50/95/99",
    "exec p50/95/99",
    "failures",
)


def tenant_rows(s: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per tenant of the stats API's answer, in `TENANT_COLUMNS`."""
    rows: list[tuple[str, ...]] = []
    for name, t in s["tenants"].items():
        inst = t["instances"]
        rows.append(
            (
                visible(name),
                f"{t['activations_per_s']:.1f}",
                str(t["running"]),
                f"{inst.get('queued', 0):,}",
                f"{inst.get('waiting', 0):,}",
                _pcts(t["cold_start_ms"]),
                _pcts(t["exec_ms"]),
                _counts(t["failures"]) if t["failures"] else "-",
            )
        )
    return rows


def stats_summary(s: dict[str, Any]) -> list[str]:
    """The supervisor as a whole (an answer for one tenant has none of it)."""
    lines = []
    window = f"last {s['window_s']:g} s"
    if "running" in s:
        state = "draining" if s["draining"] else "serving"
        lines += [
            f"{state}, up {s['uptime_s']:,.0f} s, {s['launch_mode']} mode: "
            f"{s['running']} steps running, {s['exiting']} exiting{_prepared(s)}",
            f"node {visible(s.get('node', '-'))} on {visible(s.get('database', '-'))}",
            f"{window}: {s['activations_per_s']:.1f} activations/s ({s['activations']:,}), "
            f"cold start p50/p95/p99 {_pcts(s['cold_start_ms'])} ms, "
            f"step exec {_pcts(s['exec_ms'])} ms",
            f"instances: {_counts(s['instances'])}",
            f"failures: {window}: {_counts(s['failures'])}; "
            f"since start: {_counts(s['failures_since_start'])}",
        ]
        if loop := s.get("loop"):
            lines.append(
                f"loop since start: {loop['iterations']:,} iterations, "
                f"{loop['commits']:,} commits, {loop['syncs']:,} log syncs"
            )
        for z in s["fork_servers"]:
            detail = (
                f"pid {z['pid']}, {z['pending']} pending, {z['spares']} spares, "
                f"idle {z['idle_s']:g} s"
                if z["state"] == "running"
                else "stopped"
            )
            lines.append(f"fork server {z['python']}: {detail}, {z['failures']} failures")
    return lines


def _prepared(s: dict[str, Any]) -> str:
    p = s.get("prepared")  # an older supervisor has none
    if not p or not p["made"]:
        return ""
    return f", {p['waiting']} prepared ({p['used']:,} of {p['made']:,} given a step)"


def columns(rows: list[tuple[str, ...]], right_from: int = 99) -> list[str]:
    """Columns padded to their widest cell (right-aligned from column `right_from` on); the last
    column is not padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join(
            [
                *(
                    c.rjust(w) if i >= right_from else c.ljust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=False))
                ),
                r[-1],
            ]
        )
        for r in rows
    ]


USAGE_COLUMNS = ("tenant", "from", "to", *USAGE_FIELDS)


def usage_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, USAGE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().rstrip("\n")


def usage(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no usage recorded in that period"
    head = ("tenant", "from (UTC)", "activations", "steps", "failures", "CPU s", "wall s")
    table: list[tuple[str, ...]] = [(*head, "peak MiB", "MiB s", "scratch MiB")]
    for r in rows:
        table.append(
            (
                r["tenant"],
                r["from"][:16].replace("T", " "),
                f"{r['activations']:,}",
                f"{r['steps']:,}",
                f"{r['failures']:,}",
                f"{r['cpu_ms'] / 1000:,.2f}",
                f"{r['wall_ms'] / 1000:,.2f}",
                f"{r['memory_peak_kib'] / 1024:,.1f}",
                f"{r['memory_kib_s'] / 1024:,.1f}",
                f"{r.get('scratch_max_kib', 0) / 1024:,.1f}",
            )
        )
    return "\n".join(columns(table, right_from=2))
