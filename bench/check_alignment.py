"""Alignment check: do a model's units align with lesions more than with any tissue of the same size?

    .venv/bin/python bench/check_alignment.py -w WORKSPACE [--run RUN_ID] [--images 12] [--seed 0]

For each mammogram with a ground-truth lesion that is not benign (up to ``--images``, in source-path
order), reads it with the run's model (cached), then asks two ROIs through ``workspace.dissect.query.query_image``,
exactly what Label Studio's ROI box asks:

- ``lesion``  the lesion's box (normalised orientation);
- ``control`` a box of the same size at a random place of the same breast (box centre on the breast
  foreground, no overlap with any lesion), drawn with ``--seed``.

Prints per ROI the best IoU and the number of aligned units (IoU >= the run's threshold), then the
medians and the share of ROIs with at least one aligned unit, lesion against control: the numbers of
issue 9's note (a reader's lesion ROI should name units; tissue anywhere should name fewer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.inference import read_mammogram  # noqa: E402
from workspace.app.demo_check import lesion_boxes  # noqa: E402
from workspace.base.catalog import get_image, open_catalog  # noqa: E402
from workspace.base.config import Workspace  # noqa: E402
from workspace.base.errors import QueryError  # noqa: E402
from workspace.data.ingest import load_foreground  # noqa: E402
from workspace.dissect.dissect_run import run_or_newest  # noqa: E402
from workspace.dissect.dissection import DEFAULT_IOU_THRESHOLD  # noqa: E402
from workspace.dissect.query import query_image, roi_from_box  # noqa: E402
from workspace.dissect.session import load_run_model  # noqa: E402


def control_box(foreground: np.ndarray, shape: tuple[int, int], w: int, h: int, avoid: list, rng) -> tuple | None:
    """A w x h box centred on the breast foreground (any downsampled breast mask), overlapping none of
    ``avoid``."""
    rows, cols = shape
    fy, fx = np.nonzero(foreground)
    scale_y, scale_x = rows / foreground.shape[0], cols / foreground.shape[1]
    for _ in range(500):
        k = int(rng.integers(len(fy)))
        cx, cy = (fx[k] + 0.5) * scale_x, (fy[k] + 0.5) * scale_y
        x, y = int(cx - w / 2), int(cy - h / 2)
        if x < 0 or y < 0 or x + w > cols or y + h > rows:
            continue
        if all(x + w <= lx or lx + lw <= x or y + h <= ly or ly + lh <= y for lx, ly, lw, lh in avoid):
            return x, y, w, h
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", required=True)
    ap.add_argument("--run", help="dissection run id (default: the newest complete run)")
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--iou", type=float, default=DEFAULT_IOU_THRESHOLD)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    ws = Workspace.open(args.workspace)
    db = open_catalog(ws)
    run = run_or_newest(ws, args.run)
    loaded = load_run_model(ws, run)
    rng = np.random.default_rng(args.seed)
    rows = list(db.query(
        "SELECT DISTINCT i.image_id, i.source_path FROM images i JOIN lesions l ON l.image_id = i.image_id "
        "WHERE l.source = 'ground_truth' AND COALESCE(l.pathology, '') != 'benign' ORDER BY i.source_path LIMIT ?",
        [args.images]))
    print(f"run {run.run_id} (model {run.model_digest}, layer {run.layer}, {run.n_units} units), "
          f"IoU threshold {args.iou:g}, {len(rows)} images")
    found: dict[str, list[tuple[float, int]]] = {"lesion": [], "control": []}
    for row in rows:
        image_id = row["image_id"]
        image = get_image(db, image_id)
        shape = (int(image["rows"]), int(image["cols"]))
        read_mammogram(ws, image_id, loaded)
        boxes = lesion_boxes(ws, image_id)
        foreground = load_foreground(ws, image)[::8, ::8]
        for box in boxes:
            pairs = [("lesion", box), ("control", control_box(foreground, shape, box[2], box[3], boxes, rng))]
            for kind, roi_box in pairs:
                if roi_box is None:
                    continue
                try:
                    answer = query_image(ws, image_id, roi_from_box(roi_box, shape), loaded, run,
                                         iou_threshold=args.iou)
                except QueryError as exc:  # e.g. a lesion on the skin line, where no patch was read
                    print(f"  {image_id} {kind:8s} box {list(map(int, roi_box))}: skipped ({exc})")
                    continue
                best = float(answer.iou[answer.ranking[0]])
                aligned = int(len(answer.aligned))
                found[kind].append((best, aligned))
                print(f"  {image_id} {kind:8s} box {list(map(int, roi_box))}: best IoU {best:.3f}, "
                      f"{aligned} aligned (top units {[int(u) for u in answer.ranking[:3]]})")
    for kind, values in found.items():
        if not values:
            continue
        best = np.array([v[0] for v in values])
        aligned = np.array([v[1] for v in values])
        print(f"{kind:8s} n={len(values):3d}  median best IoU {np.median(best):.3f}  mean {best.mean():.3f}  "
              f"ROIs with >= 1 aligned unit {np.mean(aligned > 0):.0%}  median aligned {np.median(aligned):.0f}")


if __name__ == "__main__":
    main()
