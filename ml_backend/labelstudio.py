"""Start and stop a Label Studio server whose data lives inside the workspace, or use an existing one.

The server is a child process (``workspace.base.services.start_service``) bound to 127.0.0.1 on a free
port, with SQLite under ``ws.labelstudio_dir`` (or a PostgreSQL database), its home/config/cache folders inside
the workspace, analytics, Sentry and update checks off, and Local Files serving over ``document_root`` (images
are then served under ``/data/local-files/?d=<path relative to document_root>``). It is created the way a team's
server is, with Label Studio's defaults: legacy API tokens off. The bootstrap reader logs in once, as on the login
page, and makes a personal access token (:func:`personal_access_token`), kept with the login in the workspace.

A first start on a fresh database migrates for 1 to 2 minutes; later starts take about 10 s
(`bench/bench_services.py`: 74 s and 10 s on 2 shared cores; see bench/RESULTS.md).

A team's existing Label Studio (e.g. on PostgreSQL) is used instead through :func:`external_server`
(URL + token), remembered in the workspace by :func:`save_external`.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from workspace.base.config import Workspace
from workspace.base.errors import MammoError
from workspace.base.services import Service, free_port, http_ok, start_service

CREDENTIALS_FILE = "credentials.json"
EXTERNAL_FILE = "external.json"
DEFAULT_USERNAME = "reader@mammo.local"
START_TIMEOUT_S = 420.0


class LabelStudioError(MammoError):
    """Label Studio could not be started, reached, or did not accept a request."""


@dataclass
class LabelStudioServer:
    """A Label Studio server we can talk to: its URL, API token and login (``service`` when we started it)."""

    url: str
    token: str
    username: str = ""
    password: str = ""
    service: Service | None = None
    document_root: Path | None = None
    workspace: Workspace | None = None   # whose credentials keep the login and token (a server started here)

    @property
    def started_here(self) -> bool:
        return self.service is not None

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    def client(self):
        """A ``label_studio_sdk.LabelStudio`` client for this server."""
        return sdk_client(self.url, self.token)


def sdk_client(url: str, token: str, timeout: float = 120.0):
    """A ``label_studio_sdk.LabelStudio`` client: every call to Label Studio goes through one. The SDK sends a
    legacy API token as ``Token`` and a personal access token (a JWT refresh token, the default in Label Studio
    1.23 organisations) as a ``Bearer`` access token it refreshes itself."""
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url, api_key=token, timeout=timeout)


def credentials(ws: Workspace) -> dict[str, str]:
    """The workspace's Label Studio login, made once and kept (mode 0600) in the workspace, with its API token
    (``token``) once the server has made one."""
    path = ws.labelstudio_dir / CREDENTIALS_FILE
    if path.exists():
        return json.loads(path.read_text())
    return _save_credentials(ws, {"username": DEFAULT_USERNAME, "password": secrets.token_urlsafe(12)})


def _save_credentials(ws: Workspace, data: dict[str, str]) -> dict[str, str]:
    path = ws.labelstudio_dir / CREDENTIALS_FILE
    ws.labelstudio_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return data


def database_env(database: str | None) -> dict[str, str]:
    """Label Studio's database settings for ``database``: None for SQLite in its data folder, or a
    ``postgresql://user:password@host:port/name`` URL (the password reaches the server through its environment)."""
    if not database:
        return {"DJANGO_DB": "sqlite"}
    parts = urlsplit(database)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise LabelStudioError(f"{database.split('@')[-1]!r}: expected postgresql://user:password@host:port/name")
    return {"DJANGO_DB": "default", "POSTGRE_HOST": parts.hostname, "POSTGRE_PORT": str(parts.port or 5432),
            "POSTGRE_NAME": parts.path.lstrip("/") or "postgres", "POSTGRE_USER": unquote(parts.username or "postgres"),
            "POSTGRE_PASSWORD": unquote(parts.password or "")}


def server_env(ws: Workspace, *, port: int, data_dir: Path, document_root: Path,
               creds: dict[str, str], database: str | None = None) -> dict[str, str]:
    """Every environment variable the server needs (see DESIGN.md, "Running the real services here")."""
    host = f"http://127.0.0.1:{port}"
    home = data_dir / "home"
    return {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_HOST": host,
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_USERNAME": creds["username"],
        "LABEL_STUDIO_PASSWORD": creds["password"],
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        # the backend runs on 127.0.0.1: let the server reach it
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "CSRF_TRUSTED_ORIGINS": host,
        "PYTHONUNBUFFERED": "1",
        **database_env(database),
    }


def _api_ok(url: str, token: str, timeout: float = 3.0) -> bool:
    """True when the API answers an authenticated request (the server is migrated and the user exists), with
    a legacy token or a personal access token."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        sdk_client(url, token, timeout).users.whoami()
        return True
    except (ApiError, httpx.HTTPError, OSError, ValueError):  # refused, unreachable, or an expired JWT
        return False


def personal_access_token(url: str, email: str, password: str, *, replace: bool = False,
                          timeout: float = 60.0) -> str:
    """Log in as a reader does (the login form, with its CSRF cookie) and make the reader's personal access token
    (``POST /api/token/``). Label Studio keeps one per user: when one exists it says so, unless ``replace``, which
    revokes the user's tokens first, as Account & Settings does."""
    import httpx

    with httpx.Client(base_url=url, timeout=timeout) as http:
        try:
            http.get("/user/login/")
            login = http.post("/user/login/", headers={"Referer": f"{url}/user/login/"},
                              data={"email": email, "password": password,
                                    "csrfmiddlewaretoken": http.cookies.get("csrftoken", "")})
            if login.status_code not in (302, 303):
                raise LabelStudioError(f"Label Studio at {url} refused the login of {email} (HTTP {login.status_code})")
            form = {"X-CSRFToken": http.cookies.get("csrftoken", ""), "Referer": f"{url}/"}
            if replace:   # the listing shows each token truncated, which is what revoking takes
                for kept in http.get("/api/token/").json():
                    http.post("/api/token/blacklist/", headers=form, json={"refresh": kept["token"]})
            made = http.post("/api/token/", headers=form)
        except httpx.HTTPError as error:
            raise LabelStudioError(f"Label Studio at {url} did not answer: {error}") from error
    if made.status_code != 201:
        raise LabelStudioError(f"Label Studio at {url} made no personal access token for {email}: HTTP "
                               f"{made.status_code} {made.text[:200]}")
    return made.json()["token"]


