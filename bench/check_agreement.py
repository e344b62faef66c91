"""Agreement check on the synthetic cohort: do the store's kappas and the team's label rule behave as they
should when readers of known accuracy label the same units?

    .venv/bin/python bench/check_agreement.py -w WORKSPACE [--readers 3] [--coverage 0.8] [--repeats 10]

Needs a workspace with a dissection run and lesions (``bench/check_proposals.py`` makes one). The truth of a
unit is the lesion kind it aligns with best (dataset-level IoU, :mod:`workspace.dissect.proposals`), for
the units with any overlap. Simulated readers then label each unit with probability ``--coverage``, in a
random order, naming the true kind with probability 1 - p and another kind otherwise, through the real
concept store (its own scope: a made-up layer of a copy of the catalog, so the workspace's labels are
untouched). For each error rate p the script prints Fleiss' kappa measured by the store beside its
expected value for readers of that accuracy, and the share of labels that are right under the ``latest`` and
the ``majority`` rule (which leaves a unit without a majority unlabelled).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workspace.base.config import Workspace  # noqa: E402


def expected_kappa(p: float, shares: np.ndarray) -> float:
    """Fleiss' kappa of readers right with probability 1 - p, wrong uniformly over the other kinds, on units
    whose true kinds have ``shares``: pairwise agreement and the shares of the names they give."""
    k = len(shares)
    agree = (1 - p) ** 2 + p ** 2 / (k - 1)
    named = shares * (1 - p) + (1 - shares) * p / (k - 1)
    chance = float((named ** 2).sum())
    return (agree - chance) / (1 - chance)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", required=True)
    ap.add_argument("--readers", type=int, default=3)
    ap.add_argument("--coverage", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    from workspace.dissect.concepts import ConceptStore
    from workspace.dissect.dissect_run import run_or_newest
    from workspace.dissect.proposals import iou_table
    from workspace.dissect.session import load_run_model

    ws = Workspace.open(args.workspace)
    run = run_or_newest(ws)
    table = iou_table(ws, run, load_run_model(ws, run))
    iou, counts = table.iou()
    kinds = [v for v, (key, _value) in enumerate(table.values) if key == "kind" and counts[v] > 0]
    names = [table.values[v][1] for v in kinds]
    if len(kinds) < 2:
        raise SystemExit("the run's lesions show fewer than two kinds: nothing to disagree about")
    sub = iou[:, kinds]
    units = [u for u in range(table.n_units) if sub[u].max() > 0]
    truth = {u: names[int(np.argmax(sub[u]))] for u in units}
    shares = np.array([sum(t == n for t in truth.values()) for n in names], float) / len(truth)
    print(f"run {run.run_id}: {len(units)} units overlap a lesion; their kinds: "
          + ", ".join(f"{n} {int(s * len(truth))}" for n, s in zip(names, shares, strict=True)))
    print(f"{args.readers} simulated readers, each labelling a unit with probability {args.coverage:g}; "
          f"{args.repeats} repeats per error rate (mean and standard deviation)\n")
    print("| reader error p | Fleiss' kappa (store) | expected | right, latest rule | right, majority rule | "
          "labelled, majority rule |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="mammo-agreement-") as tmp:
        copy = Workspace.open(Path(tmp) / "ws")
        with sqlite3.connect(ws.catalog_path) as source, sqlite3.connect(copy.catalog_path) as target:
            source.backup(target)   # the WAL's pages included
        with ConceptStore(copy) as store:
            for k, p in enumerate((0.0, 0.1, 0.2, 0.3, 0.4)):
                kappas, latest_right, majority_right, majority_share = [], [], [], []
                for repeat in range(args.repeats):
                    rng = np.random.default_rng([args.seed, k, repeat])
                    layer = f"agreement-check-{k}-{repeat}"
                    said = []
                    for reader in range(args.readers):
                        for u in units:
                            if rng.random() < args.coverage:
                                wrong = [n for n in names if n != truth[u]]
                                said.append((f"reader-{reader}", u, truth[u] if rng.random() >= p
                                             else wrong[rng.integers(len(wrong))]))
                    for i in rng.permutation(len(said)):   # readers label in no particular order
                        reader, u, name = said[i]
                        store.label_units(run.model_digest, layer, [u], name, by=reader, source="api",
                                          n_units=table.n_units)
                    kappas.append(store.agreement(run.model_digest, layer).fleiss_kappa)
                    latest = store.labels(run.model_digest, layer)
                    store.set_rule("majority", by="check")
                    majority = store.labels(run.model_digest, layer)
                    store.set_rule("latest", by="check")
                    latest_right.append(np.mean([c.name == truth[u] for u, c in latest.items()]))
                    majority_right.append(np.mean([c.name == truth[u] for u, c in majority.items()]))
                    majority_share.append(len(majority) / max(len(latest), 1))
                print(f"| {p:.1f} | {np.mean(kappas):.3f} ± {np.std(kappas):.3f} | {expected_kappa(p, shares):.3f} | "
                      f"{100 * np.mean(latest_right):.0f} % | {100 * np.mean(majority_right):.0f} % | "
                      f"{100 * np.mean(majority_share):.0f} % of the units |", flush=True)


if __name__ == "__main__":
    main()
