"""``mammo --help`` stays instant (no heavy library imported to build the parser), and the defaults the
help states are the library's (the CLI leaves unset options to the library instead of importing them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "fiftyone", "label_studio", "label_studio_sdk", "scipy", "sklearn", "sqlite_utils")


def test_building_the_parser_imports_no_heavy_library():
    code = ("import sys; from workspace.app.cli import build_parser; build_parser(); "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def _options(command: str) -> dict:
    from workspace.app.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest: a for a in sub._actions}


def test_help_states_the_library_defaults():
    from workspace.dissect.dissect_run import DEFAULT_BATCH_SIZE, DEFAULT_MEMORY_BUDGET_MB
    from workspace.dissect.dissection import DEFAULT_IOU_THRESHOLD, DEFAULT_QUANTILE, DEFAULT_TOP_K

    expected = {("dissect", "quantile"): DEFAULT_QUANTILE, ("dissect", "top_k"): DEFAULT_TOP_K,
                ("dissect", "memory_budget_mb"): DEFAULT_MEMORY_BUDGET_MB,
                ("dissect", "batch_size"): DEFAULT_BATCH_SIZE, ("query", "iou_threshold"): DEFAULT_IOU_THRESHOLD}
    for (command, dest), value in expected.items():
        action = _options(command)[dest]
        assert action.default is None, (command, dest)   # unset: the library's default applies
        assert f"(default {value:g})" in action.help, (command, dest, action.help)


def test_commands_that_load_a_model_share_its_options():
    for command in ("dissect", "evaluate", "read", "query"):
        assert {"model", "device", "arch", "layer", "trust"} <= set(_options(command)), command