def launch(ws: Workspace, *, port: int | None = None, data_dir: Path | None = None,
           document_root: Path | None = None, database: str | None = None, name: str = "labelstudio",
           timeout: float = START_TIMEOUT_S, wait: bool = True) -> LabelStudioServer:
    """Start a Label Studio server (data in ``data_dir``, default ``ws.labelstudio_dir``) and wait for its API.

    ``document_root`` (default: the workspace root) is the folder Local Files storage may serve from;
    ``database`` a PostgreSQL URL (:func:`database_env`; default SQLite in ``data_dir``).
    ``wait=False`` returns as soon as the process runs, without a token yet; call :func:`wait_ready` later (the
    first start migrates a new database for 1 to 2 minutes, which can overlap other work).
    """
    port = port or free_port()
    data_dir = Path(data_dir or ws.labelstudio_dir)
    document_root = Path(document_root or ws.root).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    creds = credentials(ws)
    url = f"http://127.0.0.1:{port}"
    env = server_env(ws, port=port, data_dir=data_dir, document_root=document_root, creds=creds, database=database)
    # the login reaches the server through its environment (LABEL_STUDIO_USERNAME, _PASSWORD: server_env), never
    # on its command line, which every user of the machine can read in `ps`
    command = [str(Path(sys.executable).with_name("label-studio")), "start", "--no-browser",
               "--internal-host", "127.0.0.1", "--port", str(port), "--host", url]
    # /health answers once the database is migrated and the bootstrap user made
    ready = (lambda: http_ok(f"{url}/health/")) if wait else (lambda: True)
    try:
        service = start_service(ws, name, command, port=port, env=env, ready=ready, timeout=timeout,
                                url=url, cwd=data_dir)
    except MammoError as error:
        raise LabelStudioError(f"Label Studio did not start: {error}") from error
    server = LabelStudioServer(url=url, token="", username=creds["username"], password=creds["password"],
                               service=service, document_root=document_root, workspace=ws)
    return _with_token(server) if wait else server


def _with_token(server: LabelStudioServer) -> LabelStudioServer:
    """The server with the workspace's API token: the one kept, while the server accepts it, else a new personal
    access token for the workspace's reader (replacing a lost one; kept for the next start)."""
    ws = server.workspace
    creds = credentials(ws)
    token = creds.get("token", "")
    if not (token and _api_ok(server.url, token, timeout=30.0)):
        token = personal_access_token(server.url, creds["username"], creds["password"], replace=True)
        _save_credentials(ws, {**creds, "token": token})
    server.token = token
    return server


def wait_ready(server: LabelStudioServer, timeout: float = START_TIMEOUT_S) -> LabelStudioServer:
    """Block until the server answers (or raise, with the log's tail); a server started here gets its token."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.service is not None and http_ok(f"{server.url}/health/"):
            return _with_token(server)
        if server.service is None and _api_ok(server.url, server.token):
            return server
        if server.service is not None and not server.service.alive():
            raise LabelStudioError(f"Label Studio exited while starting; see {server.service.log_path}:\n"
                                   f"{server.service.log_tail()}")
        time.sleep(0.5)
    tail = server.service.log_tail() if server.service else ""
    if server.service is not None:
        server.service.stop()
    raise LabelStudioError(f"Label Studio at {server.url} did not answer within {timeout:.0f} s\n{tail}")


def external_server(url: str, token: str, *, document_root: Path | None = None) -> LabelStudioServer:
    """An existing Label Studio (URL + API token), checked once; nothing is started or stopped."""
    url = url.rstrip("/")
    if not _api_ok(url, token, timeout=10.0):
        raise LabelStudioError(f"Label Studio at {url} does not accept the token (or does not answer): "
                               "check the URL and the token (Account & Settings > Personal Access Token, or a "
                               "legacy API token)")
    return LabelStudioServer(url=url, token=token, document_root=document_root)


def save_external(ws: Workspace, url: str, token: str, document_root: str | None = None) -> Path:
    """Remember an existing Label Studio for this workspace (``mammo up`` then uses it instead of starting one)."""
    ws.labelstudio_dir.mkdir(parents=True, exist_ok=True)
    path = ws.labelstudio_dir / EXTERNAL_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url.rstrip("/"), "token": token, "document_root": document_root}))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def saved_external(ws: Workspace) -> dict | None:
    path = ws.labelstudio_dir / EXTERNAL_FILE
    return json.loads(path.read_text()) if path.exists() else None


__all__ = ["LabelStudioServer", "LabelStudioError", "sdk_client", "credentials", "database_env", "server_env",
           "personal_access_token", "launch", "wait_ready",
           "external_server", "save_external", "saved_external"]
