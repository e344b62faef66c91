"""Proposal check on the synthetic cohort, where the truth is known: do units proposed for a kind of finding
align with held-out lesions of that kind more than with lesions of other kinds?

    .venv/bin/python bench/check_proposals.py -w WORKSPACE [--patients 20] [--seed 7] [--splits 5]

Makes (or reuses) a workspace of ``--patients`` synthetic patients (full-size mammograms with masses,
calcifications and the other synthetic findings, benign ones included), the tissue grid's patches (every
finding is covered, not only the paper's lesion patches) and a dissection run of the shipped model over them. One pass (:func:`workspace.dissect.proposals.iou_table`) gives every unit's
dataset-level IoU with every lesion attribute value per image. The patients are split at random in two halves
(``--splits`` times): proposals are made on one half's images, then each proposed unit's IoU is measured on the
other half's images with the value it was proposed for and with every other value of the same attribute
(another kind, another finding). Prints, per proposed concept, the share of proposals whose held-out IoU with
their own value beats every other value (issue 16's check), and the mean held-out IoU with their own value
against the mean over the other values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workspace.base.config import Workspace  # noqa: E402


def ensure_run(ws: Workspace, patients: int, seed: int):
    from models.checkpoint import SHIPPED_DEMO, load_checkpoint, register_model
    from workspace.base.catalog import open_catalog
    from workspace.data.patches import build_tissue_patch_set, open_patch_set
    from workspace.data.synth import synthesize
    from workspace.dissect.dissect_run import run_dissection

    t = time.perf_counter()
    synthesize(ws, patients, seed=seed, variants=False)
    try:
        open_patch_set(ws, "tissue")
    except Exception:  # none yet
        build_tissue_patch_set(ws, "tissue")
    loaded = load_checkpoint(SHIPPED_DEMO, device="cpu")
    register_model(open_catalog(ws), loaded)
    run = run_dissection(ws, loaded, patch_set="tissue", split=None)
    print(f"workspace ready in {time.perf_counter() - t:.0f} s: {run.manifest['n_patches']} patches, run {run.run_id}",
          flush=True)
    return run, loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", required=True)
    ap.add_argument("--patients", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--splits", type=int, default=5, help="random halvings of the patients (default 5)")
    args = ap.parse_args()

    from workspace.base.catalog import open_catalog
    from workspace.dissect.proposals import concept_name, iou_table, propose

    ws = Workspace.open(args.workspace)
    run, loaded = ensure_run(ws, args.patients, args.seed)
    t = time.perf_counter()
    table = iou_table(ws, run, loaded)
    _iou, counts = table.iou()
    print(f"IoU table in {time.perf_counter() - t:.0f} s: {sum(table.n_patches.values())} patches of "
          f"{len(table.area)} images; lesions per value: "
          + ", ".join(f"{concept_name(*v)} {c}" for v, c in zip(table.values, counts, strict=True)), flush=True)
    db = open_catalog(ws)
    patient_of = {r["image_id"]: r["patient_id"] for r in db.query("SELECT image_id, patient_id FROM images")}
    patients = sorted({patient_of[i] for i in table.area})
    index = {v: k for k, v in enumerate(table.values)}
    per_value: dict[str, list[int]] = {}
    own_all, other_all = [], []
    for split in range(args.splits):
        first = set(np.random.default_rng(split).permutation(patients)[: len(patients) // 2])
        proposing = [i for i in table.area if patient_of[i] in first]
        held_out = [i for i in table.area if patient_of[i] not in first]
        iou_out, counts_out = table.iou(held_out)
        for p in propose(table, images=proposing):
            own = index[(p.attribute, p.value)]
            others = [index[v] for v in table.values if v[0] == p.attribute and v != (p.attribute, p.value)
                      and counts_out[index[v]] > 0]
            if counts_out[own] == 0 or not others:   # nothing to compare with on the held-out half
                continue
            win = bool(iou_out[p.unit, own] > iou_out[p.unit, others].max())
            per_value.setdefault(p.concept, []).append(win)
            own_all.append(float(iou_out[p.unit, own]))
            other_all.append(float(iou_out[p.unit, others].mean()))
    print(f"\nProposals made on a random half of the {len(patients)} patients, judged on the other half, {args.splits} "
          "halvings: does a proposed unit align with held-out lesions of its value more than with every other "
          "value of the same attribute (another kind, another finding)?\n")
    print("| proposed concept | proposals judged | held-out: own value beats every other |")
    print("|---|---|---|")
    for name, wins in sorted(per_value.items()):
        print(f"| {name} | {len(wins)} | {sum(wins)} ({100 * sum(wins) / len(wins):.0f} %) |")
    total = [w for wins in per_value.values() for w in wins]
    if total:
        print(f"| all | {len(total)} | {sum(total)} ({100 * sum(total) / len(total):.0f} %) |")
        print(f"\nMean held-out IoU with the proposed value {np.mean(own_all):.4f}, with the other values "
              f"{np.mean(other_all):.4f} (ratio {np.mean(own_all) / max(np.mean(other_all), 1e-12):.2f}).")
    else:
        print("No proposal could be judged on a held-out half.")


if __name__ == "__main__":
    main()
