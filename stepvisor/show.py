"""`stepvisor show TENANT ID`: an instance's timeline in the terminal.

Each journaled command with its attempts (and every failed attempt's error, kept when a retry
succeeded), cold start against execution time of the activations that ran it, sleeps and waits
with their deadlines, payloads, children, and the tenant's traceback with its source lines.
Tenant strings are escaped (`render.visible`) and never read as markup.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from stepvisor.render import visible

STATUS_STYLE = {
    "complete": "green",
    "ok": "green",
    "errored": "red",
    "error": "red",
    "timeout": "red",
    "terminated": "red",
    "retry": "yellow",
    "running": "cyan",
    "waiting": "blue",
    "sleeping": "blue",
    "paused": "magenta",
    "queued": "white",
}
OUTCOME_STYLE = {"ok": "green", "running": "cyan"}
PAYLOAD_CHARS = 2000  # of one payload in the timeline; `history --json` has them whole


def text(value: object, style: str = "") -> Text:
    """Tenant data as inert text: escaped, never markup."""
    return Text(visible(str(value)), style=style)


def payload(value: Any) -> str:
    out = json.dumps(value, ensure_ascii=False, default=str)
    if len(out) > PAYLOAD_CHARS:
        out = out[:PAYLOAD_CHARS] + f"… ({len(out):,} chars; `history --json` has it whole)"
    return out


def _when(iso: str | None, created: dt.datetime | None) -> str:
    """An ISO time as `+12.3s` from the instance's creation (and the date for far times)."""
    if iso is None:
        return "-"
    at = dt.datetime.fromisoformat(iso)
    if created is None:
        return iso
    delta = (at - created).total_seconds()
    return f"+{delta:,.3f}s" if abs(delta) < 86_400 else iso


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def header(inst: dict[str, Any]) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    status = inst["status"]
    rows = [
        ("workflow", text(inst["workflow"])),
        ("version", text(inst["version"])),
        ("status", text(status, STATUS_STYLE.get(status, ""))),
        ("created", text(inst["created_at"])),
        ("updated", text(inst["updated_at"])),
    ]
    if inst.get("wake_at"):
        rows.append(("wakes", text(inst["wake_at"])))
    if inst.get("parent"):
        rows.append(("parent", text(inst["parent"])))
    rows.append(("steps", text(f"{inst['steps']} journaled, {inst['activations']} activations")))
    if inst.get("output") is not None:
        rows.append(("output", text(payload(inst["output"]))))
    for name, value in rows:
        grid.add_row(name, value)
    title = Text(f"{visible(inst['tenant'])}/{visible(inst['id'])}", style="bold")
    return Panel(grid, title=title, title_align="left", box=box.ROUNDED)


def _detail(e: dict[str, Any], created: dt.datetime | None) -> Text:
    out = Text()

    def add(line: str, style: str = "") -> None:
        out.append(("\n" if out else "") + visible(line), style=style)

    if e["kind"] == "sleep":
        add(f"until {e['until']} ({_when(e['until'], created)})")
    elif e["kind"] == "wait_event":
        add(f"type {e['event_type']!r}, deadline {_when(e['until'], created)}")
    elif e["kind"] == "invoke" and e.get("child"):
        add(f"child {e['child']}")
    if e.get("result") is not None:
        add("→ " + payload(e["result"]), "green")
    elif e.get("result_omitted_bytes"):
        add(f"→ ({e['result_omitted_bytes']:,} bytes, not shown)", "dim")
    for a in e.get("failed_attempts", []):
        err = a["error"] or {}
        when = _when(a["failed_at"], created)
        add(f"attempt {a['attempt']} failed {when}: {err.get('type')}: {err.get('message')}", "red")
    if e.get("error") and e["status"] in ("error", "timeout"):
        add(f"{e['error']['type']}: {e['error']['message']}", "bold red")
    return out


