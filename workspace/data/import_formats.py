"""The registry of public data-set formats: name -> module and title. Its own light module (no numpy, no
catalog), so the CLI builds ``mammo import --format``'s choices from it without importing an importer;
``workspace.data.importers`` re-exports it and holds the detection and ``--format auto``."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only
    from workspace.base.config import Workspace
    from workspace.data.importers.common import ImportReport


@dataclass(frozen=True)
class ImportFormat:
    name: str
    module: str
    title: str

    def load(self) -> ModuleType:
        """The importer module (imported on first use: the CLI stays fast)."""
        return importlib.import_module(self.module)

    def looks_like(self, root: Path) -> bool:
        """Whether ``root`` is laid out as this data set publishes it."""
        return bool(self.load().looks_like(Path(root)))

    def run(self, ws: Workspace, root: str | Path, **options: Any) -> ImportReport:
        """``import_dataset(ws, root, **options)`` of this format."""
        return self.load().import_dataset(ws, Path(root), **options)


FORMATS: dict[str, ImportFormat] = {
    "cbis-ddsm": ImportFormat("cbis-ddsm", "workspace.data.importers.cbis_ddsm",
                              "CBIS-DDSM: TCIA DICOM folders + mass/calc case description CSVs"),
    "vindr": ImportFormat("vindr", "workspace.data.importers.vindr",
                          "VinDr-Mammo: images/<study>/<image>.dicom + breast-level and finding CSVs"),
    "inbreast": ImportFormat("inbreast", "workspace.data.importers.inbreast",
                             "INbreast: AllDICOMs/, AllXML/ ROI plists, INbreast.csv"),
    "mias": ImportFormat("mias", "workspace.data.importers.mias", "mini-MIAS: mdbNNN.pgm + Info.txt"),
}


__all__ = ["FORMATS", "ImportFormat"]
