"""Importers for public mammography data sets, exactly as each publishes its folder.

``FORMATS`` is the registry (:mod:`workspace.data.import_formats`, light enough for the CLI's parser): name ->
:class:`ImportFormat` (its module holds ``DATASET``, ``TITLE``,
``looks_like(root) -> bool`` and ``import_dataset(ws, root, *, db=None, dataset=None, **options) ->
ImportReport``). :func:`detect_format` names the format of a folder when exactly one layout matches;
:func:`import_auto` is ``mammo import --format auto``: a detected data set, else a plain DICOM folder.

Every importer registers images through ``workspace.data.ingest.register_dicom`` and lesions through
``workspace.data.ingest.add_lesion`` (so re-import is idempotent), with lesion geometry in ORIGINAL pixel
coordinates, and returns an :class:`ImportReport` (images, lesions, out-of-bounds findings, skips
and why); shared rules live in :mod:`workspace.data.importers.common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from workspace.data.import_formats import FORMATS, ImportFormat
from workspace.data.importers.common import ImporterError, ImportReport

if TYPE_CHECKING:  # annotations only
    from workspace.base.config import Workspace
    from workspace.data.ingest import ImportSummary


def detect_format(path: str | Path) -> str | None:
    """The registry name of the data set laid out at ``path``, or ``None`` when no layout matches.

    Raises :class:`ImporterError` when the folder matches several layouts (pass ``--format``)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return None
    matches = [name for name, fmt in FORMATS.items() if fmt.looks_like(root)]
    if len(matches) > 1:
        raise ImporterError(f"{root} looks like several data sets ({', '.join(matches)}); "
                            "name one with --format")
    return matches[0] if matches else None


def import_auto(ws: Workspace, path: str | Path, *, mask_mismatch: str | None = None,
                **options: Any) -> ImportReport | ImportSummary:
    """``--format auto``: import with the detected data-set importer, else as a plain DICOM folder
    (``workspace.data.ingest.import_folder``, which takes ``non_mg`` and ``dataset``)."""
    name = detect_format(path)
    if name is None:
        from workspace.data.ingest import import_folder

        if mask_mismatch is not None:
            raise ImporterError("--mask-mismatch applies to CBIS-DDSM, but no CBIS-DDSM layout was found "
                                f"at {path}")
        return import_folder(ws, path, **options)
    if mask_mismatch is not None:
        options["mask_mismatch"] = mask_mismatch
    return FORMATS[name].run(ws, path, **options)


__all__ = ["FORMATS", "ImportFormat", "ImportReport", "ImporterError", "detect_format", "import_auto"]
