"""``mammo up``: start everything a reader and a curator use, on 127.0.0.1, and stop it on Ctrl-C.

Starts the ML backend (the model and the newest dissection run, loaded once), a Label Studio server
whose data lives in ``WORKSPACE/labelstudio`` (SQLite; analytics and update checks off; re-running
reuses it), provisions the projects, then the FiftyOne App when the FiftyOne side is installed, and
prints the URLs and the login. Ctrl-C stops every process it started, by PID.

An existing Label Studio (a team's, on PostgreSQL...) is used instead of starting one when given
with ``--labelstudio-url`` (token in ``LABEL_STUDIO_API_KEY`` or ``--labelstudio-token-file``) or saved with
``mammo ls connect``.
"""

from __future__ import annotations

import argparse

ORDER = 90


def start_fiftyone_hook(ws):
    """The FiftyOne side's start function (``fiftyone_plugins.launch.start_fiftyone(ws) -> [Service]``), or
    None when it is not there."""
    try:
        from fiftyone_plugins.launch import start_fiftyone
    except ImportError:
        return None
    return start_fiftyone


def _run(args: argparse.Namespace) -> int:
    from workspace.base.config import Workspace

    return bring_everything_up(Workspace.open(args.workspace), args)


def bring_everything_up(ws, args: argparse.Namespace) -> int:
    """Start the stack for ``ws`` with the service options of :func:`add_service_options`; block until Ctrl-C."""
    from ml_backend.stack import bring_up, describe

    stack = bring_up(ws, **stack_options(args))
    try:
        lines = [describe(stack)]
        start_fiftyone = None if args.no_fiftyone else start_fiftyone_hook(ws)
        if start_fiftyone is not None:
            fo_services = list(start_fiftyone(ws) or [])
            stack.services.extend(fo_services)
            for service in fo_services:
                if service.url and service.name not in ("mongod",):
                    lines.append(f"FiftyOne      {service.url}")
    except BaseException:
        stack.stop()
        raise
    return stack.serve("\n".join(lines))


def add_parser(subparsers, parents) -> None:
    p = subparsers.add_parser("up", parents=parents, help="start Label Studio, the backend and FiftyOne; Ctrl-C stops",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_service_options(p)
    p.set_defaults(func=_run)


def add_backend_options(p: argparse.ArgumentParser) -> None:
    """How Label Studio reaches the backend: its basic-auth login and URL (see :func:`backend_auth`)."""
    p.add_argument("--backend-user", help="basic-auth user of the backend (required when it binds beyond 127.0.0.1; "
                                          "or BASIC_AUTH_USER)")
    p.add_argument("--backend-password-file", metavar="FILE",
                   help="a file whose first line is the backend's basic-auth password (or BASIC_AUTH_PASS, "
                        "BASIC_AUTH_PASS_FILE): no password flag, since `ps` shows every process's arguments")
    p.add_argument("--backend-url", help="the backend's URL as Label Studio reaches it (default: where it runs)")


def add_service_options(p: argparse.ArgumentParser, *, fiftyone: bool = True) -> None:
    """The options of ``mammo up`` (shared with ``mammo demo``, and without ``--no-fiftyone`` with ``mammo ls up``);
    :func:`stack_options` turns them into ``bring_up`` keywords."""
    p.add_argument("--port", type=int, help="Label Studio port (default 8080 when free)")
    p.add_argument("--backend-host", default="127.0.0.1",
                   help="address the backend binds (beyond 127.0.0.1 it needs a login: BASIC_AUTH_USER/BASIC_AUTH_PASS)")
    p.add_argument("--backend-port", type=int, help="backend port (default 9090 when free)")
    add_backend_options(p)
    p.add_argument("--labelstudio-url", help="use this existing Label Studio instead of starting one")
    p.add_argument("--labelstudio-token-file", metavar="FILE",
                   help="a file holding its API token (or LABEL_STUDIO_API_KEY, LABEL_STUDIO_API_KEY_FILE)")
    if fiftyone:
        p.add_argument("--no-fiftyone", action="store_true", help="do not start the FiftyOne App")


def backend_auth(args: argparse.Namespace | None) -> tuple[str, str] | None:
    """(user, password) of the backend from the options or the environment (``ml_backend.settings``), else None."""
    from ml_backend import settings

    user = getattr(args, "backend_user", None) or settings.setting(settings.AUTH_USER)
    password = settings.secret_file(getattr(args, "backend_password_file", None)) or settings.secret(settings.AUTH_PASSWORD)
    return (user, password) if user and password else None


def labelstudio_token(args: argparse.Namespace | None, option: str = "labelstudio_token_file") -> str | None:
    """An existing Label Studio's API token: from the option's file, else ``LABEL_STUDIO_API_KEY[_FILE]``."""
    from ml_backend import settings

    return settings.secret_file(getattr(args, option, None)) or settings.secret(settings.LABEL_STUDIO_API_KEY)


def stack_options(args: argparse.Namespace | None) -> dict:
    """``ml_backend.stack.bring_up`` keywords from the options of :func:`add_service_options` (an absent
    option, or ``args=None``, keeps ``bring_up``'s default)."""
    if args is None:
        return {}
    url = getattr(args, "labelstudio_url", None)
    options = {"ls_url": url, "ls_token": labelstudio_token(args) if url else None,
               "ls_port": getattr(args, "port", None), "backend_port": getattr(args, "backend_port", None),
               "backend_url": getattr(args, "backend_url", None), "backend_auth": backend_auth(args)}
    if getattr(args, "backend_host", None):
        options["backend_host"] = args.backend_host
    return options
