"""Silencing check: does silencing a lesion concept's units lower the score more than silencing random units?

    .venv/bin/python bench/check_ablation.py -w WORKSPACE [--patients 12] [--seed 2026] [--units 8]
        [--draws 200] [--images 6] [--threads 2]

Issue 16, section 2, checked where the truth is known. In ``WORKSPACE`` (made here when empty, reused after):

1. the synthetic cohort of ``--patients`` patients of cohort ``--seed`` (default the demo's 2026, unseen by the
   shipped model; every patient has a BI-RADS 0 breast), a patch set ``ablation-check`` (the paper's recipe with
   step 128, so each lesion gives several patches) and a dissection run of the shipped model over all of it;
2. patients are split in two halves. On the **selection** half, each unit's dataset-level IoU with the
   ground-truth lesion masks (malignant findings) over the lesion patches: summed intersections over summed
   unions of its masks (map above ``T``, upsampled to 128 x 128 here for speed) and the lesion masks. The
   ``--units`` best units are labelled "lesion (check)" in the concept store (``by = "check-ablation"``);
3. on the **held-out** half's lesion patches: each patch's drop in P(possibly malignant) when the concept's
   units are silenced (``models.ablation``: zero at ``features.29``, the rest of the network finished), against
   ``--draws`` draws of as many random units from the rest of the layer. Printed: the concept's mean drop, the
   random draws' mean drops (mean, 5th / 50th / 95th percentiles, and how many draws reach the concept's), the
   share of patches where the concept's drop beats that patch's random 95th percentile; then by finding type,
   by score band, on held-out normal patches, against the ``--units`` units most *active* on the selection
   lesion patches (so alignment is tested, not activation strength alone), and for other concept sizes;
4. the whole-image reports of ``--images`` held-out lesion mammograms (``Session.report``, what every surface
   shows): the concept's change of the image score against 50 random unit sets of its size, and what a report
   costs without the silencing, with it and nothing cached (the read's silenced scores cleared), and again
   (cached with the read): medians of 5.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.ablation import silenced_scores, tap_layer  # noqa: E402
from models.checkpoint import SHIPPED_DEMO, load_checkpoint, register_model  # noqa: E402
from workspace.base.catalog import get_image, lesions_of, open_catalog  # noqa: E402
from workspace.base.config import Workspace  # noqa: E402
from workspace.base.progress import progress  # noqa: E402
from workspace.data.patches import build_patch_set, lesion_region, open_patch_set  # noqa: E402
from workspace.data.synth import synthesize  # noqa: E402
from workspace.dissect.dissection import unit_masks  # noqa: E402

PATCH_SET = "ablation-check"
CONCEPT = "lesion (check)"
ACTOR = "check-ablation"
MASK_SIZE = 128     # unit and lesion masks compared at 128 x 128 (a 512 patch downsampled 4 x)
BATCH = 8


# ------------------------------------------------------------------------------------------ the workspace
def prepare(ws: Workspace, patients: int, seed: int):
    """The cohort, the patch set and the shipped model's run over it (each step skipped when done)."""
    from workspace.dissect.dissect_run import run_dissection

    db = open_catalog(ws)
    have = db.execute("SELECT COUNT(DISTINCT patient_id) FROM images WHERE dataset = 'synthetic'").fetchone()[0]
    t = time.perf_counter()
    if have < patients:
        synthesize(ws, patients - have, seed=seed, first_patient=have, birads0_fraction=1.0)
    if not db.execute("SELECT 1 FROM patch_sets WHERE patch_set = ?", [PATCH_SET]).fetchone():
        build_patch_set(ws, PATCH_SET, step=128)
    loaded = load_checkpoint(SHIPPED_DEMO, device="cpu")
    register_model(db, loaded)
    run = run_dissection(ws, loaded, patch_set=PATCH_SET, split=None)   # immutable: a second call finds it
    print(f"workspace ready in {time.perf_counter() - t:.0f} s: run {run.run_id} (model {loaded.digest}, "
          f"{loaded.dissected_layer}, {run.n_units} units, {len(run.patch_ids)} patches)")
    return loaded, run


