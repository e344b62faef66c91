"""``mammo fiftyone sync`` as a user runs it (a child process), on the shared real pipeline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.fiftyone, pytest.mark.slow]


def _mammo(ws, *args, uri):
    env = dict(os.environ, MAMMO_QUIET="1")
    return subprocess.run([sys.executable, "-m", "workspace.app.cli", "--workspace", str(ws.root), "fiftyone", *args,
                           "--database-uri", uri], capture_output=True, text=True, env=env, timeout=300)


def test_cli_sync_builds_then_finds_nothing_to_do(fo_db, pipeline):
    import fiftyone as fo

    first = _mammo(pipeline.ws, "sync", "--prefix", "cli", uri=fo_db.uri)
    assert first.returncode == 0, first.stderr
    assert f"run {pipeline.run.run_id}: cli-patches ({len(pipeline.run.patch_ids)} patches)" in first.stdout
    second = _mammo(pipeline.ws, "sync", "--prefix", "cli", uri=fo_db.uri)
    assert second.returncode == 0 and "already up to date" in second.stdout, second.stdout + second.stderr
    assert len(fo.load_dataset("cli-neurons")) == pipeline.run.n_units
    bad = _mammo(pipeline.ws, "sync", "--prefix", "cli", "--run", "no-such-run", uri=fo_db.uri)
    assert bad.returncode == 1 and "no-such-run" in bad.stderr and "Traceback" not in bad.stderr
