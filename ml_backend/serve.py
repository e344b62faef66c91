"""Run the backend under gunicorn (a production WSGI server: one gthread worker holding the model).

Binds 127.0.0.1 by default. Bound to any other address it requires HTTP basic auth (Label Studio
sends it when the backend is connected with ``auth_method="BASIC_AUTH"``): give ``auth=(user, password)``
or set ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS`` (or ``BASIC_AUTH_PASS_FILE``; :mod:`ml_backend.settings`
lists every setting). ``WORKERS`` / ``THREADS`` size gunicorn, ``LOG_LEVEL`` its log.

``python -m ml_backend.serve [--workspace DIR] [--host H] [--port P] [--user U --password-file F]`` runs it
in the foreground.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ml_backend import settings
from ml_backend.app import AUTH_PASSWORD_ENV, AUTH_USER_ENV, RUN_ENV, auth_from_env
from workspace.base.config import Workspace
from workspace.base.errors import MammoError
from workspace.base.services import Service, free_port, http_ok, start_service

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_THREADS = 4
START_TIMEOUT_S = 180.0


def gunicorn_command(host: str, port: int, *, threads: int | None = None, workers: int | None = None,
                     timeout: int = 600) -> list[str]:
    """gunicorn's command line: gthread workers (each holds the model), ``threads`` per worker; both default
    to ``THREADS`` / ``WORKERS`` from the environment, else 4 threads in 1 worker."""
    threads = threads or settings.count(settings.THREADS, DEFAULT_THREADS)
    workers = workers or settings.count(settings.WORKERS, 1)
    return [str(Path(sys.executable).with_name("gunicorn")), "--worker-class", "gthread", "--workers", str(workers),
            "--threads", str(threads), "--bind", f"{host}:{port}", "--timeout", str(timeout),
            "--graceful-timeout", "5", "--access-logfile", "-", "--log-level", settings.log_level().lower(),
            "ml_backend.app:create_app()"]


def check_binding(host: str, auth: tuple[str, str] | None) -> None:
    if host not in LOCAL_HOSTS and not auth:
        raise MammoError(f"the backend would listen on {host}, beyond this machine: give it a login "
                         "(BASIC_AUTH_USER / BASIC_AUTH_PASS, or --user with --password-file), which Label Studio "
                         "then sends as basic auth")


def start_backend(ws: Workspace, *, host: str = "127.0.0.1", port: int | None = None,
                  auth: tuple[str, str] | None = None, run_id: str | None = None,
                  threads: int | None = None, timeout: float = START_TIMEOUT_S,
                  labelstudio: tuple[str, str] | None = None, name: str = "ml_backend") -> Service:
    """Start the backend as a child process and wait for ``/health``; stop it with ``service.stop()``.
    ``labelstudio`` is Label Studio's URL and API token (to name readers and write answers back), passed through
    the environment like the basic-auth login."""
    auth = auth or auth_from_env()
    check_binding(host, auth)
    port = port or free_port()
    env = {"MAMMO_WORKSPACE": str(ws.root), "PYTHONUNBUFFERED": "1"}
    if auth:
        env.update({AUTH_USER_ENV: auth[0], AUTH_PASSWORD_ENV: auth[1]})
    if labelstudio:
        env.update({settings.LABEL_STUDIO_URL[0]: labelstudio[0], settings.LABEL_STUDIO_API_KEY[0]: labelstudio[1]})
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
    parser.add_argument("--user", default=None, help="basic-auth user (or BASIC_AUTH_USER)")
    parser.add_argument("--password-file", default=None, type=Path,
                        help="a file whose first line is the basic-auth password (or BASIC_AUTH_PASS[_FILE]); "
                             "never a flag: `ps` shows every process's arguments")
    parser.add_argument("--threads", type=int, default=None, help=f"threads (or THREADS; default {DEFAULT_THREADS})")
    parser.add_argument("--workers", type=int, default=None, help="gunicorn workers (or WORKERS; default 1)")
    args = parser.parse_args(argv)
    try:
        password = settings.secret_file(args.password_file)
        auth = (args.user, password) if args.user and password else auth_from_env()
    except MammoError as error:
        print(f"ml_backend: error: {error}", file=sys.stderr)
        return 2
    try:
        check_binding(args.host, auth)
    except MammoError as error:
        print(f"ml_backend: error: {error}", file=sys.stderr)
        return 2
    ws = Workspace.open(args.workspace)
    os.environ["MAMMO_WORKSPACE"] = str(ws.root)
    if auth:
        os.environ[AUTH_USER_ENV], os.environ[AUTH_PASSWORD_ENV] = auth
    command = gunicorn_command(args.host, args.port, threads=args.threads, workers=args.workers)
    os.execv(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
