"""Shared pytest fixtures, one module per area under tests/fixtures/ (each owned by its area)."""

pytest_plugins = [
    "tests.fixtures.common",
    "tests.fixtures.pipeline",
    "tests.fixtures.cohort",
    "tests.fixtures.dicom",
    "tests.fixtures.importers",
    "tests.fixtures.fiftyone",
    "tests.fixtures.labelstudio",
    "tests.fixtures.films",
]
