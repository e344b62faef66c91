"""Concept store write rate: single-unit label transactions per second, one process alone and two
processes writing the same store at once (WAL, ``BEGIN IMMEDIATE``, retried on SQLITE_BUSY).

    .venv/bin/python bench/bench_concepts.py [--writes 1000] [--repeats 3]

Each write is one ``ConceptStore.label_units`` call on one unit (a new label: one row upserted and one
history event, committed and synced by SQLite). Two-process rate = all writes / wall time from the
first start to the last finish; both processes are released together and meet half way at a barrier
(so they overlap). Prints the best and the worst of ``--repeats`` fresh workspaces (the rate depends
on the disk and on the machine's load).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MAMMO_QUIET", "1")

from workspace.base.config import Workspace  # noqa: E402
from workspace.dissect.concepts import ConceptStore  # noqa: E402

MODEL, LAYER = "bench000000000001", "features.29"
CONCEPTS = ("mass", "calcification", "architectural distortion")


def _writer(path: str, worker: int, writes: int, start, middle, results) -> None:
    store = ConceptStore(path)
    start.wait(60)
    began = time.time()
    for i in range(writes):
        if middle is not None and i == writes // 2:
            middle.wait(120)
        store.label_units(MODEL, LAYER, [worker * writes + i], CONCEPTS[i % 3], by=f"bench-{worker}",
                          source="api", n_units=2 * writes)
    results.put((began, time.time()))
    store.close()


def rate(n_procs: int, writes: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.open(tmp)
        ConceptStore(ws).close()                    # schema in place before the race
        ctx = mp.get_context("spawn")
        start, results = ctx.Event(), ctx.Queue()
        middle = ctx.Barrier(n_procs) if n_procs > 1 else None
        procs = [ctx.Process(target=_writer, args=(str(ws.catalog_path), w, writes, start, middle, results))
                 for w in range(n_procs)]
        for p in procs:
            p.start()
        time.sleep(1.0)                             # imported and connected: start together
        start.set()
        spans = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(60)
        with ConceptStore(ws) as store:
            assert len(store.labels(MODEL, LAYER)) == n_procs * writes, "a write was lost"
        return n_procs * writes / (max(s[1] for s in spans) - min(s[0] for s in spans))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--writes", type=int, default=1000, help="label transactions per process")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for n in (1, 2):
        rates = [rate(n, args.writes) for _ in range(args.repeats)]
        print(f"{n} process(es) x {args.writes} single-unit label transactions: "
              f"{min(rates):.0f}-{max(rates):.0f} writes/s (all processes together; {args.repeats} runs)")


if __name__ == "__main__":
    main()
