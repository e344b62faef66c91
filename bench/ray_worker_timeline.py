"""Where a 1-worker `mammo dissect --ray` spends its time (issue 15's 1.15 goal): start-up against work.

    .venv/bin/python bench/ray_worker_timeline.py -w /tmp/ray-bench [--runs 6]

Uses the workspace ``bench/bench_ray.py`` makes (patch set ``bench``). Starts a local Ray cluster here, then
runs ``mammo dissect --ray ADDRESS --workers 1`` ``--runs`` times as a user would, and ``mammo dissect`` as
often, alternated, each on an empty ``runs`` folder. For each Ray run it follows the shard's progress file and
prints when the run's partial folder appeared (the driver has sized the run), when the worker's first batch was
done (its start-up is over), the worker's niceness then, and the total; for both commands, the forward pass's
time per patch from the run's manifest (the work's own speed); at the end, the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MAMMO = str(Path(sys.executable).with_name("mammo"))


def timed_run(root: Path, env: dict, extra: list[str]) -> dict:
    """One `mammo dissect` run on an empty runs folder, followed through its shard progress files."""
    shutil.rmtree(root / "runs", ignore_errors=True)
    (root / "runs").mkdir()
    start = time.monotonic()
    process = subprocess.Popen([MAMMO, "dissect", "-w", str(root), "--patch-set", "bench", "--split", "all", *extra],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found: dict = {}
    while process.poll() is None:
        partial = list((root / "runs").glob(".partial-*"))
        if partial and "sized_s" not in found:
            found["sized_s"] = time.monotonic() - start
        for record in (root / "runs").glob(".partial-*/shards/*.progress"):
            try:
                progress = json.loads(record.read_text())
            except (OSError, ValueError):   # being written
                continue
            if progress.get("done", 0) > 0 and "first_batch_s" not in found:
                found["first_batch_s"] = time.monotonic() - start
                stat = Path(f"/proc/{progress['pid']}/stat").read_text().rsplit(")", 1)[1].split()
                found["niceness"] = int(stat[16])
        time.sleep(0.05)
    if process.returncode:
        raise SystemExit(f"mammo dissect failed: {process.stderr.read()[-1000:]}")
    found["total_s"] = time.monotonic() - start
    manifest = json.loads(next((root / "runs").glob("*/manifest.json")).read_text())
    found["forward_ms"] = 1000 * manifest["timing"]["forward_s"] / manifest["n_patches"]   # the work's own speed
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", required=True, type=Path)
    ap.add_argument("--runs", type=int, default=6)
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        address = ray.get_runtime_context().gcs_address
        env = {**os.environ, "MAMMO_QUIET": "1"}   # after ray.init: it carries the cluster's token
        plain, on_ray = [], []
        for k in range(args.runs):
            single = timed_run(args.workspace, env, [])
            plain.append(single["total_s"])
            run = timed_run(args.workspace, env, ["--ray", address, "--workers", "1"])
            on_ray.append(run["total_s"])
            print(f"run {k + 1}: mammo dissect {plain[-1]:.1f} s (forward {single['forward_ms']:.1f} ms/patch); "
                  f"--ray: sized at {run.get('sized_s', 0):.1f} s, worker's first batch done at "
                  f"{run.get('first_batch_s', 0):.1f} s (niceness {run.get('niceness')}), total {run['total_s']:.1f} s "
                  f"(forward {run['forward_ms']:.1f} ms/patch)", flush=True)
    finally:
        ray.shutdown()
    print(f"\nmedians: mammo dissect {statistics.median(plain):.1f} s, --ray --workers 1 "
          f"{statistics.median(on_ray):.1f} s, ratio {statistics.median(on_ray) / statistics.median(plain):.3f}")


if __name__ == "__main__":
    main()
