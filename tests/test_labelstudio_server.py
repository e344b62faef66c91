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
from workspace.app.demo_check import ls_request

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


def test_server_runs_inside_its_folder_on_postgresql_with_telemetry_off(labelstudio_server):
    server = labelstudio_server
    assert server.url.startswith("http://127.0.0.1:")
    env = _environ(server.service.pid)
    data_dir = Path(env["LABEL_STUDIO_BASE_DATA_DIR"])
    for key in ("HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        assert Path(env[key]).is_relative_to(data_dir), key
    assert env["SENTRY_DSN"] == "" and env["FRONTEND_SENTRY_DSN"] == ""
    assert env["COLLECT_ANALYTICS"] == "false" and env["LATEST_VERSION_CHECK"] == "false"
    # its data is in PostgreSQL, not in a SQLite file
    assert env["DJANGO_DB"] == "default" and env["POSTGRE_HOST"] == "127.0.0.1" and env["POSTGRE_NAME"] == "labelstudio"
    assert not (data_dir / "label_studio.sqlite3").exists()
    # the reader's password, its token and the database's password are in the server's environment or nowhere,
    # not on its command line (`ps` shows that)
    command_line = Path(f"/proc/{server.service.pid}/cmdline").read_bytes().decode()
    for secret in (server.password, server.token, env["POSTGRE_PASSWORD"]):
        assert secret not in command_line
    assert env["LABEL_STUDIO_PASSWORD"] == server.password
    assert "LABEL_STUDIO_USER_TOKEN" not in env and "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN" not in env
    assert server.client().users.whoami().email == server.username


def test_created_the_default_way_it_takes_personal_access_tokens_only(labelstudio_server):
    """Label Studio 1.23 creates organisations with legacy API tokens off; users get personal access tokens (JWT
    refresh tokens, sent as Bearer after a refresh). The SDK client speaks them; a ``Token`` header is refused."""
    server = labelstudio_server
    assert server.token.count(".") == 2   # a JWT, not a legacy token
    settings = ls_request(server, "GET", "/api/jwt/settings")
    assert settings["legacy_api_tokens_enabled"] is False and settings["api_tokens_enabled"] is True
    refused = requests.get(f"{server.url}/api/current-user/whoami", headers={"Authorization": f"Token {server.token}"},
                           timeout=30)
    assert refused.status_code == 401   # what the former urllib check sent: refused
    # the legacy token Label Studio still makes for every user, which /setup sends to a backend: refused too
    legacy = login(server).get(f"{server.url}/api/current-user/token", timeout=30)
    assert legacy.status_code == 200, legacy.text[:300]
    refused = requests.get(f"{server.url}/api/current-user/whoami", timeout=30,
                           headers={"Authorization": f"Token {legacy.json()['token']}"})
    assert refused.status_code == 401
    connected = external_server(server.url, server.token)
    assert connected.client().users.whoami().email == server.username


def test_existing_server_is_checked_by_url_and_token(labelstudio_server):
    assert external_server(labelstudio_server.url + "/", labelstudio_server.token).url == labelstudio_server.url
    with pytest.raises(LabelStudioError, match="does not accept the token"):
        external_server(labelstudio_server.url, "not-the-token")


def test_a_restart_keeps_the_token_and_replaces_a_stale_one(labelstudio_server, tmp_path):
    """``launch`` keeps the reader's personal access token with the login. Label Studio keeps one token per user:
    a workspace whose kept token the server no longer accepts gets a new one (the old one revoked) by logging in
    as the reader would. A second server on the same PostgreSQL database plays the restart, for a second reader
    (signed up as a team member is) so that the run's token stays as it is."""
    import json

    from ml_backend.labelstudio import _api_ok, credentials, launch, personal_access_token
    from tests.fixtures.labelstudio import sign_up
    from workspace.base.config import Workspace

    server = labelstudio_server
    with pytest.raises(LabelStudioError, match="refused the login"):
        personal_access_token(server.url, server.username, "not-the-password")
    with pytest.raises(LabelStudioError, match="already have a valid token"):
        personal_access_token(server.url, server.username, server.password)
    assert credentials(server.workspace)["token"] == server.token
    reader = sign_up(server, f"restart-{tmp_path.name}@clinic.example", "a-long-password-1")
    env = _environ(server.service.pid)
    database = (f"postgresql://{env['POSTGRE_USER']}:{env['POSTGRE_PASSWORD']}@{env['POSTGRE_HOST']}:"
                f"{env['POSTGRE_PORT']}/{env['POSTGRE_NAME']}")
    ws = Workspace.open(tmp_path / "ws")
    ws.labelstudio_dir.mkdir(parents=True, exist_ok=True)
    (ws.labelstudio_dir / "credentials.json").write_text(json.dumps(
        {"username": reader.username, "password": reader.password, "token": reader.token[:-6] + "AAAAAA"}))
    second = launch(ws, document_root=server.document_root, database=database)
    try:
        assert second.token not in (reader.token, server.token) and second.token.count(".") == 2
        assert credentials(ws)["token"] == second.token
        assert second.client().users.whoami().email == reader.username
        assert not _api_ok(server.url, reader.token)   # the reader's former token: revoked
        assert _api_ok(server.url, server.token)       # another reader's: untouched
    finally:
        second.stop()


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
