"""`stepvisor top`: a live view of the supervisor from its stats API, refreshed every second or
two: what runs and waits per tenant, cold-start and step-time percentiles, failures, fork
servers. `q` quits, `p` pauses the refresh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Header, Static

from stepvisor.render import visible


def _pcts(p: dict[str, float | None]) -> str:
    return "/".join("-" if p[k] is None else f"{p[k]:.1f}" for k in ("p50", "p95", "p99"))


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{visible(k)} {v:,}" for k, v in sorted(c.items())) or "-"


def summary(s: dict[str, Any]) -> str:
    """The lines above the table: the supervisor as a whole."""
    state = "draining" if s.get("draining") else "serving"
    lines = [
        f"{state} · node {visible(s.get('node', '-'))} · {visible(s.get('database', '-'))} · "
        f"up {s.get('uptime_s', 0):,.0f} s · {s.get('launch_mode', '-')} mode",
        f"last {s['window_s']:g} s: {s['activations_per_s']:.1f} activations/s · "
        f"cold start p50/p95/p99 {_pcts(s['cold_start_ms'])} ms · "
        f"step {_pcts(s['exec_ms'])} ms",
        f"running {s.get('running', 0)} · exiting {s.get('exiting', 0)} · "
        f"instances: {_counts(s['instances'])}",
        f"failures (last {s['window_s']:g} s): {_counts(s['failures'])}",
    ]
    for z in s.get("fork_servers", []):
        lines.append(
            f"fork server {visible(z['python'])}: {z['state']}, {z.get('spares', 0)} spares, "
            f"{z.get('pending', 0)} pending, {z['failures']} failures"
        )
    return "\n".join(lines)


COLUMNS = (
    "tenant",
    "act/s",
    "running",
    "queued",
    "waiting",
    "cold p50/95/99 ms",
    "step p50/95/99 ms",
    "failures",
)


def rows(s: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for name, t in sorted(s["tenants"].items()):
        inst = t["instances"]
        out.append(
            (
                visible(name),
                f"{t['activations_per_s']:.1f}",
                str(t["running"]),
                f"{inst.get('queued', 0):,}",
                f"{inst.get('waiting', 0):,}",
                _pcts(t["cold_start_ms"]),
                _pcts(t["exec_ms"]),
                _counts(t["failures"]),
            )
        )
    return out


class Top(App[None]):
    TITLE = "stepvisor top"
    BINDINGS = [Binding("q", "quit", "quit"), Binding("p", "pause", "pause/resume")]

    def __init__(self, fetch: Callable[[], dict[str, Any]], interval_s: float) -> None:
        super().__init__()
        self.fetch = fetch  # () -> the stats API's answer
        self.interval_s = interval_s
        self.paused = False

    def compose(self) -> ComposeResult:
        yield Header(show_clock=True)
        yield Static(id="summary")
        yield DataTable(id="tenants", zebra_stripes=True, cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*COLUMNS)
        self.refresh_stats()
        self.set_interval(self.interval_s, self.refresh_stats)

    def refresh_stats(self) -> None:
        if self.paused:
            return
        summary_widget = self.query_one("#summary", Static)
        try:
            s = self.fetch()
        except Exception as exc:  # the supervisor went away: say so and keep trying
            summary_widget.update(Text(f"no answer from the supervisor: {visible(str(exc))}"))
            return
        summary_widget.update(Text(summary(s)))
        table = self.query_one(DataTable)
        table.clear()
        for row in rows(s):
            table.add_row(*(Text(cell) for cell in row))  # tenant strings: never markup

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.sub_title = "paused" if self.paused else ""
