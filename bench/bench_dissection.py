"""Dissection cost: a run's wall time over the plain forward passes of the same patches, and peak memory.

    .venv/bin/python bench/bench_dissection.py [--patches 64] [--arch vgg16_slim] [--device cpu]
                                              [--mem-patches 500] [--units 512]

1. Time: the same N patches (512 x 512, in memory) through (a) plain forward passes and (b) a whole
   dissection run (layer tap, statistics, PCA, writing the run folder), alternated, best of
   ``--repeats``. Prints the ratio (target <= 1.10 on the CPU).
2. Memory: in fresh processes, a run over N and 4N patches of synthetic (units, 32, 32) ReLU maps
   (no model, so only the dissection's own memory shows): peak RSS above the process baseline, next
   to the exact-quantile buffer the plan announces (units x tail x 4 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MAMMO_QUIET", "1")

from models.features import capture  # noqa: E402
from models.vgg import DISSECTED_LAYER, build_vgg  # noqa: E402
from workspace.base.config import Workspace  # noqa: E402
from workspace.dissect.dissect_run import ActivationSource, execute_run  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(model, x, batch, device) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            model(x[s:s + batch].to(device).contiguous(memory_format=torch.channels_last))
    _sync(device)
    return time.perf_counter() - t


def time_dissection(model, x, batch, device) -> tuple[float, dict]:
    def activations(start: int, stop: int) -> torch.Tensor:
        with torch.inference_mode(), capture(model, DISSECTED_LAYER) as tap:
            model(x[start:stop].to(device).contiguous(memory_format=torch.channels_last))
        return tap.output

    ids = np.arange(len(x), dtype=np.int64)
    identity = {"model_digest": f"bench{time.time_ns()}", "layer": DISSECTED_LAYER, "patch_set": "bench",
                "patch_set_digest": "-", "split": "test"}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run = execute_run(Workspace.open(tmp), ActivationSource(ids, activations, identity, batch), device=device)
        _sync(device)
        return time.perf_counter() - t, run.manifest


MEM_CHILD = """
import json, os, sys, tempfile, threading, time, numpy as np, torch
sys.path.insert(0, {root!r})
os.environ["MAMMO_QUIET"] = "1"
from workspace.base.config import Workspace
from workspace.dissect.dissect_run import ActivationSource, execute_run
n, units = int(sys.argv[1]), int(sys.argv[2])
gen = torch.Generator().manual_seed(0)
def acts(a, b):
    return torch.relu(torch.randn(b - a, units, 32, 32, generator=gen))
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
acts(0, 8)
base = rss_mb()
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
identity = dict(model_digest="mem", layer="x", patch_set="bench", patch_set_digest="-", split="test")
with tempfile.TemporaryDirectory() as tmp:
    run = execute_run(Workspace.open(tmp), ActivationSource(np.arange(n), acts, identity, 8))
    done.set()
    print(json.dumps(dict(n=n, base_mb=base, peak_mb=peak[0], plan=run.manifest["thresholds"],
                          seconds=run.manifest["timing"]["elapsed_s"])))
"""


def memory(n: int, units: int) -> dict:
    out = subprocess.run([sys.executable, "-c", MEM_CHILD.format(root=str(ROOT)), str(n), str(units)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patches", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--arch", default="vgg16_slim")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mem-patches", type=int, default=500)
    p.add_argument("--units", type=int, default=512, help="units of the synthetic maps in the memory test")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")

    torch.manual_seed(0)
    model = build_vgg(args.arch).eval().to(device).to(memory_format=torch.channels_last)
    x = torch.rand(args.patches, 1, args.size, args.size, generator=torch.Generator().manual_seed(0))
    time_forward(model, x[: args.batch], args.batch, device)          # warm-up
    forward, dissect = [], []
    manifest = {}
    for _ in range(args.repeats):
        forward.append(time_forward(model, x, args.batch, device))
        seconds, manifest = time_dissection(model, x, args.batch, device)
        dissect.append(seconds)
    f, d = min(forward), min(dissect)
    units = manifest["n_units"]
    print(f"{args.arch} {DISSECTED_LAYER}: {units} units at {manifest['map_shape']}, {args.patches} patches "
          f"{args.size}x{args.size}, batch {args.batch}")
    print(f"plain forward      {f:8.2f} s  ({f / args.patches * 1000:.1f} ms/patch)  runs: {[round(v, 2) for v in forward]}")
    print(f"dissection run     {d:8.2f} s  (inside it: forward+tap {manifest['timing']['forward_s']:.2f} s, "
          f"statistics {manifest['timing']['statistics_s']:.2f} s, finish {manifest['timing']['finish_s']:.2f} s)"
          f"  runs: {[round(v, 2) for v in dissect]}")
    print(f"ratio dissection / forward = {d / f:.3f}  (target <= 1.10)")

    if not args.skip_memory:
        peak, exact_peak = {}, {}
        for n in (args.mem_patches, 4 * args.mem_patches):
            r = memory(n, args.units)
            grow = r["peak_mb"] - r["base_mb"]
            buffer_mb = args.units * r["plan"]["tail_size"] * 4 / 2**20
            a_mb = args.units * n * 4 / 2**20
            peak[n] = grow
            exact_peak[n] = r["plan"]["exact_peak_bytes"]
            print(f"memory, {n:5d} patches x {args.units} units: peak above baseline {grow:7.1f} MB (plan's "
                  f"estimate {r['plan']['exact_peak_bytes'] / 2**20:.1f} MB); exact buffer "
                  f"{buffer_mb:6.1f} MB (tail {r['plan']['tail_size']} values/unit), a matrix {a_mb:5.1f} MB, "
                  f"method {r['plan']['method']}, {r['seconds']:.1f} s")
        n1, n4 = args.mem_patches, 4 * args.mem_patches
        plan_growth = (exact_peak[n4] - exact_peak[n1]) / 2**20
        print(f"memory growth N -> 4N: {peak[n4] - peak[n1]:.1f} MB; the exact-quantile plan's own estimate "
              f"grows by {plan_growth:.1f} MB (work array + fold temporaries); everything else is flat")
    print(f"max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
