"""``mammo train``: train a patch classifier on a workspace patch set (the paper's recipe by default).

The model and its resume state live in ``WORKSPACE/models/NAME/`` (``model.pt``, ``resume.pt``,
``history.json``, ``roc.png``). Running the same command again after an interruption continues from the
last finished epoch; ``--restart`` starts over.
"""

from __future__ import annotations

import argparse

ORDER = 40


def _run(args: argparse.Namespace) -> int:
    import torch

    from models.data import PatchData
    from models.evaluate import summary_lines
    from models.train import Recipe, train
    from workspace.base.config import Workspace

    if args.threads:
        torch.set_num_threads(args.threads)
    ws = Workspace.open(args.workspace)
    data = PatchData.from_patch_set(ws, args.patch_set)
    recipe = Recipe(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    weight_decay=args.weight_decay, hflip_p=args.hflip, blur_p=args.blur,
                    blur_kernel=args.blur_kernel, blur_sigma=(args.blur_sigma[0], args.blur_sigma[1]),
                    normalisation={"mean": args.mean, "std": args.std}, seed=args.seed,
                    operating_point_rule=args.operating_point, bootstrap=args.bootstrap,
                    batch_norm=not args.no_batch_norm)
    name = args.name or f"{args.arch}-{args.patch_set}"
    counts = data.split_counts()
    print(f"training {args.arch} on patch set {args.patch_set!r}: "
          + ", ".join(f"{s} {c['patches']} patches ({c['lesion']} lesion, {c['patients']} patients)"
                      for s, c in counts.items()))
    result = train(data, recipe, ws.models_dir / name, device=args.device, restart=args.restart, name=name,
                   training_domain=training_domain(ws, args.patch_set))
    if result.resumed_from_epoch:
        print(f"continued from epoch {result.resumed_from_epoch}")
    training = result.meta["training"]
    print(f"kept epoch {training['best_epoch']} (lowest validation loss {training['best_val_loss']:.4f}); "
          f"{training['seconds']:.0f} s of training")
    if result.meta.get("metrics"):
        for line in summary_lines(result.meta["metrics"]):
            print(line)
        print(f"ROC curve: {result.path.parent / 'roc.png'}")
    print(f"model: {result.path} (digest {result.digest})")
    return 0


def training_domain(ws, patch_set: str) -> dict | None:
    """The domain profile of the images behind a patch set's training patches (None when there are none)."""
    from workspace.base.catalog import open_catalog
    from workspace.data.domain import domain_profile, features_of

    db = open_catalog(ws)
    rows = [dict(r) for r in db.query(
        "SELECT * FROM images WHERE image_id IN (SELECT image_id FROM patches WHERE patch_set = ? AND split = "
        "'train') ORDER BY image_id", [patch_set])]
    if not rows:
        return None
    return domain_profile([features_of(ws, r, db=db) for r in rows], [r["dataset"] for r in rows])


def add_parser(subparsers, parents) -> None:
    p = subparsers.add_parser(
        "train", parents=parents, help="train the patch classifier (resumable)",
        description="Train vgg16_1ch or vgg16_slim on a patch set with the paper's recipe (flip + blur, "
                    "mean/std 0.5, cross-entropy, Adam 1e-4, batch 32, 50 epochs, lowest validation loss "
                    "kept); vgg16_slim on a CPU defaults to a shorter schedule. Re-run to resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="vgg16_slim", choices=("vgg16_slim", "vgg16_1ch"))
    p.add_argument("--patch-set", default="default", help="patch set name (`mammo patches`)")
    p.add_argument("--name", help="model name (folder under WORKSPACE/models; default ARCH-PATCHSET)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs (default 50; 20 for vgg16_slim on a CPU)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--hflip", type=float, default=0.5, help="probability of a horizontal flip")
    p.add_argument("--blur", type=float, default=0.5, help="probability of a Gaussian blur")
    p.add_argument("--blur-kernel", type=int, default=5)
    p.add_argument("--blur-sigma", type=float, nargs=2, default=(0.1, 2.0), metavar=("LOW", "HIGH"))
    p.add_argument("--mean", type=float, default=0.5, help="normalisation mean")
    p.add_argument("--std", type=float, default=0.5, help="normalisation std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-batch-norm", action="store_true",
                   help="train the plain convolutions (default: batch norm while training, folded into the "
                        "convolutions when the model is saved)")
    p.add_argument("--operating-point", default="youden",
                   help="rule on validation: youden, sensitivity:S or fixed:T")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CI")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the GPU when there is one)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--restart", action="store_true", help="discard an unfinished training and start over")
    p.set_defaults(func=_run)
