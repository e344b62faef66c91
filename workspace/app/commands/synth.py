"""``mammo synth --patients N``: make a synthetic screening cohort (MG DICOM) and import it."""

from __future__ import annotations

import argparse

ORDER = 15
SMALL_SHAPE = (832, 640)


def _run(args: argparse.Namespace) -> int:
    from workspace.base.config import Workspace
    from workspace.data.synth import synthesize

    ws = Workspace.open(args.workspace)
    summary = synthesize(ws, args.patients, seed=args.seed, first_patient=args.first_patient,
                         image_shape=SMALL_SHAPE if args.small else None, variants=not args.no_variants,
                         birads0_fraction=args.birads0_fraction)
    print(summary.to_text())
    return 0


def add_parser(subparsers, parents) -> None:
    parser = subparsers.add_parser(
        "synth", parents=parents, help="make a synthetic mammography cohort and import it",
        description="Write N synthetic patients (4 MG DICOM images each: L/R x CC/MLO) into the workspace and "
                    "import them: BI-RADS 0 images carry findings (masses, calcifications, distortion) with "
                    "exact masks and a low-resolution annotated copy with white ellipses; BI-RADS 1/2 images are "
                    "normal or hold benign findings. Patient K depends only on (seed, K): re-running skips "
                    "what is already there.")
    parser.add_argument("--patients", type=int, required=True, metavar="N", help="how many patients")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument("--first-patient", type=int, default=0, metavar="K",
                        help="index of the first patient (default 0): make patients K .. K+N-1")
    parser.add_argument("--small", action="store_true",
                        help=f"small images ({SMALL_SHAPE[0]} x {SMALL_SHAPE[1]}) instead of full size "
                             "(3328 x 2560), for quick trials")
    parser.add_argument("--no-variants", action="store_true",
                        help="plain MONOCHROME2 uncompressed files only (no reader-path variants)")
    parser.add_argument("--birads0-fraction", type=float, default=0.5, metavar="F",
                        help="share of patients with BI-RADS 0 findings (default 0.5)")
    parser.set_defaults(func=_run)
