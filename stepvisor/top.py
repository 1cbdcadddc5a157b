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

from stepvisor.render import TENANT_COLUMNS, stats_summary, tenant_rows, visible


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
        self.query_one(DataTable).add_columns(*TENANT_COLUMNS)
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
        summary_widget.update(Text("\n".join(stats_summary(s))))
        table = self.query_one(DataTable)
        table.clear()
        for row in tenant_rows(s):
            table.add_row(*(Text(cell) for cell in row))  # tenant strings: never markup

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.sub_title = "paused" if self.paused else ""
