"""``mammo import PATH``: bring DICOM mammograms (or, with ``--format``, a public data set) into the catalog.

Formats are a table: ``IMPORTERS[name] = (target, help)`` where ``target`` is ``"module:function"``,
called as ``function(ws, path, **options) -> summary``. The options passed are ``non_mg`` always and
``dataset`` when the user gave ``--dataset`` (each importer has its own default). The summary needs
``to_text()`` and ``ok`` (see :class:`workspace.data.ingest.ImportSummary`). Add a format by adding a row.
"""

from __future__ import annotations

import argparse
import importlib

ORDER = 20

IMPORTERS: dict[str, tuple[str, str]] = {
    "dicom": ("workspace.data.ingest:import_folder", "a folder of DICOM files, any nesting (default)"),
    "cbis-ddsm": ("workspace.data.importers.cbis_ddsm:import_dataset", "CBIS-DDSM as downloaded from TCIA"),
    "vindr": ("workspace.data.importers.vindr:import_dataset", "VinDr-Mammo as released"),
    "inbreast": ("workspace.data.importers.inbreast:import_dataset", "INbreast release (AllDICOMs, AllXML, csv)"),
    "mias": ("workspace.data.importers.mias:import_dataset", "mini-MIAS (PGM files + Info.txt)"),
    "auto": ("workspace.data.importers:import_auto", "detect one of the data sets above, else dicom"),
}


MASK_MISMATCH_FORMATS = ("cbis-ddsm", "auto")
"""The formats that take ``--mask-mismatch`` (``auto`` passes it on, and refuses it without CBIS-DDSM)."""


def _run(args: argparse.Namespace) -> int:
    from workspace.base.config import Workspace
    from workspace.base.errors import MammoError

    if args.mask_mismatch and args.format not in MASK_MISMATCH_FORMATS:
        # said, not ignored: the user expects masks to be handled a certain way
        raise MammoError(f"--mask-mismatch applies to CBIS-DDSM (--format cbis-ddsm or auto), not {args.format}")
    module_name, function_name = IMPORTERS[args.format][0].split(":")
    importer = getattr(importlib.import_module(module_name), function_name)
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
    formats = "; ".join(f"{name}: {text}" for name, (_, text) in IMPORTERS.items())
    parser = subparsers.add_parser(
        "import", parents=parents, help="import DICOM mammograms (or a public data set) into the catalog",
        description="Import every readable mammogram under PATH into the workspace catalog. Files that cannot "
                    "be used are skipped with their reason and the import goes on; re-running is idempotent. "
                    f"Formats: {formats}.")
    parser.add_argument("path", metavar="PATH", help="a folder (searched recursively) or one file")
    parser.add_argument("--format", default="dicom", choices=sorted(IMPORTERS),
                        help="what PATH holds (default: dicom)")
    parser.add_argument("--dataset", metavar="NAME", default=None,
                        help="dataset name recorded in the catalog (default: 'local' for dicom)")
    parser.add_argument("--non-mg", choices=("warn", "refuse"), default="warn",
                        help="images whose modality is not MG: import with a warning (default) or skip")
    parser.add_argument("--mask-mismatch", choices=("rescale", "skip"), default=None,
                        help="CBIS-DDSM ROI masks whose size differs from their image: rescale them to the "
                             "image (default) or skip the lesion; either way they are reported")
    parser.set_defaults(func=_run)
