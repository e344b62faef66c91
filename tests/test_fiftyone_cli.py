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


def test_app_on_a_shared_database_starts_only_the_app(fo_db, fo_pipeline, tmp_path):
    """`mammo fiftyone app --database-uri` (a curator's App on the team's MongoDB, our own mongod standing in):
    no database of the workspace's own is started, the App serves the datasets already there, Ctrl-C stops it."""
    import signal
    import time

    import requests

    from fiftyone_plugins.launch import running_mongod

    env = dict(os.environ, MAMMO_QUIET="1")
    app = subprocess.Popen([sys.executable, "-m", "workspace.app.cli", "--workspace", str(fo_pipeline.ws.root),
                            "fiftyone", "app", "--database-uri", fo_db.uri, "--prefix", "pipeline", "--no-sync"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line, deadline = "", time.monotonic() + 240
        while "FiftyOne App" not in line and time.monotonic() < deadline and app.poll() is None:
            line = app.stdout.readline()
        assert "FiftyOne App" in line and f"database {fo_db.uri}" in line, line
        url = line.split()[2]
        assert requests.get(url + "fiftyone", timeout=30).status_code == 200
        assert running_mongod(fo_pipeline.ws) is None   # nothing of its own beside the shared database
        app.send_signal(signal.SIGINT)
        assert app.wait(timeout=60) == 0
    finally:
        if app.poll() is None:
            app.kill()
