"""``mammo query IMAGE_ID --roi x,y,w,h | --roi-mask PNG``: which units align with a region of a mammogram.

The ROI is in full-image pixels, normalised orientation (chest wall on the left, as `mammo read` and
the display PNGs show it). Units are ranked by the IoU of their masks with the ROI, summed over the
patches the ROI covers; the thresholds come from the latest dissection run of the model (or --run).
"""

from __future__ import annotations

import argparse

from workspace.commands import add_model_options, given, load_model

ORDER = 46


def _parse_box(text: str) -> tuple[float, float, float, float]:
    from workspace.errors import QueryError

    parts = text.replace(" ", "").split(",")
    try:
        x, y, w, h = (float(p) for p in parts)
    except ValueError:
        raise QueryError(f"--roi wants x,y,w,h in pixels, got {text!r}") from None
    return x, y, w, h


def _load_mask(path: str, shape: tuple[int, int]):
    import numpy as np
    from PIL import Image

    from workspace.errors import QueryError

    try:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L")) > 127
    except (OSError, ValueError) as error:
        raise QueryError(f"cannot read the ROI mask {path}: {error}") from None
    if mask.shape != shape:
        raise QueryError(f"the ROI mask {path} is {mask.shape[1]}x{mask.shape[0]}, the image is "
                         f"{shape[1]}x{shape[0]} (columns x rows)")
    return mask


def _run(args: argparse.Namespace) -> int:
    import json

    from workspace.catalog import get_image, open_catalog
    from workspace.config import Workspace
    from workspace.dissect_run import latest_run, load_run
    from workspace.errors import QueryError
    from workspace.query import query_image, roi_from_box

    ws = Workspace.open(args.workspace)
    image = get_image(open_catalog(ws), args.image_id)
    shape = (int(image["rows"]), int(image["cols"]))
    if (args.roi is None) == (args.roi_mask is None):
        raise QueryError("give exactly one of --roi x,y,w,h or --roi-mask PNG")
    roi = roi_from_box(_parse_box(args.roi), shape) if args.roi else _load_mask(args.roi_mask, shape)
    loaded = load_model(ws, args)
    run = load_run(ws, args.run) if args.run else latest_run(ws, loaded.digest, loaded.dissected_layer)
    if run is None:
        raise QueryError(f"no dissection run of model {loaded.digest} layer {loaded.dissected_layer}: "
                         "run `mammo dissect` first")
    result = query_image(ws, args.image_id, roi, loaded, run, **given(args, "iou_threshold"))
    labels = {}
    try:
        from workspace.concepts import ConceptStore

        labels = {u: c.name for u, c in ConceptStore(ws).labels(run.model_digest, run.layer).items()}
    except Exception:  # noqa: BLE001 - concept names are a courtesy; the ranking stands without them
        labels = {}
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
    p.add_argument("--roi-mask", metavar="PNG", help="a mask image of the image's size (white = ROI)")
    p.add_argument("--run", metavar="RUN_ID", help="dissection run (default: the model's latest)")
    p.add_argument("--iou-threshold", type=float,   # the library's default (tests/test_cli.py checks the help)
                   help="units at or above this IoU are aligned (default 0.2)")
    p.add_argument("--top", type=int, default=20, help="how many ranked units to print (default 20)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_model_options(p)
    p.set_defaults(func=_run)
