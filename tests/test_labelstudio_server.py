"""The run's real Label Studio server: contained in its folder, quiet, logged in, serving workspace images."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from ml_backend.labelstudio import LabelStudioError, external_server
from ml_backend.provision import local_files_url

pytestmark = pytest.mark.labelstudio


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def login(server) -> requests.Session:
    """A browser-like session (cookies), logged in with the workspace's credentials."""
    session = requests.Session()
    session.get(f"{server.url}/user/login/", timeout=30)
    response = session.post(f"{server.url}/user/login/", timeout=30, allow_redirects=False,
                            data={"email": server.username, "password": server.password,
                                  "csrfmiddlewaretoken": session.cookies.get("csrftoken")},
                            headers={"Referer": f"{server.url}/user/login/"})
    assert response.status_code in (302, 303), response.text[:500]
    return session


def test_server_runs_inside_its_folder_with_telemetry_off(labelstudio_server):
    server = labelstudio_server
    assert server.url.startswith("http://127.0.0.1:")
    env = _environ(server.service.pid)
    data_dir = Path(env["LABEL_STUDIO_BASE_DATA_DIR"])
    assert (data_dir / "label_studio.sqlite3").exists()
    for key in ("HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        assert Path(env[key]).is_relative_to(data_dir), key
    assert env["SENTRY_DSN"] == "" and env["FRONTEND_SENTRY_DSN"] == ""
    assert env["COLLECT_ANALYTICS"] == "false" and env["LATEST_VERSION_CHECK"] == "false"
    # the reader's password and token are in the server's environment, not on its command line (`ps` shows that)
    command_line = Path(f"/proc/{server.service.pid}/cmdline").read_bytes().decode()
    assert server.password not in command_line and server.token not in command_line
    assert env["LABEL_STUDIO_PASSWORD"] == server.password and env["LABEL_STUDIO_USER_TOKEN"] == server.token
    whoami = requests.get(f"{server.url}/api/current-user/whoami",
                          headers={"Authorization": f"Token {server.token}"}, timeout=30)
    assert whoami.status_code == 200 and whoami.json()["email"] == server.username


def test_existing_server_is_checked_by_url_and_token(labelstudio_server):
    assert external_server(labelstudio_server.url + "/", labelstudio_server.token).url == labelstudio_server.url
    with pytest.raises(LabelStudioError, match="does not accept the token"):
        external_server(labelstudio_server.url, "not-the-token")


def test_a_personal_access_token_is_accepted_like_a_legacy_token(labelstudio_server):
    """Label Studio 1.23 gives users personal access tokens (JWT refresh tokens, sent as Bearer after a
    refresh); a team's server has them on by default. The SDK client speaks both."""
    server = labelstudio_server
    made = requests.post(f"{server.url}/api/token/", headers={"Authorization": f"Token {server.token}"}, timeout=30)
    assert made.status_code == 201, made.text[:300]
    pat = made.json()["token"]
    assert pat.count(".") == 2   # a JWT, not a legacy token
    refused = requests.get(f"{server.url}/api/current-user/whoami", headers={"Authorization": f"Token {pat}"},
                           timeout=30)
    assert refused.status_code == 401   # what the former urllib check sent: refused
    connected = external_server(server.url, pat)
    assert connected.client().users.whoami().email == server.username
    assert [p.title for p in connected.client().projects.list()] == [p.title for p in server.client().projects.list()]


def test_local_files_are_served_once_a_storage_covers_them(labelstudio_server, tmp_path):
    server = labelstudio_server
    folder = tmp_path / "derived"
    folder.mkdir()
    pixels = (np.arange(40 * 30) % 256).astype(np.uint8).reshape(40, 30)
    Image.fromarray(pixels).save(folder / "img.png")
    url = local_files_url(folder / "img.png", server.document_root)
    session = login(server)
    assert session.get(server.url + url, timeout=30).status_code == 404  # no storage covers it yet
    client = server.client()
    project = client.projects.create(title=f"files {os.getpid()} {tmp_path.name}")
    client.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    response = session.get(server.url + url, timeout=30)
    assert response.status_code == 200
    with Image.open(io.BytesIO(response.content)) as image:
        assert (np.asarray(image) == pixels).all()
    client.projects.delete(id=project.id)
