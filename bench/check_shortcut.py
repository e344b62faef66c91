"""Shortcut check: does a patch classifier score the dark background past the skin line, not lesions?

    .venv/bin/python bench/check_shortcut.py -w WORKSPACE [--model PATH|NAME] [--patch-set default]
        [--limit N] [--images 6] [--threads 2]

Prints (the numbers of models/README.md, "No skin-line shortcut" and "History"):

- the model's recorded facts: digest, operating point, recorded split counts, best epoch, training
  seconds, test AUC;
- patch scores by class and "has background" (more than ``--bg-fraction`` of the patch at or below
  ``--bg-level`` of 65535, i.e. 0.046: dark background past the skin line): count, mean P(possibly
  malignant), share flagged at the operating point, over the whole patch set and its test split;
- AUC of lesion patches WITHOUT background against all normal patches (the model's skill once the
  background cue is taken away) and AUC of the cue alone ("has background" as the score);
- whole-mammogram reads (``read_mammogram``, cached per model) of ``--images`` normal test mammograms:
  patches on the skin line (less than ``--edge`` of the patch breast foreground) against interior ones.

``--limit N`` scores N patches spread evenly over the set (quicker, approximate); without it every
patch is scored (918 patches: about a minute on 2 CPU threads).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpoint import load_checkpoint, resolve_model_path  # noqa: E402
from models.data import PatchData  # noqa: E402
from models.evaluate import roc_auc  # noqa: E402
from models.inference import read_mammogram  # noqa: E402
from workspace.base.catalog import open_catalog  # noqa: E402
from workspace.base.config import Workspace  # noqa: E402
from workspace.base.progress import progress  # noqa: E402
from workspace.data.ingest import load_foreground  # noqa: E402

GROUPS = (("lesion+bg", 1, True), ("lesion-bg", 1, False), ("normal+bg", 0, True), ("normal-bg", 0, False))


def score_with_background(loaded, data: PatchData, positions: np.ndarray, bg_level: int, bg_fraction: float,
                          batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """P(possibly malignant) and "has background" per patch, from one read of each patch's pixels."""
    scores = np.empty(len(positions), np.float64)
    background = np.empty(len(positions), bool)
    for start in progress(range(0, len(positions), batch_size), desc="scoring patches", unit="batch"):
        x = data.batch(positions[start:start + batch_size])
        scores[start:start + len(x)] = loaded.predict_proba(x).double().numpy()
        dark = np.rint(x.numpy() * 65535) <= bg_level  # the stored uint16 values, exactly
        background[start:start + len(x)] = dark.reshape(len(x), -1).mean(1) > bg_fraction
    return scores, background


def patch_report(data: PatchData, positions: np.ndarray, scores: np.ndarray, background: np.ndarray,
                 op: float) -> None:
    labels, splits = data.labels[positions], data.splits[positions]
    for name, selected in (("all", np.ones(len(positions), bool)), ("test", splits == "test")):
        for group, label, has_bg in GROUPS:
            m = selected & (labels == label) & (background == has_bg)
            if m.any():
                print(f"  [{name}] {group:10s} n={m.sum():4d}  mean score {scores[m].mean():.3f}  "
                      f"flagged {(scores[m] >= op).mean():.2f}")
        lesions = selected & (labels == 1)
        print(f"  [{name}] lesion patches with background: {background[lesions].mean():.1%} of "
              f"{lesions.sum()}")
        m = selected & ~((labels == 1) & background)
        print(f"  [{name}] AUC lesion-without-background vs normals {roc_auc(labels[m], scores[m]):.3f}; "
              f"AUC of the cue alone (has background as the score) "
              f"{roc_auc(labels[selected], background[selected].astype(float)):.3f}")


def read_report(ws: Workspace, loaded, n_images: int, edge: float) -> None:
    db = open_catalog(ws)
    rows = list(db.query("SELECT * FROM images WHERE label = 0 AND split = 'test' ORDER BY source_path LIMIT ?",
                         [n_images]))
    edge_scores, inner_scores = [], []
    for row in rows:
        read = read_mammogram(ws, row["image_id"], loaded, keep_maps=False, db=db)
        foreground = load_foreground(ws, row)
        for (x, y, w, h), score in zip(read.boxes, read.scores, strict=True):
            (edge_scores if foreground[y:y + h, x:x + w].mean() < edge else inner_scores).append(score)
        print(f"  read {row['image_id']}: {len(read.scores)} patches, max {read.image_score:.3f}, "
              f"flagged {len(read.suspicious)}")
    op = loaded.operating_point
    for name, values in ((f"skin-line patches (< {edge:.0%} breast)", edge_scores), ("interior", inner_scores)):
        values = np.asarray(values)
        if len(values):
            print(f"  {len(rows)} normal test mammograms, {name}: n={len(values)} mean {values.mean():.3f} "
                  f"flagged {int((values >= op).sum())}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workspace", required=True)
    parser.add_argument("--model", help="checkpoint file or workspace model name (default: the shipped demo)")
    parser.add_argument("--patch-set", default="default")
    parser.add_argument("--limit", type=int, help="score only this many patches, spread evenly over the set")
    parser.add_argument("--images", type=int, default=6, help="normal test mammograms to read (0: none)")
    parser.add_argument("--bg-level", type=int, default=3000, help="background: stored value at or below (/65535)")
    parser.add_argument("--bg-fraction", type=float, default=0.01, help="background: share of the patch above")
    parser.add_argument("--edge", type=float, default=0.9, help="skin-line patch: breast share below")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("MAMMO_QUIET", "1")
    torch.set_num_threads(args.threads)

    ws = Workspace.open(args.workspace)
    loaded = load_checkpoint(resolve_model_path(ws, args.model), "cpu")
    meta, op = loaded.meta, loaded.operating_point
    training, test = meta.get("training", {}), meta.get("metrics", {}).get("test", {})
    print(f"model {loaded.path} digest {loaded.digest}, operating point {op:.3f}; trained on patch set digest "
          f"{meta.get('data_digest')}, best epoch {training.get('best_epoch')} (val loss "
          f"{training.get('best_val_loss', float('nan')):.3f}) of {training.get('epochs_run')} in "
          f"{training.get('seconds')} s, recorded test AUC {test.get('auc', float('nan')):.3f}")
    for split, counts in meta.get("split", {}).items():
        print(f"  recorded {split}: {counts}")

    data = PatchData.from_patch_set(ws, args.patch_set)
    positions = np.arange(len(data))
    if args.limit and args.limit < len(data):
        positions = np.unique(np.linspace(0, len(data) - 1, args.limit).round().astype(np.int64))
    print(f"patch set {args.patch_set!r} digest {data.digest}: scoring {len(positions)} of {len(data)} patches")
    scores, background = score_with_background(loaded, data, positions, args.bg_level, args.bg_fraction)
    patch_report(data, positions, scores, background, op)
    if args.images:
        read_report(ws, loaded, args.images, args.edge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
