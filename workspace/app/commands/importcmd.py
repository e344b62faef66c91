"""``mammo import PATH``: bring DICOM mammograms (or, with ``--format``, a public data set) into the catalog.

``--format``: ``dicom`` (a plain folder, ``workspace.data.ingest.import_folder``), ``auto`` (a detected data set,
else ``dicom``) or a public data set of the registry ``workspace.data.import_formats.FORMATS`` (add a format
there). Each is called as ``f(ws, path, **options) -> summary``: ``non_mg`` always, ``dataset`` when the user
gave ``--dataset`` (each importer has its own default); the summary has ``to_text()`` and ``ok``.
"""

from __future__ import annotations

import argparse

from workspace.data.import_formats import FORMATS

ORDER = 20

DICOM_HELP = "a folder of DICOM files, any nesting (default)"
AUTO_HELP = "detect one of the data sets above, else dicom"


MASK_MISMATCH_FORMATS = ("cbis-ddsm", "auto")
"""The formats that take ``--mask-mismatch`` (``auto`` passes it on, and refuses it without CBIS-DDSM)."""


def _run(args: argparse.Namespace) -> int:
    from workspace.base.config import Workspace
    from workspace.base.errors import MammoError

    if args.mask_mismatch and args.format not in MASK_MISMATCH_FORMATS:
        # said, not ignored: the user expects masks to be handled a certain way
        raise MammoError(f"--mask-mismatch applies to CBIS-DDSM (--format cbis-ddsm or auto), not {args.format}")
    if args.format == "dicom":
        from workspace.data.ingest import import_folder as importer
    elif args.format == "auto":
        from workspace.data.importers import import_auto as importer
    else:
        importer = FORMATS[args.format].run
    ws = Workspace.open(args.workspace)
    options = {"non_mg": args.non_mg}
    if args.dataset:
        options["dataset"] = args.dataset
    if args.mask_mismatch:
        options["mask_mismatch"] = args.mask_mismatch
    summary = importer(ws, args.path, **options)
    print(summary.to_text())
    return 0 if summary.ok else 1


def add_parser(subparsers, parents) -> None:
    """``mammo import PATH [--format NAME] [--dataset NAME] [--non-mg warn|refuse] [--mask-mismatch ...]``."""
    helps = {"dicom": DICOM_HELP, **{name: fmt.title for name, fmt in FORMATS.items()}, "auto": AUTO_HELP}
    formats = "; ".join(f"{name}: {text}" for name, text in helps.items())
    parser = subparsers.add_parser(
        "import", parents=parents, help="import DICOM mammograms (or a public data set) into the catalog",
        description="Import every readable mammogram under PATH into the workspace catalog. Files that cannot "
                    "be used are skipped with their reason and the import goes on; re-running is idempotent. "
                    f"Formats: {formats}.")
    parser.add_argument("path", metavar="PATH", help="a folder (searched recursively) or one file")
    parser.add_argument("--format", default="dicom", choices=sorted(helps),
                        help="what PATH holds (default: dicom)")
    parser.add_argument("--dataset", metavar="NAME", default=None,
                        help="dataset name recorded in the catalog (default: 'local' for dicom)")
    parser.add_argument("--non-mg", choices=("warn", "refuse"), default="warn",
                        help="images whose modality is not MG: import with a warning (default) or skip")
    parser.add_argument("--mask-mismatch", choices=("rescale", "skip"), default=None,
                        help="CBIS-DDSM ROI masks whose size differs from their image: rescale them to the "
                             "image (default) or skip the lesion; either way they are reported")
    parser.set_defaults(func=_run)
