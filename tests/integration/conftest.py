"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.conftest import Daemon
from tests.integration.arena import Arena


@pytest.fixture
def arena(make_daemon: Callable[..., Daemon]) -> Iterator[Arena]:
    config = """
        [tenants.evil]
        memory_mib = 256
        cpu_seconds = 2
        timeout_s = 30
        max_pids = 32
        max_concurrent = 2
    """
    a = Arena(make_daemon(config))
    yield a
    a.assert_unharmed()
