"""``mammo fiftyone sync|app``: the FiftyOne datasets of a dissection run, and the App with the Neuron map.

``sync`` builds or refreshes two datasets from the catalog, a dissection run (default: the newest)
and the concept store: ``mammo-patches`` (one sample per patch: thumbnail, split, lesion label, model
score, per-unit max activations, activation heatmap, unit masks) and ``mammo-neurons`` (one sample per
unit: montage of its top patches with masks, PCA coordinates, concept). Syncing again changes nothing
unless the run or the labels changed. The database is the workspace's own MongoDB (started for the
sync when no `mammo up` runs), in ``WORKSPACE/fiftyone/db``.

``app`` starts the database and the App on 127.0.0.1 with the ``@mammo/dissect`` plugin and the
layout "samples grid | Neuron map" open, prints the URL, and stops both on Ctrl-C.
"""

from __future__ import annotations

import argparse

ORDER = 70


def _sync(args: argparse.Namespace) -> int:
    from fiftyone_plugins.launch import connect_here, running_mongod, start_mongod
    from workspace.base.config import Workspace

    ws = Workspace.open(args.workspace)
    started = None
    uri = args.database_uri
    if not uri:
        running = running_mongod(ws)
        if running is None:
            started = running = start_mongod(ws)
        uri = running.url
    try:
        connect_here(ws, uri)
        from fiftyone_plugins.sync import sync_with_summary
        from workspace.dissect.dissect_run import run_or_newest

        run = run_or_newest(ws, args.run)
        _p, _n, summary = sync_with_summary(ws, run, prefix=args.prefix)
        if summary.patches_written or summary.neurons_written:
            print(f"run {run.run_id}: {summary.patches_dataset} ({summary.patches_written} patches), "
                  f"{summary.neurons_dataset} ({summary.neurons_written} units)")
        else:
            print(f"run {run.run_id}: {summary.patches_dataset} and {summary.neurons_dataset} already up to date")
        print(f"concept labels copied from the store: {summary.concepts_changed} unit(s) changed")
        if summary.reads_dataset:
            print(f"{summary.reads_dataset}: " + (f"{summary.reads_written} read mammograms" if summary.reads_written
                                                   else "already up to date"))
    finally:
        if started is not None:
            disconnect_fiftyone()
            started.stop()
    return 0


def disconnect_fiftyone() -> None:
    """Close this process's FiftyOne database connection, if it has one (before stopping its mongod: else
    FiftyOne waits 30 s for it when the process exits)."""
    import sys

    if "fiftyone" in sys.modules:
        try:
            import fiftyone.core.odm.database as fod

            fod._disconnect()
        except Exception:  # noqa: BLE001 - only the exit would be slower
            pass


def _app(args: argparse.Namespace) -> int:
    from fiftyone_plugins.launch import start_fiftyone
    from workspace.base.config import Workspace
    from workspace.base.services import serve_until_stopped

    ws = Workspace.open(args.workspace)
    services = start_fiftyone(ws, app_port=args.port, prefix=args.prefix, sync_first=not args.no_sync,
                              database_uri=args.database_uri)
    database = args.database_uri or services[0].url
    return serve_until_stopped(services, f"FiftyOne App  {services[-1].url}   (database {database}, "
                                         f"logs in {ws.logs_dir})")


def add_parser(subparsers, parents) -> None:
    p = subparsers.add_parser("fiftyone", parents=parents, help="FiftyOne datasets and the App with the Neuron map",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="fiftyone_command", metavar="ACTION", required=True)
    s = sub.add_parser("sync", parents=parents, help="build/refresh the patches and neurons datasets")
    s.add_argument("--run", help="dissection run id (default: the newest finished run)")
    s.add_argument("--prefix", default="mammo", help="dataset name prefix (default: mammo)")
    s.add_argument("--database-uri", help="MongoDB URI (default: the workspace's own database)")
    s.set_defaults(func=_sync)
    a = sub.add_parser("app", parents=parents, help="start the App on 127.0.0.1 with the Neuron map open")
    a.add_argument("--port", type=int, help="App port (default: a free one)")
    a.add_argument("--prefix", default="mammo", help="dataset name prefix (default: mammo)")
    a.add_argument("--no-sync", action="store_true", help="do not sync the newest run first")
    a.add_argument("--database-uri", help="a shared MongoDB (the team's FiftyOne database) instead of the "
                                          "workspace's own: only the App is started")
    a.set_defaults(func=_app)
