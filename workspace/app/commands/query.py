"""``mammo query IMAGE_ID --roi x,y,w,h | --roi-mask PNG``: which units align with a region of a mammogram.

The ROI is in full-image pixels, normalised orientation (chest wall on the left, as `mammo read` and
the display PNGs show it). Units are ranked by the IoU of their masks with the ROI, summed over the
patches the ROI covers; the thresholds come from the session's run (``workspace.dissect.session``: --run, else the
newest run of --model, else the newest run of the workspace).
"""

from __future__ import annotations

import argparse

from workspace.app.commands import add_model_options, given

ORDER = 46


def _parse_box(text: str) -> tuple[float, float, float, float]:
    from workspace.base.errors import QueryError

    parts = text.replace(" ", "").split(",")
    try:
        x, y, w, h = (float(p) for p in parts)
    except ValueError:
        raise QueryError(f"--roi wants x,y,w,h in pixels, got {text!r}") from None
    return x, y, w, h


def _run(args: argparse.Namespace) -> int:
    import json

    from workspace.base.config import Workspace
    from workspace.base.errors import QueryError
    from workspace.dissect.session import Session, roi_mask_from_png

    ws = Workspace.open(args.workspace)
    if (args.roi is None) == (args.roi_mask is None):
        raise QueryError("give exactly one of --roi x,y,w,h or --roi-mask PNG")
    from models.checkpoint import class_options

    session = Session.open(ws, run=args.run, model=args.model, arch=args.arch, layer=args.layer, trust=args.trust,
                           device=args.device, classes=class_options(args.class_names, args.positive_class),
                           **given(args, "iou_threshold"))
    run = session.require_run()
    row = session.image(args.image_id)
    roi = _parse_box(args.roi) if args.roi else roi_mask_from_png(args.roi_mask, (int(row["rows"]), int(row["cols"])))
    result = session.query(args.image_id, roi)
    with session:
        labels = {u: c.name for u, c in session.labels().items()}
    if args.json:
        print(json.dumps({**result.to_dict(args.top), "run_id": run.run_id, "image_id": args.image_id}, indent=2))
        return 0
    print(f"image {args.image_id}, run {run.run_id} ({run.layer}), ROI {result.roi_area} px over "
          f"{len(result.patches)} patch(es)" + (f", {result.roi_pixels_outside} px outside every patch"
                                               if result.roi_pixels_outside else ""))
    print(f"most activated unit: {result.most_activated}; most aligned unit: {result.most_aligned}; "
          f"{len(result.aligned)} unit(s) with IoU >= {result.iou_threshold}")
    print(f"{'rank':>4}  {'unit':>5}  {'IoU':>7}  {'inter':>8}  {'union':>8}  concept")
    for rank, unit in enumerate(result.ranking[:args.top], start=1):
        flag = "*" if result.iou[unit] >= result.iou_threshold else " "
        print(f"{rank:>4}  {unit:>5}  {result.iou[unit]:7.4f}{flag} {result.intersection[unit]:>8}  "
              f"{result.union[unit]:>8}  {labels.get(int(unit), '-')}")
    return 0


def add_parser(subparsers, parents) -> None:
    p = subparsers.add_parser("query", parents=parents, help="rank units by IoU with an ROI on a mammogram",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image_id", metavar="IMAGE_ID")
    p.add_argument("--roi", metavar="X,Y,W,H", help="a box in full-image pixels (normalised orientation)")
    p.add_argument("--roi-mask", metavar="PNG", help="a mask image of the image's size (non-zero = ROI)")
    p.add_argument("--run", metavar="RUN_ID", help="dissection run (default: the newest run of --model, "
                   "else of the workspace)")
    p.add_argument("--iou-threshold", type=float,   # the library's default (tests/test_cli.py checks the help)
                   help="units at or above this IoU are aligned (default 0.2)")
    p.add_argument("--top", type=int, default=20, help="how many ranked units to print (default 20)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_model_options(p)
    p.set_defaults(func=_run)
