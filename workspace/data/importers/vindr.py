"""VinDr-Mammo (PhysioNet release 1.0).

Layout as published::

    breast-level_annotations.csv   one row per image: study_id, series_id, image_id, laterality,
                                   view_position, height, width, breast_birads ("BI-RADS 1".."BI-RADS 5"),
                                   breast_density ("DENSITY A".."DENSITY D"), split ("training" | "test")
    finding_annotations.csv        one row per finding (or one "['No Finding']" row per image):
                                   the same columns plus finding_categories (a Python list in a string,
                                   e.g. "['Mass', 'Suspicious Calcification']"), finding_birads, and the
                                   box xmin, ymin, xmax, ymax in original pixels (blank without finding)
    metadata.csv                   DICOM tags (not needed)
    images/<study_id>/<image_id>.dicom

What lands in the catalog: every image of ``breast-level_annotations.csv`` with patient = the study
(the release has one study per patient and no patient id), BI-RADS, density, label from BI-RADS, the
published split (``test`` kept, ``training`` divided into train/val by patient); every finding box as
one ``box`` lesion (kind from its categories, the first of mass > calcification > distortion >
asymmetry > other; all categories and the finding's BI-RADS kept as attributes; pathology unknown:
the release has no biopsy results). Boxes reaching outside the image are clipped and reported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workspace.data.importers.common import (
    Finding,
    ImporterError,
    ImportReport,
    as_float,
    box_geometry,
    dataset_folder,
    density_letter,
    find_named,
    normalise_birads,
    read_table,
)

if TYPE_CHECKING:  # annotations only
    import sqlite_utils

    from workspace.base.config import Workspace

DATASET = "vindr-mammo"
TITLE = "VinDr-Mammo (images/<study>/<image>.dicom + annotation CSVs)"

BREAST_CSV = "breast-level_annotations.csv"
FINDING_CSV = "finding_annotations.csv"

_IMAGE_COLUMNS = {
    "study_id": (), "image_id": (), "laterality": (), "view_position": (),
    "height": (), "width": (), "breast_birads": (), "breast_density": (), "split": (),
}
_FINDING_COLUMNS = {
    "study_id": (), "image_id": (), "finding_categories": (), "finding_birads": (),
    "xmin": (), "ymin": (), "xmax": (), "ymax": (),
}

CATEGORY_KINDS = {
    "mass": "mass",
    "suspicious calcification": "calcification",
    "architectural distortion": "distortion",
    "asymmetry": "asymmetry",
    "focal asymmetry": "asymmetry",
    "global asymmetry": "asymmetry",
    "suspicious lymph node": "other",
    "skin thickening": "other",
    "skin retraction": "other",
    "nipple retraction": "other",
}
KIND_PRIORITY = ("mass", "calcification", "distortion", "asymmetry", "other")


@dataclass(frozen=True)
class VindrImage:
    study_id: str
    image_id: str
    laterality: str | None
    view: str | None
    height: int | None
    width: int | None
    birads: str | None
    density: str | None
    split: str | None          # training | test as published


def parse_categories(text: str) -> list[str]:
    """``"['Mass', 'Suspicious Calcification']"`` -> the list; a bare ``"Mass"`` -> ``["Mass"]``.

    Read with :func:`ast.literal_eval` (literals only, nothing is executed)."""
    text = (text or "").strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = [p.strip().strip("'\"") for p in text.strip("[]").split(",")]
        return [str(v).strip() for v in value if str(v).strip()]
    return [text]


def kind_of(categories: list[str]) -> str | None:
    """The lesion kind for a finding's categories, or None for "No Finding" / nothing."""
    kinds = {CATEGORY_KINDS.get(c.strip().lower(), "other") for c in categories
             if c.strip().lower() != "no finding"}
    return next((k for k in KIND_PRIORITY if k in kinds), None)


def read_images(path: Path) -> list[VindrImage]:
    """The rows of ``breast-level_annotations.csv`` (:class:`ImporterError` naming missing columns)."""
    rows = read_table(path, _IMAGE_COLUMNS, what="VinDr-Mammo breast-level CSV")
    images = []
    for row in rows:
        lat = row["laterality"].upper()[:1] or None
        images.append(VindrImage(
            study_id=row["study_id"], image_id=row["image_id"],
            laterality=lat if lat in ("L", "R") else None,
            view=row["view_position"].upper() or None,
            height=int(as_float(row["height"])) if as_float(row["height"]) else None,
            width=int(as_float(row["width"])) if as_float(row["width"]) else None,
            birads=normalise_birads(row["breast_birads"]),
            density=density_letter(row["breast_density"]),
            split=row["split"].strip().lower() or None))
    return images


