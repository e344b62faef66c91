"""``mammo patches``: build the paper's patch set (lesion and normal patches, balanced, split by patient), or
with ``--tissue`` an unlabelled one (every patch of every image's read grid) that dissection can run on."""

from __future__ import annotations

import argparse
import json

ORDER = 25


def _run(args: argparse.Namespace) -> int:
    from workspace.base.config import Workspace
    from workspace.data.patches import build_patch_set, build_tissue_patch_set

    ws = Workspace.open(args.workspace)
    if args.tissue:
        summary = build_tissue_patch_set(ws, args.name or "tissue", size=args.size, dataset=args.dataset)
        if args.json:
            print(json.dumps(summary, indent=2))
            return 0
        print(f"patch set {summary['patch_set']!r}: {summary['n_patches']} unlabelled tissue patches of "
              f"{summary['images']} image(s); digest {summary['digest']}; pixels {summary['pixels_path']}")
        for problem in summary["problems"]:
            print(f"  problem: {problem}")
        return 0
    summary = build_patch_set(ws, args.name or "default", size=args.size, step=args.step, inside=args.inside,
                              normal=args.normal, seed=args.seed, dataset=args.dataset)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        splits = ", ".join(f"{s}: {c['lesion']} lesion / {c['normal']} normal"
                           for s, c in sorted(summary["per_split"].items()))
        print(f"patch set {summary['patch_set']!r}: {summary['n_patches']} patches "
              f"({summary['lesion_patches']} lesion, {summary['normal_patches']} normal; {splits}); "
              f"digest {summary['digest']}; pixels {summary['pixels_path']}")
        for problem in summary["problems"]:
            print(f"  problem: {problem}")
    return 0


def add_parser(subparsers, parents) -> None:
    parser = subparsers.add_parser(
        "patches", parents=parents, help="build the patch set (lesion and normal patches) from the catalog",
        description="Crop SIZE x SIZE patches with step STEP: lesion patches inside each annotated region of "
                    "BI-RADS 0 images (the ellipses of the annotated copies, else masks/boxes/contours), normal "
                    "patches of BI-RADS 1/2 images whose centre is in the breast with at least a quarter of it breast (--normal), "
                    "balanced, split by patient.")
    parser.add_argument("--name", default=None, help="patch set name (default: default; with --tissue: tissue)")
    parser.add_argument("--tissue", action="store_true",
                        help="no labels needed: every SIZE x SIZE patch of every image's read grid (at least 10 %% "
                             "breast), unlabelled, for `mammo dissect --patch-set tissue --split all`")
    parser.add_argument("--size", type=int, default=512, help="patch side in pixels (default 512)")
    parser.add_argument("--step", type=int, default=256, help="grid step in pixels (default 256)")
    parser.add_argument("--inside", default="centre", metavar="RULE",
                        help="when a lesion patch is inside its region: centre (default: the patch centre is "
                             "in it), all (the whole patch), fraction:F (at least F of the patch area)")
    parser.add_argument("--normal", default="centre:0.25", metavar="RULE",
                        help="where a normal patch may lie: centre:F (default centre:0.25: the patch centre is in "
                             "the breast and at least F of the patch is breast, as lesion patches near the skin "
                             "line are), centre (F = 0), all (the whole patch in the breast: the original recipe, "
                             "which taught the model that background means lesion)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the normal-patch draw (default 0)")
    parser.add_argument("--dataset", default=None, help="use only this dataset's images (default: all)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=_run)
