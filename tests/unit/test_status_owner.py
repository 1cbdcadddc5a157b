"""An instance's status has one writer, `supervisor.engine` (as DBOS keeps its workflow status):
no other supervisor module sets it, so every transition can be read, and checked, in one place."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SUPERVISOR = Path(__file__).resolve().parents[2] / "supervisor"


def status_writes(path: Path) -> list[str]:
    """Calls that write a status: journal writers that take one, or `update_instance(status=)`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        if name in {"insert_instance", "reset_instance"} or (
            name == "update_instance" and any(k.arg == "status" for k in node.keywords)
        ):
            found.append(f"{path.name}:{node.lineno} {name}")
    return found


SQL_LAYER = "journal/"  # passes on what the engine gave it


@pytest.mark.parametrize(
    "module",
    sorted(
        str(p.relative_to(SUPERVISOR)) for p in SUPERVISOR.rglob("*.py") if p.name != "engine.py"
    ),
)
def test_only_the_engine_writes_an_instance_status(module: str) -> None:
    path = SUPERVISOR / module
    writes = status_writes(path)
    if module.startswith(SQL_LAYER):
        # The SQL layer passes on what the engine gave it, and never names a status itself
        # (its schema text and the checks of which statuses are finished aside).
        source = path.read_text()
        assert "'queued'" not in source and 'status="' not in source and "status='" not in source
        return
    assert writes == [], f"{module} writes an instance status; ask supervisor.engine instead"


def test_the_check_sees_a_status_write() -> None:
    engine = SUPERVISOR / "engine.py"
    assert any("update_instance" in w for w in status_writes(engine))
