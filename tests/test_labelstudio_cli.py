"""``mammo ls connect|provision|status`` and ``mammo up`` against the run's Label Studio (used as an existing
server, so the test run still starts only one), stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from workspace.base.services import recorded_services

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

MAMMO = str(Path(sys.executable).with_name("mammo"))


def mammo(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([MAMMO, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "MAMMO_QUIET": "1", **(env or {})})


def test_up_provisions_prints_login_and_stops_on_ctrl_c(labelstudio_server, ls_pipeline, tmp_path_factory):
    server, ws = labelstudio_server, ls_pipeline.ws
    # the token comes from the environment (LABEL_STUDIO_API_KEY) or a file, never from a flag `ps` would show
    done = mammo("ls", "connect", server.url, "--workspace", str(ws.root), "--document-root", str(server.document_root),
                 env={"LABEL_STUDIO_API_KEY": server.token})
    assert done.returncode == 0, done.stderr
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text("wrong\n")
    bad = mammo("ls", "connect", server.url, "--token-file", str(token_file), "--workspace", str(ws.root))
    assert bad.returncode == 1 and "does not accept the token" in bad.stderr
    none = mammo("ls", "connect", server.url, "--workspace", str(ws.root), env={"LABEL_STUDIO_API_KEY": ""})
    assert none.returncode == 1 and "LABEL_STUDIO_API_KEY" in none.stderr
    assert mammo("ls", "connect", server.url, "--token", server.token).returncode == 2  # no such flag

    process = subprocess.Popen([MAMMO, "up", "--workspace", str(ws.root), "--no-fiftyone"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "MAMMO_QUIET": "1"})
    lines = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if "Ctrl-C stops everything" in line:
                break
        text = "\n".join(lines)
        assert "Ctrl-C stops everything" in text, text
        assert f"Label Studio  {server.url}" in text and "Screening reads:" in text and "Patch review:" in text
        backend = recorded_services(ws)["ml_backend"]
        assert requests.get(f"{backend.url}/health", timeout=10).json()["status"] == "UP"
        # while it runs: provisioning again adds nothing; status lists the services
        again = mammo("ls", "provision", "--workspace", str(ws.root))
        assert again.returncode == 0, again.stderr
        assert "(0 new)" in again.stdout and "Screening reads" in again.stdout
        status = mammo("ls", "status", "--workspace", str(ws.root))
        assert "ml_backend" in status.stdout and "up" in status.stdout and "annotations received" in status.stdout
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert not backend.alive()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{backend.url}/health", timeout=5)
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200  # an existing server is left running
    (ws.labelstudio_dir / "external.json").unlink()