def lesion_truth(ws: Workspace, db, rows: list[dict], size: int) -> tuple[np.ndarray, list[str | None]]:
    """Per patch: the malignant ground-truth findings' mask at MASK_SIZE (a pixel is lesion when most of its
    4 x 4 block is) and the finding type covering most of the patch (None: no malignant finding in it)."""
    regions: dict[str, list] = {}
    masks = np.zeros((len(rows), MASK_SIZE, MASK_SIZE), bool)
    kinds: list[str | None] = []
    f = size // MASK_SIZE
    for n, row in enumerate(rows):
        image_id = row["image_id"]
        if image_id not in regions:
            image = dict(get_image(db, image_id))
            regions[image_id] = [(lesion_region(ws, image, le), json.loads(le["attributes"] or "{}").get("finding"))
                                 for le in lesions_of(db, image_id)
                                 if le["source"] == "ground_truth" and le["pathology"] == "malignant"]
        x, y = int(row["x"]), int(row["y"])
        full = np.zeros((size, size), bool)
        best, kind = 0, None
        for region, finding in regions[image_id]:
            x0, y0, x1, y1 = region.box
            ix0, iy0, ix1, iy1 = max(x, x0), max(y, y0), min(x + size, x1), min(y + size, y1)
            if ix0 >= ix1 or iy0 >= iy1:
                continue
            part = region.mask[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
            full[iy0 - y:iy1 - y, ix0 - x:ix1 - x] |= part
            if part.sum() > best:
                best, kind = int(part.sum()), finding
        masks[n] = full.reshape(MASK_SIZE, f, MASK_SIZE, f).mean(axis=(1, 3)) >= 0.5
        kinds.append(kind)
    return masks, kinds


def layer_pass(loaded, patch_set, rows: list[dict], desc: str) -> tuple[np.ndarray, torch.Tensor]:
    """Scores and float32 maps of patch-set rows (one forward pass each)."""
    scores, maps = [], []
    for start in progress(range(0, len(rows), BATCH), desc=desc, unit="batch"):
        chunk = rows[start:start + BATCH]
        s, m = tap_layer(loaded, patch_set.batch([r["array_index"] for r in chunk]))
        scores.append(s)
        maps.append(m.float().contiguous())
    return np.concatenate(scores), torch.cat(maps)


# ------------------------------------------------------------------------------------------- the numbers
def drops(loaded, maps: torch.Tensor, scores: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """(groups, patches): the score minus the score with each group silenced (positive: the score fell)."""
    return scores[None, :] - silenced_scores(loaded, maps, groups)


def random_groups(rng, n_units: int, k: int, exclude: list[int], draws: int) -> list[list[int]]:
    pool = np.setdiff1d(np.arange(n_units), exclude)
    return [sorted(int(u) for u in rng.choice(pool, size=k, replace=False)) for _ in range(draws)]


def compare(name: str, concept: np.ndarray, random: np.ndarray) -> dict:
    """One row: the concept's mean drop against the random draws' mean drops, and per patch against the draws."""
    per_draw = random.mean(axis=1)
    p5, p50, p95 = np.percentile(per_draw, [5, 50, 95])
    patch_p95 = np.percentile(random, 95, axis=0)
    return {"name": name, "n": concept.size, "concept": float(concept.mean()), "random_mean": float(per_draw.mean()),
            "p5": float(p5), "p50": float(p50), "p95": float(p95),
            "draws_at_least": int((per_draw >= concept.mean()).sum()), "draws": len(per_draw),
            "beats_p95": float((concept > patch_p95).mean()) if concept.size else float("nan"),
            "below_median": int((concept <= np.median(random, axis=0)).sum())}


def print_rows(rows: list[dict]) -> None:
    print("| patches | n | concept mean drop | random mean drop: mean | p5 | p50 | p95 | draws >= concept | "
          "patches beating their random p95 | patches at or below their random median |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['n']} | {r['concept']:+.4f} | {r['random_mean']:+.4f} | {r['p5']:+.4f} | "
              f"{r['p50']:+.4f} | {r['p95']:+.4f} | {r['draws_at_least']}/{r['draws']} | {r['beats_p95']:.0%} | "
              f"{r['below_median']} |")


def timed(call, repeat: int = 5) -> float:
    """Median milliseconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", required=True)
    ap.add_argument("--patients", type=int, default=12)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--units", type=int, default=8, help="units labelled with the lesion concept")
    ap.add_argument("--draws", type=int, default=200, help="random unit sets per comparison")
    ap.add_argument("--images", type=int, default=6, help="held-out lesion mammograms given a whole-image report")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    ws = Workspace.open(args.workspace)
    loaded, run = prepare(ws, args.patients, args.seed)
    db = open_catalog(ws)
    patch_set = open_patch_set(ws, PATCH_SET)
    patient = {r["image_id"]: r["patient_id"] for r in db.query("SELECT image_id, patient_id FROM images")}
    patients = sorted(set(patient.values()))
    selection_patients = set(patients[0::2])
    lesion_rows = [r for r in patch_set.rows if r["label"] == 1]
    normal_rows = [r for r in patch_set.rows if r["label"] == 0 and patient[r["image_id"]] not in selection_patients]
    select = [r for r in lesion_rows if patient[r["image_id"]] in selection_patients]
    held = [r for r in lesion_rows if patient[r["image_id"]] not in selection_patients]
    def lesions(rows: list[dict]) -> str:
        return (f"{len({(r['image_id'], r['lesion_id']) for r in rows})} lesions in "
                f"{len({r['image_id'] for r in rows})} images")

    print(f"{len(patients)} patients: {len(selection_patients)} for selection ({len(select)} lesion patches, "
          f"{lesions(select)}), {len(patients) - len(selection_patients)} held out ({len(held)} lesion patches, "
          f"{lesions(held)}; {len(normal_rows)} normal patches); operating point {loaded.operating_point:.3f}. "
          "Patches of one lesion overlap (step 128): they are not independent.")

    # 2. the lesion concept: the units whose masks best align with the lesion masks on the selection half
    thresholds = np.asarray(run.thresholds, dtype=np.float32)
    select_scores, select_maps = layer_pass(loaded, patch_set, select, "selection patches")
    truth, _ = lesion_truth(ws, db, select, patch_set.size)
    inter = np.zeros(run.n_units)
    union = np.zeros(run.n_units)
    for m, lesion in zip(select_maps.numpy(), truth, strict=True):
        masks = unit_masks(m, thresholds, MASK_SIZE)
        inter += (masks & lesion).sum(axis=(1, 2))
        union += (masks | lesion).sum(axis=(1, 2))
    iou = inter / np.maximum(union, 1)
    ranked = [int(u) for u in np.argsort(-iou, kind="stable")]
    concept_units = sorted(ranked[:args.units])
    peak = select_maps.amax(dim=(2, 3)).numpy().mean(axis=0)              # mean max activation per unit
    active_units = sorted(int(u) for u in np.argsort(-peak, kind="stable")[:args.units])
    print(f"lesion concept: units {concept_units} (dataset IoU with lesion masks "
          f"{', '.join(f'{iou[u]:.3f}' for u in sorted(concept_units, key=lambda u: -iou[u]))}; "
          f"the layer's median unit {np.median(iou):.3f}); most active units {active_units} "
          f"({len(set(active_units) & set(concept_units))} shared)")
    from workspace.dissect.concepts import ConceptStore

    with ConceptStore(ws) as store:
        old = [u for u, c in store.labels(run.model_digest, run.layer).items() if c.name == CONCEPT]
        if old:
            store.remove_labels(run.model_digest, run.layer, old, by=ACTOR, source="api", concept=CONCEPT)
        store.label_units(run.model_digest, run.layer, concept_units, CONCEPT, by=ACTOR, source="api",
                          run_id=run.run_id, n_units=run.n_units, note="best dataset IoU with lesion masks, "
                          "selection half of bench/check_ablation.py")

    # 3. held-out lesion patches: the concept against random units of the rest of the layer
    rng = np.random.default_rng(0)
    held_scores, held_maps = layer_pass(loaded, patch_set, held, "held-out lesion patches")
    _, kinds = lesion_truth(ws, db, held, patch_set.size)
    t = time.perf_counter()
    randoms = random_groups(rng, run.n_units, args.units, concept_units, args.draws)
    d = drops(loaded, held_maps, held_scores, [concept_units, active_units, *randoms])
    concept, active, random = d[0], d[1], d[2:]
    print(f"{args.draws + 2} unit sets x {len(held)} patches silenced in {time.perf_counter() - t:.1f} s")
    print(f"\nDrop in {loaded.score_label} when {args.units} units are silenced (score as read minus silenced; "
          f"positive: the score fell). Random: {args.draws} draws of {args.units} units outside the concept.\n")
    rows = [compare("held-out lesion patches", concept, random)]
    kinds_arr = np.array([k or "none" for k in kinds])
    for kind in sorted(set(kinds_arr)):
        sel = kinds_arr == kind
        rows.append(compare(f"  {kind}", concept[sel], random[:, sel]))
    high = held_scores >= loaded.operating_point
    for label, sel in ((f"  scored >= operating point {loaded.operating_point:.2f}", high),
                       ("  scored below it", ~high)):
        if sel.any():
            rows.append(compare(label, concept[sel], random[:, sel]))
    if normal_rows:
        normal_scores, normal_maps = layer_pass(loaded, patch_set, normal_rows, "held-out normal patches")
        nd = drops(loaded, normal_maps, normal_scores, [concept_units, *randoms])
        rows.append(compare("held-out normal patches", nd[0], nd[1:]))
    print_rows(rows)
    print(f"\nThe {args.units} most active units on the selection lesion patches (not picked by alignment): mean "
          f"drop {active.mean():+.4f} on the held-out lesion patches (concept {concept.mean():+.4f}); "
          f"beats its random p95 on {(active > np.percentile(random, 95, axis=0)).mean():.0%} of the patches.")
    worst = np.argsort(concept - np.median(random, axis=0))[:8]
    print("Held-out lesion patches where the concept does least against random units (patch, finding, score, "
          "concept drop, random median):")
    for i in worst:
        print(f"  patch {held[i]['patch_id']} {kinds[i] or 'no malignant finding'} score {held_scores[i]:.3f} "
              f"drop {concept[i]:+.4f} random median {np.median(random[:, i]):+.4f}")
    print("\nOther concept sizes (top-k by selection IoU, 100 random draws each):")
    print("| k | concept mean drop | random p50 | random p95 | patches beating their random p95 |")
    print("| --- | --- | --- | --- | --- |")
    for k in sorted({4, 16, 32} - {args.units}):
        units = sorted(ranked[:k])
        dk = drops(loaded, held_maps, held_scores, [units, *random_groups(rng, run.n_units, k, units, 100)])
        r = compare(str(k), dk[0], dk[1:])
        print(f"| {k} | {r['concept']:+.4f} | {r['p50']:+.4f} | {r['p95']:+.4f} | {r['beats_p95']:.0%} |")

    # 4. whole-image reports of held-out lesion mammograms, through the Session every surface opens
    from workspace.dissect.reports import concept_groups
    from workspace.dissect.session import Session

    image_ids = sorted({r["image_id"] for r in held})[:args.images]
    print(f"\nWhole-image reports ({len(image_ids)} held-out lesion mammograms; change of the image score = "
          "highest patch score):")
    print("| image | patches | image score | concept's change | random changes: p5 | p50 | p95 | "
          "report ms (median of 5): no silencing | first (nothing cached) | again (cached) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with Session.open(ws, run=run, loaded=loaded) as session:
        labels = session.labels()
        concept_id = next(c.concept_id for c in labels.values() if c.name == CONCEPT)
        for image_id in image_ids:
            read = session.read(image_id)
            plain = timed(lambda i=image_id: session.report(i, thumbnail=False, silence=False))
            first = timed(lambda i=image_id, r=read: (r.silenced.clear(), session.report(i, thumbnail=False)))
            cached = timed(lambda i=image_id: session.report(i, thumbnail=False))
            report = session.report(image_id, thumbnail=False)
            change = report.concept(CONCEPT).score_change
            groups = dict(enumerate(random_groups(rng, run.n_units, len(concept_groups(labels)[concept_id]),
                                                  concept_units, 50)))
            rand = np.array(list(session.score_changes(image_id, groups).changes.values()))
            p5, p50, p95 = np.percentile(rand, [5, 50, 95])
            print(f"| {image_id} | {len(read.scores)} | {read.image_score:.3f} | {change:+.4f} | {p5:+.4f} | "
                  f"{p50:+.4f} | {p95:+.4f} | {plain:.1f} | {first:.1f} | {cached:.1f} |")
    print(f"\n{len(labels)} labelled units in {len(concept_groups(labels))} concept(s) at report time; "
          f"total {time.perf_counter() - started:.0f} s on {args.threads} thread(s), torch {torch.__version__}")


if __name__ == "__main__":
    main()
