"""sandbox_host.runtime in-process: deploy inspection lists workflows or says why not."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from protocol.messages import Inspected
from tests.unit.runtime_harness import Outcome, failure_of


def test_inspect_lists_workflow_names(activate: Callable[..., Outcome]) -> None:
    out = activate(
        """
        @workflow("zeta")
        def z(event, step):
            pass

        @workflow("alpha")
        def a(event, step):
            pass

        def not_a_workflow(event, step):
            pass
    """,
        mode="inspect",
    )
    assert out.sent == [Inspected(workflows=["alpha", "zeta"])]


def test_inspect_reports_a_syntax_error_as_deploy_failed(activate: Callable[..., Outcome]) -> None:
    out = activate(
        """
        @workflow("w")
        def w(event, step)
            return 1
    """,
        mode="inspect",
    )
    err = failure_of(out)
    assert (err.type, err.code) == ("SyntaxError", "DEPLOY_FAILED")
    assert "def w(event, step)" in err.traceback


@pytest.mark.parametrize(
    "source,kind",
    [
        ("import no_such_module_xyz\n", "ModuleNotFoundError"),
        ("x = 1\n", "NoWorkflows"),
        ("raise RuntimeError('at import')\n", "RuntimeError"),
    ],
)
def test_inspect_reports_load_failures_as_deploy_failed(
    activate: Callable[..., Outcome], source: str, kind: str
) -> None:
    err = failure_of(activate(source, mode="inspect"))
    assert (err.type, err.code) == (kind, "DEPLOY_FAILED")