def read_findings(path: Path, report: ImportReport) -> dict[str, list[Finding]]:
    """Findings per image id; rows without a finding or box add nothing, rows with a bad box are
    reported."""
    rows = read_table(path, _FINDING_COLUMNS, what="VinDr-Mammo finding CSV")
    found: dict[str, list[Finding]] = {}
    for number, row in enumerate(rows, start=2):
        categories = parse_categories(row["finding_categories"])
        kind = kind_of(categories)
        if kind is None:
            continue
        box = [as_float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
        label = f"finding on CSV line {number} ({', '.join(categories)})"
        if any(v is None for v in box):
            report.skip(f"{row['image_id']} {label}", "finding without a box",
                        f"xmin/ymin/xmax/ymax = {[row[k] for k in ('xmin', 'ymin', 'xmax', 'ymax')]}")
            continue
        if box[2] <= box[0] or box[3] <= box[1]:
            report.skip(f"{row['image_id']} {label}", "empty box", f"{box}")
            continue
        found.setdefault(row["image_id"], []).append(Finding(
            kind=kind, geometry_type="box", geometry=box_geometry(*box), pathology="unknown",
            label=label, attributes={"categories": categories,
                                     "finding_birads": normalise_birads(row["finding_birads"])}))
    return found


def looks_like(root: Path) -> bool:
    """One of the two annotation CSVs in ``root`` or one folder down."""
    root = Path(root)
    return bool(find_named(root, (BREAST_CSV, FINDING_CSV), max_depth=1))


def _dataset_root(root: Path) -> Path:
    found = find_named(root, (BREAST_CSV,), max_depth=2)
    if not found:
        raise ImporterError(f"VinDr-Mammo: no {BREAST_CSV} in {root} (the release has it beside "
                            f"{FINDING_CSV} and the images/ folder)")
    return found[0].parent


def import_dataset(ws: Workspace, root: str | Path, *, db: sqlite_utils.Database | None = None, dataset: str | None = None, **_options) -> ImportReport:
    """Import a VinDr-Mammo folder; see the module docstring for what lands where."""
    from workspace.base.catalog import open_catalog
    from workspace.base.progress import progress
    from workspace.data.importers.common import add_lesions, official_split, register_dicom_counted

    name = dataset or DATASET
    root = dataset_folder(root, "VinDr-Mammo")
    base = _dataset_root(root)
    images = read_images(base / BREAST_CSV)
    report = ImportReport(name, str(base))
    finding_csv = base / FINDING_CSV
    if finding_csv.is_file():
        findings = read_findings(finding_csv, report)
    else:
        findings = {}
        report.warn(f"no {FINDING_CSV} beside {BREAST_CSV}: images imported without lesions")
    listed = {im.image_id for im in images}
    for image_id in sorted(set(findings) - listed):
        report.skip(image_id, "finding for an image not in the breast-level CSV",
                    f"{len(findings[image_id])} finding(s)")
    db = db if db is not None else open_catalog(ws)
    for image in progress(images, desc="VinDr-Mammo", unit="image"):
        path = base / "images" / image.study_id / f"{image.image_id}.dicom"
        if not path.is_file() and path.with_suffix(".dcm").is_file():
            path = path.with_suffix(".dcm")  # some mirrors rename the files
        if not path.is_file():
            report.skip(f"{image.study_id}/{image.image_id}", "image file missing", str(path))
            continue
        catalog_id = register_dicom_counted(
            ws, db, path, report, dataset=name, patient_source_id=image.study_id,
            split=official_split(name, image.study_id, image.split == "test"),
            birads=image.birads, density=image.density,
            extra={k: v for k, v in (("laterality", image.laterality), ("view", image.view)) if v})
        if catalog_id is None:
            continue
        row = db.execute("SELECT rows, cols FROM images WHERE image_id = ?", [catalog_id]).fetchone()
        rows, cols = int(row[0]), int(row[1])
        if image.height and image.width and (image.height, image.width) != (rows, cols):
            report.warn(f"{image.image_id}: CSV says {image.height} x {image.width}, the DICOM holds "
                        f"{rows} x {cols}; boxes checked against the DICOM")
        add_lesions(db, catalog_id, rows, cols, findings.get(image.image_id, []),
                    source=DATASET, report=report, image_ref=f"{image.study_id}/{image.image_id}")
    return report
