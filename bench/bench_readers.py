"""Benchmark (not a test): N readers asking about ROIs at the same time, through a real Label Studio.

    .venv/bin/python bench/bench_readers.py [--patients 10] [--readers 1 8] [--asks 15] [--keep DIR]
                                            [--threads T] [--json OUT.json]

Builds a throw-away workspace as ``bench/bench_roundtrip.py`` does (synthetic full-size mammograms, the
shipped model, a dissection run), starts a real Label Studio and the real backend (gunicorn, ``--threads``
per worker, default the backend's), provisions "Screening reads" and asks one ROI on every task so that
every image is read and its patch masks are built (the cached state a reading session reaches). Then, for
each N of ``--readers``, N threads play readers: each sends ``--asks`` ROIs (a random disk in the breast
of a random task) to ``POST /api/ml/{id}/interactive-annotating`` as the UI does, back to back. Prints
per N: median and 95th percentile latency, answers per second, and the answer's JSON size.
Issue 17's goal: 8 readers' p95 at most 500 ms on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("MAMMO_QUIET", "1")

from bench_roundtrip import build_workspace, roi_region, start_stack  # noqa: E402


def play(endpoint: str, headers: Callable[[], dict], tasks: list[dict], shapes: dict, readers: int,
         asks: int) -> dict:
    latencies: list[float] = []
    sizes: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        session = requests.Session()
        for _ in range(asks):
            task = tasks[int(rng.integers(len(tasks)))]
            rows, cols = shapes[task["data"]["image_id"]]
            payload = {"task": task["id"], "context": {"result": [roi_region(rows, cols, rng)]}}
            start = time.perf_counter()
            response = session.post(endpoint, headers=headers(), json=payload, timeout=600)
            elapsed = 1000 * (time.perf_counter() - start)
            with lock:
                if response.status_code != 200 or "errors" in response.json():
                    errors.append(response.text[:200])
                else:
                    latencies.append(elapsed)
                    sizes.append(len(response.content))

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(readers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if not latencies:
        raise SystemExit(f"every request failed: {errors[:1]}")
    return {"readers": readers, "answers": len(latencies), "errors": len(errors),
            "p50_ms": round(statistics.median(latencies), 1), "p95_ms": round(float(np.percentile(latencies, 95)), 1),
            "answers_per_s": round(len(latencies) / wall, 1), "answer_kb": round(statistics.median(sizes) / 1024, 1),
            "first_error": errors[0] if errors else None}


def backend_rss_mb(pid: int) -> int:
    """Resident memory of the backend: gunicorn's master and its workers."""
    import psutil

    master = psutil.Process(pid)
    return round(sum(p.memory_info().rss for p in [master, *master.children(recursive=True)]) / 2**20)


def masks_mb(ws, loaded, run, image_ids: list[str]) -> list[float]:
    """What the backend's mask cache holds per image once every patch is built (here, in this process)."""
    from workspace.dissect.query import image_masks_for

    sizes = []
    for image_id in image_ids:
        masks = image_masks_for(ws, image_id, loaded, run)
        for p in range(len(masks.boxes)):
            masks.own_area(p)
        sizes.append(round(masks.nbytes / 2**20, 1))
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=10, help="4 images each (default 10: 40 tasks)")
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--asks", type=int, default=15, help="ROIs per reader")
    parser.add_argument("--threads", type=int, help="backend threads (default: the backend's default)")
    parser.add_argument("--keep", help="build the workspace here and keep it (default: a temporary folder)")
    parser.add_argument("--json", help="write the numbers here too")
    args = parser.parse_args(argv)

    from workspace.base.catalog import get_image, open_catalog

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mammo-bench-readers-"))
    services = []
    try:
        ws, loaded, run = build_workspace(root / "ws", args.patients)
        server, backend, project, headers, tasks = start_stack(ws, loaded, run, services, threads=args.threads)
        db = open_catalog(ws)
        shapes = {t["data"]["image_id"]: (int(r["rows"]), int(r["cols"]))
                  for t in tasks for r in [get_image(db, t["data"]["image_id"])]}
        endpoint = f"{server.url}/api/ml/{project.ml_backend_id}/interactive-annotating"
        t0 = time.perf_counter()
        rng = np.random.default_rng(99)
        for task in tasks:   # every image read and its masks built: the cached state of a reading session
            rows, cols = shapes[task["data"]["image_id"]]
            requests.post(endpoint, headers=headers(), timeout=600,
                          json={"task": task["id"], "context": {"result": [roi_region(rows, cols, rng)]}})
        time.sleep(10)  # the backend builds each image's patch masks in the background
        print(f"{len(tasks)} tasks warmed in {time.perf_counter() - t0:.0f} s", flush=True)
        results = {"tasks": len(tasks), "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                   "backend_threads": args.threads, "runs": []}
        for readers in args.readers:
            found = play(endpoint, headers, tasks, shapes, readers, args.asks)
            found["backend_rss_mb"] = backend_rss_mb(backend.pid)
            results["runs"].append(found)
            print(json.dumps(found), flush=True)
        results["masks_mb_per_image"] = masks_mb(ws, loaded, run, [t["data"]["image_id"] for t in tasks[:5]])
        print(f"patch masks of a fully built image: {results['masks_mb_per_image']} MB (the backend keeps "
              "MAMMO_MASK_CACHE_MB of them)", flush=True)
        print()
        print(f"| readers | answers | p50 | p95 | answers/s | answer size | backend memory | ({len(tasks)} cached "
              f"tasks, {os.cpu_count()} CPUs) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results["runs"]:
            print(f"| {r['readers']} | {r['answers']} ({r['errors']} errors) | {r['p50_ms']:.0f} ms | "
                  f"{r['p95_ms']:.0f} ms | {r['answers_per_s']} | {r['answer_kb']} KB | {r['backend_rss_mb']} MB | |")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        for service in reversed(services):
            service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
