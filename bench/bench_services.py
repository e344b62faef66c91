"""Benchmark (not a test): how long the services `mammo up` starts take to answer.

    .venv/bin/python bench/bench_services.py [--json OUT.json]

In a throw-away workspace, through the same functions `mammo up` calls (child processes on free
127.0.0.1 ports, stopped by PID), times from the start of the process to its first good answer:

- Label Studio, first start on a fresh database (``ml_backend.labelstudio.launch``: migrations, the
  bootstrap user; until ``/api/current-user/whoami`` accepts the token), then a second start on the
  same database;
- our own mongod (``fiftyone_plugins.launch.start_mongod``: until the port accepts connections);
- the FiftyOne App (``fiftyone_plugins.launch.start_app`` on no dataset: until ``/fiftyone`` answers).

Numbers go to bench/RESULTS.md by hand (with the machine and the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MAMMO_QUIET", "1")


def timed(start, *args, **kwargs):
    """(seconds until ``start(...)`` returned a ready service, the service)."""
    t0 = time.perf_counter()
    service = start(*args, **kwargs)
    return round(time.perf_counter() - t0, 2), service


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the numbers here too")
    args = parser.parse_args(argv)

    from fiftyone_plugins.launch import start_app, start_mongod
    from ml_backend.labelstudio import launch
    from workspace.base.config import Workspace

    root = Path(tempfile.mkdtemp(prefix="mammo-bench-services-"))
    results: dict = {"cpu_count": os.cpu_count()}
    try:
        ws = Workspace.open(root / "ws")
        for key in ("labelstudio_first_start_s", "labelstudio_second_start_s"):
            seconds, server = timed(launch, ws)
            server.stop()
            results[key] = seconds
            print(f"{key}: {seconds} s", flush=True)
        seconds, mongod = timed(start_mongod, ws)
        results["mongod_start_s"] = seconds
        print(f"mongod_start_s: {seconds} s", flush=True)
        try:
            seconds, app = timed(start_app, ws, db_uri=mongod.url)
            app.stop()
            results["fiftyone_app_start_s"] = seconds
            print(f"fiftyone_app_start_s: {seconds} s", flush=True)
        finally:
            mongod.stop()
        results["load_average"] = os.getloadavg()
        print(json.dumps(results, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
