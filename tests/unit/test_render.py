"""Time arguments and table renderings of the operator commands."""

from __future__ import annotations

import pytest

from stepvisor.render import parse_since, usage, usage_csv
from supervisor.stats import Stats, percentiles

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    "text,ago",
    [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("2w", 1209600), ("1.5h", 5400)],
)
def test_durations_count_back_from_now(text: str, ago: float) -> None:
    assert parse_since(text, NOW) == NOW - ago


def test_iso_times_are_utc_unless_they_say() -> None:
    assert parse_since("2023-11-14T22:13:20", NOW) == NOW
    assert parse_since("2023-11-14T23:13:20+01:00", NOW) == NOW
    assert parse_since("2023-11-14", NOW) == NOW - 80000


@pytest.mark.parametrize("text", ["", "yesterday", "5 parsecs", "-3h", "12"])
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since(text, NOW)


def test_percentiles_are_nearest_rank() -> None:
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None}
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert percentiles([7.0]) == {"p50": 7.0, "p95": 7.0, "p99": 7.0}


def test_the_stats_window_forgets_what_is_older_than_a_minute() -> None:
    stats = Stats(started_mono=0.0)
    stats.record(1.0, "a", "ok", 5.0, 1.0)
    stats.record(2.0, "a", "oom", 6.0, 2.0)
    stats.record(70.0, "b", "ok", 7.0, 3.0)
    window = stats.window(70.0)
    assert window["activations"] == 1 and window["failures"] == {}
    assert window["activations_per_s"] == round(1 / 60, 2)
    assert stats.failures_since_start() == {"oom": 1}  # since start is not windowed
    assert "a" not in stats.by_tenant(70.0)  # none of its activations is in the window


def test_usage_renderings() -> None:
    row = {
        "tenant": "acme",
        "from": "2026-11-25T14:00:00.000+00:00",
        "to": "2026-11-25T15:00:00.000+00:00",
        "activations": 1200,
        "steps": 1000,
        "failures": 3,
        "cpu_ms": 6000.0,
        "wall_ms": 9000.0,
        "memory_peak_kib": 20480,
        "memory_sum_kib": 2048000,
        "memory_kib_s": 15360.0,
    }
    text = usage([row])
    assert "acme" in text and "1,200" in text and "6.00" in text and "20.0" in text
    lines = usage_csv([row]).splitlines()
    assert lines[0].startswith("tenant,from,to,activations")
    assert lines[1].startswith("acme,2026-11-25T14:00:00.000+00:00")
    assert usage([]) == "no usage recorded in that period"
