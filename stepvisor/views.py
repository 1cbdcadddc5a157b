"""Human renderings of the instance commands (`status`, `history`, `list`, `reload`): whole
values, never truncated, with every tenant string escaped (`render.visible`) before it reaches a
terminal. Pure functions of the API's replies, shared by the CLI and the demo."""

from __future__ import annotations

import json
from typing import Any

from stepvisor.render import columns, visible


def _json(value: Any) -> str:
    """A value on one line, whole: the tenant's payloads as they are, escaped for a terminal."""
    return visible(json.dumps(value, ensure_ascii=False, default=str))


def _fields(pairs: list[tuple[str, str]], indent: str = "") -> list[str]:
    """`key: value` lines with the values aligned; a multi-line value continues under its
    value column (each of its lines escaped on its own)."""
    width = max(len(k) for k, _ in pairs) + 1
    lines = []
    for key, value in pairs:
        first, *more = value.split("\n")
        lines.append(f"{indent}{key + ':':<{width}} {first}".rstrip())
        lines += [f"{indent}{'':<{width}} {line}".rstrip() for line in more]
    return lines


def _error(err: dict[str, Any] | None) -> str:
    if not err:
        return "-"
    return visible(f"{err.get('type')}: {err.get('message')}")


def _traceback(err: dict[str, Any] | None) -> str | None:
    text = (err or {}).get("traceback") or ""
    if not text.strip():
        return None
    return "\n".join(visible(line) for line in text.rstrip("\n").split("\n"))


def status(st: dict[str, Any]) -> str:
    """`stepvisor status`: one `key: value` line per field; the output in full."""
    pairs = [
        ("instance", f"{visible(st['tenant'])}/{visible(st['id'])}"),
        ("workflow", visible(st["workflow"])),
        ("version", st["version"]),
        ("status", st["status"]),
        ("created", st["created_at"]),
        ("updated", st["updated_at"]),
    ]
    if st.get("wake_at"):
        pairs.append(("wakes", st["wake_at"]))
    pairs += [("steps", str(st["steps"])), ("activations", str(st["activations"]))]
    if st["status"] == "complete" or st.get("output") is not None:
        pairs.append(("output", _json(st.get("output"))))
    if "output_omitted_bytes" in st:
        pairs.append(("output", f"({st['output_omitted_bytes']:,} bytes, not listed)"))
    if st.get("error"):
        pairs.append(("error", _error(st["error"])))
        if (tb := _traceback(st["error"])) is not None:
            pairs.append(("traceback", tb))
    return "\n".join(_fields(pairs))


def _detail(e: dict[str, Any]) -> str:
    if "result_omitted_bytes" in e:  # past what one reply carries
        return f"(a result of {e['result_omitted_bytes']:,} bytes, left out: too many to show)"
    if e["kind"] == "sleep":
        return f"until {e['until']}"
    if e["error"] is not None and e["status"] != "ok":
        return _error(e["error"])
    if e["status"] == "ok" or e["result"] is not None:
        return _json(e["result"])
    return "-"


def history(h: dict[str, Any]) -> str:
    """`stepvisor history`: the instance, its journal one entry a row (each failed attempt
    under its step, kept also when a retry succeeded), then its activations with timings."""
    inst = h["instance"]
    lines = [status(inst), "", "journal:"]
    rows: list[tuple[str, ...]] = [("seq", "kind", "name", "status", "att", "result / error")]
    for e in h["entries"]:
        rows.append(
            (
                str(e["seq"]),
                e["kind"],
                visible(e["name"]),
                e["status"],
                str(e["attempts"]),
                _detail(e),
            )
        )
        for f in e.get("failed_attempts") or []:
            rows.append(("", "", "", "attempt", str(f["attempt"]), _error(f["error"])))
        if e.get("failed_attempts_omitted"):
            rows.append(("", "", "", "", "", f"({e['failed_attempts_omitted']} more, left out)"))
    lines += ["  " + line.rstrip() for line in columns(rows)] if h["entries"] else ["  (empty)"]
    acts = h["activations"]
    if acts:
        lines += ["", "activations:"]
        table: list[tuple[str, ...]] = [
            ("id", "seq", "step", "node", "outcome", "cold ms", "exec ms", "total ms", "")
        ]
        for a in acts:
            table.append(
                (
                    str(a["id"]),
                    "-" if a["seq"] is None else str(a["seq"]),
                    visible(a["step"] or "-"),
                    visible(a.get("node") or "-"),
                    visible(a["outcome"] or "running"),
                    _ms(a["cold_start_ms"]),
                    _ms(a["exec_ms"]),
                    _ms(a["total_ms"]),
                    # launched ahead of its step: its cold start was not the step's wait. Also
                    # pads the column before it (right-aligned).
                    "prepared" if a.get("bound_at") else "",
                )
            )
        lines += ["  " + line.rstrip() for line in columns(table, right_from=5)]
        colds = sorted(a["cold_start_ms"] for a in acts if a["cold_start_ms"] is not None)
        if colds:
            ahead = sum(1 for a in acts if a.get("bound_at"))
            lines.append(
                f"  cold start ms: min {colds[0]:.1f}  median {colds[len(colds) // 2]:.1f}  "
                f"max {colds[-1]:.1f}  over {len(colds)} activations"
                + (f", {ahead} of them prepared before their step was due" if ahead else "")
            )
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def instances(rows: list[dict[str, Any]]) -> str:
    """`stepvisor list`: a header row, then one instance a row."""
    if not rows:
        return "no instances"
    table: list[tuple[str, ...]] = [("id", "workflow", "status", "steps", "updated")]
    for r in rows:
        table.append(
            (
                visible(r["id"]),
                visible(r["workflow"]),
                r["status"],
                str(r["steps"]),
                r["updated_at"],
            )
        )
    return "\n".join(columns(table))


def reload(r: dict[str, Any]) -> str:
    """`stepvisor reload`: what changed, key by key."""
    changes = r["changes"]
    if not changes:
        return f"reloaded {r['path']}: nothing changed"
    lines = [f"reloaded {r['path']}:"]
    for key, change in changes.items():
        lines.append(f"  {key}: {json.dumps(change['old'])} -> {json.dumps(change['new'])}")
    return "\n".join(lines)
