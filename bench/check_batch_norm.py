"""Does the slim VGG learn from scratch with and without train-time batch norm? Side by side, one run.

    .venv/bin/python bench/check_batch_norm.py -w WORKSPACE [--patch-set default] [--crop 256]
        [--epochs 4] [--disc 0.1] [--threads 2]

Trains ``vgg16_slim`` twice with ``models.train.train`` (the real training code, the default recipe
otherwise) on the central ``--crop`` x ``--crop`` pixels of every patch of a patch set (the lesion lies
at a lesion patch's centre; a smaller crop keeps this check to minutes on two cores): once with the
paper's plain convolutions (``batch_norm=False``) and once with batch norm while training, folded away
when saved (the default). ``--disc C`` first paints a disc of contrast C (radius ``crop / 6``) on the
centre of every lesion patch: a cue any working classifier finds at once, so a loss that stays at
ln 2 = 0.693 there means the training does not work, whatever the data.

Prints per epoch the training and validation loss and the seconds of both, then both test AUCs
(models/README.md, "Training: `mammo train`", the batch-norm bullet; bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.data import PatchData  # noqa: E402
from models.train import Recipe, train  # noqa: E402
from workspace.base.config import Workspace  # noqa: E402


def cropped(data: PatchData, crop: int, disc: float) -> PatchData:
    """The central ``crop`` pixels of every patch, a disc of contrast ``disc`` on the lesion ones."""
    lo = (data.size - crop) // 2
    pixels = np.empty((len(data), crop, crop), np.float32)
    for start in range(0, len(data), 64):
        chunk = np.arange(start, min(start + 64, len(data)))
        pixels[chunk] = data.batch(chunk)[:, 0, lo:lo + crop, lo:lo + crop].numpy()
    if disc:
        yy, xx = np.mgrid[:crop, :crop]
        shape = (((yy - crop / 2) ** 2 + (xx - crop / 2) ** 2) < (crop / 6) ** 2).astype(np.float32)
        pixels[data.labels == 1] += disc * shape
        np.clip(pixels, 0, 1, out=pixels)
    return PatchData.from_arrays(pixels, data.labels, data.splits, data.groups, name=f"{data.name}-crop{crop}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-w", "--workspace", required=True)
    p.add_argument("--patch-set", default="default")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--disc", type=float, default=0.0, help="contrast of a disc painted on lesion patches")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = cropped(PatchData.from_patch_set(Workspace.open(args.workspace), args.patch_set), args.crop, args.disc)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, batch_norm in (("plain", False), ("batch norm", True)):
            recipe = Recipe(epochs=args.epochs, batch_norm=batch_norm, bootstrap=200)
            results[name] = train(data, recipe, Path(tmp) / name.replace(" ", "_"), device="cpu")
    print(f"\npatch set {args.patch_set!r}, central {args.crop} px, disc contrast {args.disc}, "
          f"{args.epochs} epochs, batch 32, Adam 1e-4")
    print(f"{'epoch':>5}  {'plain train':>11} {'plain val':>9} {'s':>4}  {'bn train':>8} {'bn val':>7} {'s':>4}")
    for a, b in zip(results["plain"].history, results["batch norm"].history, strict=True):
        print(f"{a['epoch']:>5}  {a['train_loss']:>11.4f} {a['val_loss']:>9.4f} {a['seconds']:>4.0f}  "
              f"{b['train_loss']:>8.4f} {b['val_loss']:>7.4f} {b['seconds']:>4.0f}")
    for name, result in results.items():
        test = result.meta["metrics"]["test"]
        print(f"{name}: test AUC {test['auc']:.3f} (95 % CI {test['auc_ci']['low']:.3f}-{test['auc_ci']['high']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
