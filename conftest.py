"""Shared pytest fixtures, one module per area under tests/fixtures/ (each owned by its area)."""

pytest_plugins = [
    "tests.fixtures.common",
]
