"""Bring the reading stack up: Label Studio (started here, or an existing one), the backend, the projects.

Used by ``mammo up`` and ``mammo ls up``. Every process is a child started by
``workspace.base.services.start_service`` on 127.0.0.1 and is stopped by PID (:meth:`Stack.stop`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ml_backend.labelstudio import LabelStudioServer, external_server, launch, saved_external
from ml_backend.provision import KINDS, ProvisionResult, provision
from workspace.base.config import Workspace
from workspace.base.services import Service, port_open, serve_until_stopped, stop_all

PREFERRED_LS_PORT = 8080
PREFERRED_BACKEND_PORT = 9090


def _port(preferred: int | None, fallback: int) -> int | None:
    """The port asked for; else the usual one when free (stable URLs across runs); else any free one."""
    if preferred:
        return preferred
    return None if port_open("127.0.0.1", fallback) else fallback


@dataclass
class Stack:
    ws: Workspace
    server: LabelStudioServer
    backend: Service
    provisioned: ProvisionResult | None
    services: list[Service] = field(default_factory=list)   # everything started here, in start order

    def stop(self) -> None:
        stop_all(self.services)

    def serve(self, banner: str) -> int:
        """Print ``banner``, block until Ctrl-C (0) or until a service dies (1, with its log tail); stop all."""
        return serve_until_stopped(self.services, banner)


def resolve_server(ws: Workspace, *, url: str | None = None, token: str | None = None,
                   document_root: str | None = None, port: int | None = None) -> LabelStudioServer:
    """An existing Label Studio (given, or saved with ``mammo ls connect``), or a new one started here."""
    saved = saved_external(ws) if not url else None
    if url or saved:
        url = url or saved["url"]
        token = token or (saved or {}).get("token")
        root = document_root or (saved or {}).get("document_root")
        if not token:
            from workspace.base.errors import MammoError

            raise MammoError("an existing Label Studio needs its API token (LABEL_STUDIO_API_KEY or --labelstudio-token-file)")
        return external_server(url, token, document_root=Path(root) if root else ws.root)
    return launch(ws, port=_port(port, PREFERRED_LS_PORT))


def bring_up(ws: Workspace, *, ls_url: str | None = None, ls_token: str | None = None,
             ls_document_root: str | None = None, ls_port: int | None = None,
             backend_host: str = "127.0.0.1", backend_port: int | None = None,
             backend_auth: tuple[str, str] | None = None, backend_url: str | None = None,
             kinds: tuple[str, ...] = KINDS, do_provision: bool = True) -> Stack:
    """Start (or reach) Label Studio, start the backend, provision the projects; stop what was started
    here if any step fails."""
    from ml_backend.serve import start_backend

    started: list[Service] = []
    try:
        server = resolve_server(ws, url=ls_url, token=ls_token, document_root=ls_document_root, port=ls_port)
        if server.service is not None:
            started.append(server.service)
        # the backend gets Label Studio's URL and token: the token /setup sends is refused by default (settings)
        backend = start_backend(ws, host=backend_host, port=_port(backend_port, PREFERRED_BACKEND_PORT),
                                auth=backend_auth, labelstudio=(server.url, server.token))
        started.append(backend)
        result = None
        if do_provision:
            result = provision(ws, server, backend_url=backend_url or backend.url, backend_auth=backend_auth,
                               kinds=kinds)
    except BaseException:
        for service in reversed(started):
            service.stop()
        raise
    return Stack(ws=ws, server=server, backend=backend, provisioned=result, services=started)


def describe(stack: Stack) -> str:
    """What to print for the user: where to go and how to log in."""
    lines = [f"Label Studio  {stack.server.url}"]
    if stack.server.username:
        lines.append(f"  login       {stack.server.username} / {stack.server.password}")
    lines.append(f"ML backend    {stack.backend.url}")
    if stack.provisioned:
        for project in stack.provisioned.projects.values():
            lines.append(f"  {project.title}: {stack.server.url}/projects/{project.project_id}  "
                         f"({project.tasks_total} tasks, {project.tasks_added} new)")
        for skipped in stack.provisioned.skipped:
            lines.append(f"  skipped {skipped}")
    return "\n".join(lines)


__all__ = ["Stack", "bring_up", "resolve_server", "describe"]
