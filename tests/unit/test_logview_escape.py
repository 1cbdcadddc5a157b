"""Tenant strings reach an operator's terminal escaped: no control or format character of theirs
can move the cursor, overwrite a line or fake a line of another tenant."""

from __future__ import annotations

import json
import unicodedata

import pytest

from stepvisor import logview, views
from stepvisor.render import visible

# ESC sequences (erase line, cursor up, colour, OSC title), \r overwrite, a fake newline
# followed by a fake prefix of another tenant's line, bidi overrides, C1 CSI, DEL, zero width.
HOSTILE = (
    "ok\x1b[2K\r2026-11-25 14:13:29.112 info    globex/x#1  [pay] stdout: paid"
    "\n2026-11-25 14:13:29.113 info    globex/x#2  activation.finished outcome=ok"
    "\x1b[1A\x1b[31m\x1b]0;pwned\x07\u202edesrever\u202c\u2066\u2069\x9b2J\x7f\u200b\u2028"
)


def _output_record(line: str, **extra: str) -> dict[str, object]:
    return {
        "timestamp": "2026-11-25T14:13:29.112345Z",
        "level": "info",
        "event": "tenant.output",
        "tenant": "evil",
        "instance": "a",
        "activation": 7,
        "step": "s",
        "stream": "stdout",
        "line": line,
        **extra,
    }


def _terminal_safe(text: str) -> bool:
    return all(ch.isprintable() for ch in text)


def test_visible_escapes_controls_format_and_separators() -> None:
    assert visible("\x1b[2K\rx\ny\tz\x7f\x85") == "\\x1b[2K\\rx\\ny\\tz\\x7f\\x85"
    assert visible("\u202e\u2066\u200b\u2028\ufeff") == "\\u202e\\u2066\\u200b\\u2028\\ufeff"
    assert visible("\U000e0001") == "\\U000e0001"  # a tag character (format, astral)
    assert visible("plain é 日本 \\x1b text") == "plain é 日本 \\x1b text"  # unchanged


@pytest.mark.parametrize("code", [*range(0x20), *range(0x7F, 0xA0)])
def test_visible_escapes_every_c0_and_c1_control(code: int) -> None:
    shown = visible(f"a{chr(code)}b")
    assert _terminal_safe(shown) and shown != f"a{chr(code)}b"


def test_visible_escapes_every_format_character_of_the_bmp() -> None:
    fmt = [chr(c) for c in range(0x10000) if unicodedata.category(chr(c)) == "Cf"]
    assert "\u202e" in fmt and _terminal_safe(visible("".join(fmt)))


def test_a_hostile_output_line_renders_as_one_escaped_line() -> None:
    shown = logview.render(_output_record(HOSTILE))
    assert "\n" not in shown and "\r" not in shown and "\x1b" not in shown
    assert _terminal_safe(shown)
    # the attribution is ours, and the fake prefix sits visibly inside evil's line
    assert shown.startswith("2026-11-25 14:13:29.112 info    evil/a#7  [s] stdout: ok\\x1b[2K\\r")
    assert "\\nglobex/x#2" not in shown and "\\n2026-11-25 14:13:29.113 info    globex/x#2" in shown
    assert "\\u202e" in shown and "\\x9b" in shown


def test_every_field_is_escaped_not_only_the_line() -> None:
    rec = {
        "timestamp": "2026-11-25T14:13:29.112Z\r",
        "level": "info\x1b[0m",
        "event": "step.failed\x1b[2K",
        "tenant": "evil\r",
        "instance": "a\nb",
        "activation": 7,
        "step": "pay\x1b[8m",
        "error": "Boom: \u202emsg",
        "detail": "x\ny",
    }
    shown = logview.render(rec)
    assert _terminal_safe(shown)
    assert "evil\\r/a\\nb#7" in shown and "pay\\x1b[8m" in shown


def test_raw_lines_are_escaped_too() -> None:
    flt = logview.Filter()
    raw = "Traceback \x1b[2K\rfake"
    assert logview._shown(raw, flt, as_json=False) == "Traceback \\x1b[2K\\rfake"
    line = json.dumps(_output_record("\u202eevil"), ensure_ascii=False)
    shown = logview._shown(line, flt, as_json=True)
    assert shown is not None and "\u202e" not in shown and "\\u202e" in shown


def test_history_escapes_names_and_errors() -> None:
    h = {
        "instance": {
            "tenant": "evil",
            "id": "a",
            "workflow": "wf\x1b[2K",
            "version": "v1",
            "status": "errored",
            "created_at": "2026-01-01T00:00:00+00:00",
            "updated_at": "2026-01-01T00:00:01+00:00",
            "steps": 1,
            "activations": 1,
            "output": None,
            "error": {
                "type": "Boom",
                "message": "line1\nglobex/x  status=complete\x1b[1A",
                "traceback": "Traceback\x1b[2J\n  line\u202e two\n",
            },
        },
        "entries": [
            {
                "seq": 0,
                "kind": "step",
                "name": "s\rtep",
                "status": "error",
                "attempts": 1,
                "result": None,
                "error": {"type": "E", "message": "m\x1b]0;t\x07"},
            }
        ],
        "activations": [],
    }
    lines = views.history(h).split("\n")
    # 8 fields, the error, the traceback's 2 lines, a gap, "journal:", column heads, the entry:
    # no injected line
    assert len(lines) == 15, lines
    assert all(_terminal_safe(line) for line in lines)
    assert lines[1] == "workflow:    wf\\x1b[2K"
    assert lines[8].startswith("error:") and "line1\\nglobex" in lines[8]
    assert lines[9] == "traceback:   Traceback\\x1b[2J"
    assert lines[10] == "               line\\u202e two"
    assert "s\\rtep" in lines[14] and "m\\x1b]0;t\\x07" in lines[14]
