"""Run the backend under gunicorn (a production WSGI server: one gthread worker holding the model).

Binds 127.0.0.1 by default. Bound to any other address it requires HTTP basic auth (Label Studio
sends it when the backend is connected with ``auth_method="BASIC_AUTH"``): give ``auth=(user, password)``
or set ``MAMMO_BACKEND_USER`` / ``MAMMO_BACKEND_PASSWORD``.

``python -m ml_backend.serve [--workspace DIR] [--host H] [--port P]`` runs it in the foreground.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ml_backend.app import AUTH_PASSWORD_ENV, AUTH_USER_ENV, RUN_ENV, auth_from_env
from workspace.base.config import Workspace
from workspace.base.errors import MammoError
from workspace.base.services import Service, free_port, http_ok, start_service

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_THREADS = 4
START_TIMEOUT_S = 180.0


def gunicorn_command(host: str, port: int, *, threads: int = DEFAULT_THREADS, timeout: int = 600) -> list[str]:
    return [str(Path(sys.executable).with_name("gunicorn")), "--worker-class", "gthread", "--workers", "1",
            "--threads", str(threads), "--bind", f"{host}:{port}", "--timeout", str(timeout),
            "--graceful-timeout", "5", "--access-logfile", "-", "--log-level", "info",
            "ml_backend.app:create_app()"]


def check_binding(host: str, auth: tuple[str, str] | None) -> None:
    if host not in LOCAL_HOSTS and not auth:
        raise MammoError(f"the backend would listen on {host}, beyond this machine: give it a login "
                         f"({AUTH_USER_ENV} / {AUTH_PASSWORD_ENV}, or --user/--password), which Label Studio "
                         "then sends as basic auth")


def start_backend(ws: Workspace, *, host: str = "127.0.0.1", port: int | None = None,
                  auth: tuple[str, str] | None = None, run_id: str | None = None,
                  threads: int = DEFAULT_THREADS, timeout: float = START_TIMEOUT_S,
                  name: str = "ml_backend") -> Service:
    """Start the backend as a child process and wait for ``/health``; stop it with ``service.stop()``."""
    auth = auth or auth_from_env()
    check_binding(host, auth)
    port = port or free_port()
    env = {"MAMMO_WORKSPACE": str(ws.root), "PYTHONUNBUFFERED": "1"}
    if auth:
        env.update({AUTH_USER_ENV: auth[0], AUTH_PASSWORD_ENV: auth[1]})
    if run_id:
        env[RUN_ENV] = run_id
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}"

    def ready() -> bool:
        if auth:  # an unauthorised request still proves the server answers
            import urllib.error
            import urllib.request

            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                return True
            except urllib.error.HTTPError as error:
                return error.code == 401
            except OSError:
                return False
        return http_ok(f"{url}/health")

    return start_service(ws, name, gunicorn_command(host, port, threads=threads), port=port, env=env,
                         ready=ready, timeout=timeout, url=url, cwd=ws.root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml_backend.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", "-w", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--user", default=None)
    parser.add_argument("--password", default=None)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = parser.parse_args(argv)
    auth = (args.user, args.password) if args.user and args.password else auth_from_env()
    try:
        check_binding(args.host, auth)
    except MammoError as error:
        print(f"ml_backend: error: {error}", file=sys.stderr)
        return 2
    ws = Workspace.open(args.workspace)
    os.environ["MAMMO_WORKSPACE"] = str(ws.root)
    if auth:
        os.environ[AUTH_USER_ENV], os.environ[AUTH_PASSWORD_ENV] = auth
    os.execv(gunicorn_command(args.host, args.port, threads=args.threads)[0],
             gunicorn_command(args.host, args.port, threads=args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
