"""``mammo evaluate``: test ROC AUC (bootstrap CI), sensitivity/specificity and a ROC picture for a model.

By default the operating point stored in the checkpoint is used (so the numbers match the ones it
records); ``--operating-point RULE`` chooses a new one on the validation split. ``--recorded-test``
needs no patch set: it redraws the checkpoint's recorded synthetic test patches from the generator
(patient k depends only on (seed, k)) and checks the recorded test AUC is reproduced.
"""

from __future__ import annotations

import argparse

from workspace.app.commands import add_model_options, load_model

ORDER = 41


def _run(args: argparse.Namespace) -> int:
    from models.data import PatchData
    from models.evaluate import evaluate_model, plot_roc, summary_lines, write_report
    from workspace.base.config import Workspace

    ws = Workspace.open(args.workspace)
    loaded = load_model(ws, args)
    if args.recorded_test:
        return _recorded(ws, loaded, args)
    data = PatchData.from_patch_set(ws, args.patch_set)
    stored = None if args.operating_point else loaded.meta.get("operating_point")
    metrics, outputs = evaluate_model(loaded, data, operating_point=stored,
                                      rule=args.operating_point or "youden", n_resamples=args.bootstrap,
                                      seed=args.seed)
    out = ws.reports_dir / f"evaluate-{loaded.digest}-{args.patch_set}"
    png = plot_roc(out / "roc.png", outputs["labels"], outputs["scores"], metrics,
                   title=f"{loaded.architecture} {loaded.digest} on {args.patch_set}")
    report = write_report(out / "metrics.json", metrics,
                          {"model": str(loaded.path), "model_digest": loaded.digest, "patch_set": args.patch_set,
                           "patch_set_digest": data.digest, "recorded_metrics": loaded.meta.get("metrics")})
    if data.digest and loaded.meta.get("data_digest") and data.digest != loaded.meta["data_digest"]:
        print(f"note: patch set {args.patch_set!r} is not the one this model was trained on")
    for line in summary_lines(metrics):
        print(line)
    print(f"ROC curve: {png}\nmetrics: {report}")
    return 0


def _recorded(ws, loaded, args: argparse.Namespace) -> int:
    from models.evaluate import reproduce_recorded_test, summary_lines

    result = reproduce_recorded_test(loaded, n_resamples=args.bootstrap, seed=args.seed, folder=ws.root)
    for line in summary_lines(result["metrics"]):
        print(line)
    pixels = result["pixels"]
    if pixels["bit_identical"]:
        verdict = "bit-identical"
    elif pixels["accepted"]:
        verdict = (f"the same within tolerance ({pixels['rule']}; largest block difference "
                   f"{pixels['max_block_difference']:.3f}, {pixels['blocks_differing']:.2%} of blocks differ)")
    else:
        verdict = f"DIFFERENT (the generator changed since training; {pixels['rule']})"
    print(f"recorded test AUC {result['recorded_auc']:.4f}, reproduced {result['auc']:.4f}; pixels {verdict}")
    return 0 if result["reproduced"] else 1


def add_parser(subparsers, parents) -> None:
    p = subparsers.add_parser("evaluate", parents=parents, help="test metrics and ROC curve of a model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--patch-set", default="default")
    p.add_argument("--recorded-test", action="store_true",
                   help="redraw the checkpoint's recorded synthetic test patches and check its test AUC")
    p.add_argument("--operating-point", metavar="RULE",
                   help="choose anew on validation: youden, sensitivity:S or fixed:T")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)
