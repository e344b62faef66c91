"""Benchmark (not a test): an interactive ROI's round trip through Label Studio to the backend and back.

    .venv/bin/python bench/bench_roundtrip.py [--patients 2] [--trials 30] [--keep DIR] [--json OUT.json]

Builds a throw-away workspace (synthetic full-size mammograms, 3328 x 2560; the shipped demo model when
present, else an untrained ``vgg16_slim`` with 512-pixel patches (same cost); a patch set and a
dissection run), starts a real Label Studio and the real backend (gunicorn), provisions "Screening
reads", then times ``POST /api/ml/{id}/interactive-annotating`` as the UI sends it:

- **cached**: the image's read (maps) is cached and its patch masks built (the backend builds them in
  the background once a task is predicted or first queried); each trial is a new ROI (a disk at a random
  place in the breast), so Label Studio -> backend -> IoU of every unit -> masks -> RLE -> report -> back;
- **forward**: the first ROI on an image nobody read yet: the backend reads the whole mammogram
  (every tissue patch through the model) before answering.

Also times the same cached requests sent to the backend directly, to show Label Studio's share, and
the numpy brush-RLE codec on one full-size mask. Label Studio's and the other services' start-up
times: ``bench/bench_services.py``.
Numbers go to bench/RESULTS.md by hand (with the machine and the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MAMMO_QUIET", "1")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summary(values: list[float]) -> dict:
    return {"n": len(values), "median_ms": round(statistics.median(values), 1),
            "p95_ms": round(percentile(values, 95), 1), "min_ms": round(min(values), 1),
            "max_ms": round(max(values), 1)}


def build_workspace(root: Path, patients: int):
    import torch

    from models.checkpoint import SHIPPED_DEMO, base_meta, load_checkpoint, register_model, save_checkpoint
    from models.vgg import build_vgg
    from workspace.base.catalog import open_catalog
    from workspace.base.config import Workspace
    from workspace.data.patches import build_patch_set
    from workspace.data.synth import synthesize
    from workspace.dissect.dissect_run import run_dissection

    ws = Workspace.open(root)
    t0 = time.perf_counter()
    synthesize(ws, patients, seed=1)
    build_patch_set(ws, "default", size=512, step=256)
    if SHIPPED_DEMO.is_file():
        path = SHIPPED_DEMO
    else:
        torch.manual_seed(0)
        path = ws.models_dir / "bench" / "model.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, build_vgg("vgg16_slim"), base_meta("vgg16_slim", input_size=512))
    loaded = load_checkpoint(path, "cpu")
    db = open_catalog(ws)
    register_model(db, loaded)
    run = run_dissection(ws, loaded, patch_set="default", split=None)
    print(f"workspace ready in {time.perf_counter() - t0:.0f} s: {ws.root} (model {path.name})", flush=True)
    return ws, loaded, run


def start_stack(ws, loaded, run, services: list, threads: int | None = None):
    """A real Label Studio and the real backend on ``ws`` (appended to ``services`` for the caller to stop),
    "Screening reads" provisioned: returns (server, backend, project, API headers, the project's tasks). The
    headers are a function: the SDK's, with an access token it refreshes from the personal access token."""
    from ml_backend import label_configs as lc
    from ml_backend.labelstudio import launch
    from ml_backend.provision import provision
    from ml_backend.serve import start_backend

    t0 = time.perf_counter()
    server = launch(ws)
    services.append(server.service)
    print(f"Label Studio up in {time.perf_counter() - t0:.0f} s at {server.url}", flush=True)
    backend = start_backend(ws, run_id=run.run_id, threads=threads)
    services.append(backend)
    project = provision(ws, server, backend_url=backend.url, kinds=(lc.SCREENING,), loaded=loaded,
                        run=run).projects[lc.SCREENING]
    headers = server.client()._client_wrapper.get_headers
    tasks = requests.get(f"{server.url}/api/tasks", headers=headers(), timeout=600,
                         params={"project": project.project_id, "page_size": 1000}).json()["tasks"]
    return server, backend, project, headers, tasks


def roi_region(rows: int, cols: int, rng: np.random.Generator) -> dict:
    from ml_backend import label_configs as lc
    from ml_backend import predictions as pr

    cy, cx = rng.uniform(0.3, 0.7) * rows, rng.uniform(0.08, 0.35) * cols   # chest wall on the left: tissue
    radius = rng.uniform(0.03, 0.08) * rows
    yy, xx = np.ogrid[:rows, :cols]
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    return pr.brush(mask, label=lc.ROI_LABEL, to_name="image", from_name="roi", rid="bench")


def rle_times(rows: int, cols: int, repeats: int = 10) -> dict:
    """Median ms to encode and to decode one full-size ROI mask with ``ml_backend.rle`` (what every
    brush region of a request and an answer costs on each side)."""
    from ml_backend.rle import decode_mask, encode_mask

    yy, xx = np.ogrid[:rows, :cols]
    mask = (yy - rows / 2) ** 2 + (xx - cols / 4) ** 2 <= (0.06 * rows) ** 2
    encode, decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        rle = encode_mask(mask)
        encode.append(1000 * (time.perf_counter() - start))
        start = time.perf_counter()
        decode_mask(rle, cols, rows)
        decode.append(1000 * (time.perf_counter() - start))
    return {"rle_encode_ms": round(statistics.median(encode), 1), "rle_decode_ms": round(statistics.median(decode), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2, help="4 images each; each image gives one forward trial")
    parser.add_argument("--trials", type=int, default=30, help="cached trials")
    parser.add_argument("--keep", help="build the workspace here and keep it (default: a temporary folder)")
    parser.add_argument("--json", help="write the numbers here too")
    args = parser.parse_args(argv)

    from ml_backend import label_configs as lc
    from ml_backend.serve import start_backend
    from workspace.base.catalog import get_image, open_catalog

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mammo-bench-roundtrip-"))
    services = []
    try:
        ws, loaded, run = build_workspace(root / "ws" if not args.keep else root, args.patients)
        server, backend, project, headers, tasks = start_stack(ws, loaded, run, services)
        # Listing tasks makes Label Studio ask the backend for the page's predictions (the project evaluates
        # predictions automatically), which reads every image. For the forward-pass trials, restart the
        # backend on the same URL with no read cached anywhere.
        backend.stop()
        services.remove(backend)
        shutil.rmtree(ws.reads_dir, ignore_errors=True)
        ws.reads_dir.mkdir(parents=True)
        backend = start_backend(ws, run_id=run.run_id, port=backend.port)
        services.append(backend)
        db = open_catalog(ws)
        rng = np.random.default_rng(0)
        endpoint = f"{server.url}/api/ml/{project.ml_backend_id}/interactive-annotating"

        def ask(task: dict) -> tuple[float, dict]:
            row = get_image(db, task["data"]["image_id"])
            region = roi_region(row["rows"], row["cols"], rng)
            start = time.perf_counter()
            response = requests.post(endpoint, headers=headers(), json={"task": task["id"],
                                                                     "context": {"result": [region]}}, timeout=600)
            elapsed = 1000 * (time.perf_counter() - start)
            body = response.json()
            if "errors" in body:
                raise SystemExit(f"the backend answered an error: {body['errors']}")
            return elapsed, {"task": task, "region": region, "answer": body["data"]}

        forward, cached, direct = [], [], []
        for task in tasks[1:]:
            elapsed, _ = ask(task)
            forward.append(elapsed)
            print(f"forward  {task['data']['image_id']}: {elapsed:7.1f} ms", flush=True)
            time.sleep(6)  # the backend builds that image's masks in the background: do not time it into the next
        ask(tasks[0])  # the first ROI reads the image; the backend then builds its patch masks in the background
        time.sleep(8)
        last = None
        for _ in range(args.trials):
            elapsed, last = ask(tasks[0])
            cached.append(elapsed)
        for _ in range(args.trials):
            row = get_image(db, tasks[0]["data"]["image_id"])
            payload = {"tasks": [tasks[0]], "label_config": lc.SCREENING_CONFIG,
                       "params": {"context": {"result": [roi_region(row["rows"], row["cols"], rng)]}}}
            start = time.perf_counter()
            requests.post(f"{backend.url}/predict", json=payload, timeout=600).raise_for_status()
            direct.append(1000 * (time.perf_counter() - start))
        row = get_image(db, tasks[0]["data"]["image_id"])
        results = {
            "image_shape": [row["rows"], row["cols"]], "model": loaded.architecture,
            "patches_per_image": None, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
            "cached_through_labelstudio": summary(cached), "cached_backend_direct": summary(direct),
            "forward_through_labelstudio": summary(forward),
            "regions_in_last_answer": len(last["answer"]["result"]) if last else 0,
        }
        from models.inference import read_mammogram

        results["patches_per_image"] = int(len(read_mammogram(ws, tasks[0]["data"]["image_id"], loaded).boxes))
        results.update(rle_times(row["rows"], row["cols"]))
        print(json.dumps(results, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        for service in reversed(services):
            service.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
