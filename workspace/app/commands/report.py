"""``mammo report IMAGE_ID``: the concept report of one read (activation value, activation area, effect on
the score when each concept is silenced, label me).

The ROI is in the image's normalised orientation (chest wall on the left), full-resolution pixels: a
box ``--roi x,y,w,h`` or a mask PNG ``--roi-mask`` of the image's size (non-zero pixels are the ROI).
HTML goes to ``reports/<image_id>.html`` unless ``--out`` says otherwise; JSON and text go to stdout
unless ``--out`` is given.
"""

from __future__ import annotations

import argparse

ORDER = 52


def _ints(text: str, what: str) -> list[int]:
    from workspace.base.errors import MammoError

    try:
        values = [int(round(float(v))) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise MammoError(f"{what} is x,y,w,h in image pixels (e.g. 1200,800,300,250), not {text!r}")
    return values


def _run(args: argparse.Namespace) -> int:
    from workspace.base.config import Workspace
    from workspace.dissect.session import Session, roi_mask_from_png

    ws = Workspace.open(args.workspace)
    with Session.open(ws, run=args.run) as session:
        roi = None
        if args.roi:
            roi = _ints(args.roi, "--roi")
        elif args.roi_mask:
            row = session.image(args.image_id)
            roi = roi_mask_from_png(args.roi_mask, (int(row["rows"]), int(row["cols"])))
        patch = _ints(args.patch, "--patch") if args.patch else None
        report = session.report(args.image_id, roi, patch_box=patch, record=args.record,
                                asked_by=args.by or "cli", source="cli", silence=not args.no_silence)
    fmt = args.format
    if args.out:
        print(report.save(args.out, fmt))
    elif fmt == "html":
        print(report.save(ws.reports_dir / f"{args.image_id}.html", "html"))
    else:
        print(report.to_json() if fmt == "json" else report.to_text())
    return 0


def add_parser(subparsers, parents) -> None:
    parser = subparsers.add_parser(
        "report", parents=parents, help="the concept report of one image (HTML, JSON or text)",
        description="Per concept: the mean max activation of its labelled units on the image (raw and divided "
                    "by each unit's threshold), the change in the score when its units are silenced (set to "
                    "zero at the dissected layer), and with an ROI the mean IoU of its units' masks with it; "
                    "aligned unlabelled units are listed as 'label me'.")
    parser.add_argument("image_id", metavar="IMAGE_ID", help="an image id from `mammo images`")
    roi = parser.add_mutually_exclusive_group()
    roi.add_argument("--roi", metavar="X,Y,W,H", help="a box ROI in image pixels (chest wall on the left)")
    roi.add_argument("--roi-mask", metavar="PNG", help="an ROI mask PNG of the image's size (non-zero = ROI)")
    parser.add_argument("--patch", metavar="X,Y,W,H", help="report on this patch of the read only")
    parser.add_argument("--run", metavar="RUN_ID", help="dissection run (default: the newest complete one)")
    parser.add_argument("--format", choices=("html", "json", "text"), default="html")
    parser.add_argument("--out", metavar="PATH", help="write here (default: reports/IMAGE_ID.html for html, "
                                                     "stdout otherwise)")
    parser.add_argument("--record", action="store_true", help="record the ROI query in the concept store")
    parser.add_argument("--by", metavar="WHO", help="who asked (kept with a recorded query)")
    parser.add_argument("--no-silence", action="store_true",
                        help="leave out each concept's effect on the score (one partial forward pass per "
                             "concept and patch, cached with the read)")
    parser.set_defaults(func=_run)
