"""Proposal check on the synthetic cohort, where the truth is known: do units proposed for a kind of finding
align with held-out lesions of that kind more than with lesions of other kinds?

    .venv/bin/python bench/check_proposals.py -w WORKSPACE [--patients 12] [--seed 7] [--min-iou 0.04]

Makes (or reuses) a workspace of ``--patients`` synthetic patients (full-size mammograms with masses,
calcifications and the other synthetic findings, benign ones included), the tissue grid's patches (every
finding is covered, not only the paper's lesion patches) and a dissection run of the shipped model over them. One pass (:func:`workspace.dissect.proposals.iou_table`) gives every unit's
dataset-level IoU with every lesion attribute value per image. The patients are split in two halves:
proposals are made on the first half's images, then each proposed unit's IoU is measured on the second
half's images with the value it was proposed for and with every other value of the same attribute (another
kind, another finding). Prints one line per proposal and the summary of issue 16's check: the share of
proposals whose held-out IoU with their own value beats every other value, and the mean held-out IoU with
their own value against the mean over the other values.
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
    ap.add_argument("--patients", type=int, default=12)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--min-iou", type=float, default=0.04)
    args = ap.parse_args()

    from workspace.base.catalog import open_catalog
    from workspace.dissect.proposals import concept_name, iou_table, propose

    ws = Workspace.open(args.workspace)
    run, loaded = ensure_run(ws, args.patients, args.seed)
    t = time.perf_counter()
    table = iou_table(ws, run, loaded)
    print(f"IoU table in {time.perf_counter() - t:.0f} s: {len(table.values)} attribute values over "
          f"{sum(table.n_patches.values())} patches of {len(table.area)} images", flush=True)
    db = open_catalog(ws)
    patient_of = {r["image_id"]: r["patient_id"] for r in db.query("SELECT image_id, patient_id FROM images")}
    patients = sorted({patient_of[i] for i in table.area})
    first = set(patients[: len(patients) // 2])
    proposing = [i for i in table.area if patient_of[i] in first]
    held_out = [i for i in table.area if patient_of[i] not in first]
    found = propose(table, images=proposing, min_iou=args.min_iou)
    iou_out, counts_out = table.iou(held_out)
    index = {v: k for k, v in enumerate(table.values)}
    print(f"\n{len(found)} proposal(s) from {len(proposing)} images of {len(first)} patients (IoU >= {args.min_iou:g}); "
          f"held out: {len(held_out)} images of {len(patients) - len(first)} patients\n")
    print("| unit | proposed | IoU (proposing half) | held-out IoU, own value | held-out IoU, other values "
          "(best, mean) | own beats every other |")
    print("|---|---|---|---|---|---|")
    wins, own_all, other_all, judged = 0, [], [], 0
    for p in found:
        own = index[(p.attribute, p.value)]
        others = [index[v] for v in table.values if v[0] == p.attribute and v != (p.attribute, p.value)
                  and counts_out[index[v]] > 0]
        if counts_out[own] == 0 or not others:
            print(f"| {p.unit} | {p.concept} | {p.iou:.3f} | no held-out lesion of this value | | |")
            continue
        judged += 1
        other = iou_out[p.unit, others]
        win = bool(iou_out[p.unit, own] > other.max())
        wins += win
        own_all.append(float(iou_out[p.unit, own]))
        other_all.append(float(other.mean()))
        best_other = concept_name(*table.values[others[int(np.argmax(other))]])
        print(f"| {p.unit} | {p.concept} | {p.iou:.3f} | {iou_out[p.unit, own]:.3f} | {other.max():.3f} "
              f"({best_other}), {other.mean():.3f} | {'yes' if win else 'NO'} |")
    print()
    if judged:
        print(f"Held out: {wins} of {judged} proposals ({100 * wins / judged:.0f} %) align with lesions of their own "
              f"value more than with any other value of the same attribute; mean held-out IoU {np.mean(own_all):.3f} "
              f"with their own value against {np.mean(other_all):.3f} with the others.")
    else:
        print("No proposal could be judged on the held-out half (no lesions of its value there).")


if __name__ == "__main__":
    main()