def journal(h: dict[str, Any], created: dt.datetime | None) -> Group:
    """One block per journaled command: a line of figures, then its details indented, so it
    reads at any terminal width."""
    by_seq: dict[int, list[dict[str, Any]]] = {}
    for a in h["activations"]:
        if a["seq"] is not None:
            by_seq.setdefault(a["seq"], []).append(a)
    blocks: list[RenderableType] = [Text("journal", style="bold underline")]
    if not h["entries"]:
        blocks.append(Text("  (nothing journaled yet)", style="dim"))
    for e in h["entries"]:
        line = Text(f"{e['seq']:>4}  ")
        line.append(visible(f"{e['kind']:<10} "), style="dim")
        line.append(visible(e["name"]), style="bold")
        line.append("  ")
        line.append(visible(e["status"]), style=STATUS_STYLE.get(e["status"], ""))
        facts = []
        if e["attempts"]:
            facts.append(f"{e['attempts']} {'try' if e['attempts'] == 1 else 'tries'}")
        facts.append(f"started {_when(e['started_at'], created)}")
        if e["duration_ms"] is not None:
            facts.append(f"took {_ms(e['duration_ms'])} ms")
        runs = by_seq.get(e["seq"], [])
        if runs:
            cold = ", ".join(f"{_ms(a['cold_start_ms'])}/{_ms(a['exec_ms'])}" for a in runs[-5:])
            facts.append(f"cold/exec ms {cold}")
        line.append("  " + " · ".join(facts), style="dim")
        blocks.append(line)
        detail = _detail(e, created)
        if detail:
            indented = Text()
            for i, part in enumerate(detail.split("\n")):
                indented.append(("\n" if i else "") + "        ")
                indented.append_text(part)
            blocks.append(indented)
    return Group(*blocks)


def activations(h: dict[str, Any], created: dt.datetime | None) -> Table:
    t = Table(
        title="activations",
        title_justify="left",
        title_style="bold underline",
        box=None,
        padding=(0, 1),
        header_style="dim",
    )
    nodes = {a["node"] for a in h["activations"]}
    names = [
        "id",
        "launched",
        "seq",
        "step",
        "outcome",
        "cold ms",
        "exec ms",
        "total ms",
        "cpu ms",
        "rss MiB",
    ] + (["node"] if len(nodes) > 1 else [])
    for name in names:
        numeric = name.endswith(("ms", "MiB")) or name in ("id", "seq")
        t.add_column(name, justify="right" if numeric else "left", no_wrap=name != "step")
    for a in h["activations"]:
        outcome = a["outcome"] or "running"
        row: list[RenderableType] = [
            str(a["id"]),
            _when(a["launched_at"], created),
            "-" if a["seq"] is None else str(a["seq"]),
            text(a["step"] or "-"),
            text(outcome, OUTCOME_STYLE.get(outcome, "red")),
            # prepared: its cold start came before the step was given to it
            _ms(a["cold_start_ms"]) + (" ahead" if a.get("bound_at") else ""),
            _ms(a["exec_ms"]),
            _ms(a["total_ms"]),
            _ms(a["cpu_ms"]),
            "-" if a["max_rss_kib"] is None else f"{a['max_rss_kib'] / 1024:,.1f}",
        ]
        t.add_row(*row, *([text(a["node"] or "-")] if len(nodes) > 1 else []))
    return t


def failure(inst: dict[str, Any]) -> RenderableType | None:
    err = inst.get("error")
    if not err:
        return None
    body = Text(visible(f"{err['type']}: {err['message']}"), style="bold red")
    if err.get("code"):
        body.append(visible(f"  [{err['code']}]"), style="red")
    if err.get("traceback"):
        # the tenant's own frames, with the source lines the runtime kept for them
        body.append("\n\n" + "\n".join(visible(line) for line in err["traceback"].splitlines()))
    return Panel(body, title="error", title_align="left", border_style="red")


def timeline(h: dict[str, Any]) -> Group:
    inst = h["instance"]
    created = dt.datetime.fromisoformat(inst["created_at"]) if inst.get("created_at") else None
    parts: list[RenderableType] = [header(inst), journal(h, created)]
    if h["activations"]:
        parts.append(activations(h, created))
    if (err := failure(inst)) is not None:
        parts.append(err)
    return Group(*parts)


def print_timeline(h: dict[str, Any], width: int | None = None) -> None:
    Console(highlight=False, width=width).print(timeline(h))
