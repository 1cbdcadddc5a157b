"""Fixtures shared by the unit tests."""

from tests.unit.runtime_harness import activate  # noqa: F401 - a fixture, used by name
