"""``mammo ls up|provision|status|connect``: the Label Studio side of the workspace.

- ``up``: start Label Studio (data in ``WORKSPACE/labelstudio``) and the ML backend on 127.0.0.1,
  provision the projects, print the URL and the login, and stay up until Ctrl-C (then stop both).
- ``provision``: make or update the projects ("Screening reads", "Patch review") on the server that
  ``mammo up`` / ``mammo ls up`` is running (or the one saved with ``connect``), idempotently.
- ``status``: the services, projects and annotations received.
- ``connect URL [--token-file F]`` (token from the file or ``LABEL_STUDIO_API_KEY``): use an existing Label Studio (e.g. a team's, on PostgreSQL) instead of
  starting one; ``--document-root`` is that server's LOCAL_FILES_DOCUMENT_ROOT (the workspace must be
  under it).
"""

from __future__ import annotations

import argparse

from workspace.app.commands.up import (
    add_backend_options,
    add_service_options,
    backend_auth,
    bring_everything_up,
)

ORDER = 80


def _up(args: argparse.Namespace) -> int:
    from workspace.base.config import Workspace

    return bring_everything_up(Workspace.open(args.workspace), args)   # `mammo up` without FiftyOne


def _running_server(ws):
    """The Label Studio that ``up`` recorded (alive), or the saved existing one."""
    from ml_backend.labelstudio import LabelStudioServer, credentials, external_server, saved_external
    from workspace.base.errors import MammoError
    from workspace.base.services import recorded_services

    saved = saved_external(ws)
    if saved:
        from pathlib import Path

        return external_server(saved["url"], saved["token"],
                               document_root=Path(saved["document_root"]) if saved.get("document_root") else ws.root)
    service = recorded_services(ws).get("labelstudio")
    if service is None or not service.alive():
        raise MammoError("no Label Studio is running for this workspace: start one with `mammo up` "
                         "(or `mammo ls connect URL` with LABEL_STUDIO_API_KEY set, for an existing one)")
    creds = credentials(ws)
    return LabelStudioServer(url=service.url, token=creds["token"], username=creds["username"],
                             password=creds["password"], document_root=ws.root)


def _provision(args: argparse.Namespace) -> int:
    from ml_backend.provision import KINDS, provision
    from workspace.base.config import Workspace
    from workspace.base.errors import MammoError
    from workspace.base.services import recorded_services

    ws = Workspace.open(args.workspace)
    server = _running_server(ws)
    backend_url = args.backend_url
    if not backend_url:
        backend = recorded_services(ws).get("ml_backend")
        if backend is None or not backend.alive():
            raise MammoError("no ML backend is running for this workspace (start it with `mammo up`), "
                             "or give --backend-url")
        backend_url = backend.url
    result = provision(ws, server, backend_url=backend_url, backend_auth=backend_auth(args),
                       kinds=tuple(args.kind) if args.kind else KINDS)
    for project in result.projects.values():
        print(f"{project.title}: {server.url}/projects/{project.project_id}  {project.tasks_total} tasks "
              f"({project.tasks_added} new)")
    for skipped in result.skipped:
        print(f"skipped {skipped}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from ml_backend.provision import remembered
    from workspace.base.catalog import open_catalog
    from workspace.base.config import Workspace
    from workspace.base.services import recorded_services

    ws = Workspace.open(args.workspace)
    for name, service in recorded_services(ws).items():
        print(f"{name:12s} {'up  ' if service.alive() else 'down'}  {service.url}  (pid {service.pid}, log {service.log_path})")
    projects = remembered(ws)
    if projects:
        for project in projects["projects"].values():
            print(f"{project['title']}: {projects['url']}/projects/{project['project_id']}  {project['tasks_total']} tasks")
    db = open_catalog(ws)
    counts = {r["action"]: r["n"] for r in db.query(
        "SELECT action, COUNT(*) AS n FROM ls_annotations GROUP BY action ORDER BY action")}
    print("annotations received: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))
    return 0


def _connect(args: argparse.Namespace) -> int:
    from ml_backend.labelstudio import external_server, save_external
    from workspace.app.commands.up import labelstudio_token
    from workspace.base.config import Workspace
    from workspace.base.errors import MammoError

    token = labelstudio_token(args, "token_file")
    if not token:
        raise MammoError("give the API token in a file (--token-file F) or in LABEL_STUDIO_API_KEY: a token on the "
                         "command line would show in `ps`")
    ws = Workspace.open(args.workspace)
    server = external_server(args.url, token)
    path = save_external(ws, server.url, token, args.document_root)
    print(f"this workspace now uses the Label Studio at {server.url} (saved in {path})")
    return 0


def add_parser(subparsers, parents) -> None:
    p = subparsers.add_parser("ls", parents=parents, help="Label Studio: start, provision, status",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="ls_command", metavar="ACTION", required=True)
    up = sub.add_parser("up", parents=parents, help="start Label Studio and the backend, provision, wait for Ctrl-C")
    add_service_options(up, fiftyone=False)
    up.set_defaults(func=_up, no_fiftyone=True)
    prov = sub.add_parser("provision", parents=parents, help="make or update the projects (idempotent)")
    prov.add_argument("--kind", action="append", choices=["screening", "patch_review"])
    add_backend_options(prov)
    prov.set_defaults(func=_provision)
    status = sub.add_parser("status", parents=parents, help="services, projects and annotations received")
    status.set_defaults(func=_status)
    # no abbreviations: the removed --token must be refused, not taken for --token-file
    connect = sub.add_parser("connect", parents=parents, help="use an existing Label Studio (URL + token)",
                             allow_abbrev=False)
    connect.add_argument("url")
    connect.add_argument("--token-file", metavar="FILE",
                         help="a file holding the API token (or LABEL_STUDIO_API_KEY, LABEL_STUDIO_API_KEY_FILE)")
    connect.add_argument("--document-root", help="that server's LOCAL_FILES_DOCUMENT_ROOT")
    connect.set_defaults(func=_connect)
