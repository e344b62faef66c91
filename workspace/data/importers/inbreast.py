"""INbreast (Moreira et al., Academic Radiology 2012), release 1.0.

Layout as published::

    INbreast.csv     semicolon-separated: Patient ID;Patient age;Laterality;View;Acquisition date;
                     File Name;ACR;Bi-Rads   (patient id and age read "removed"; ACR 1-4, may be blank;
                     Bi-Rads 1, 2, 3, 4a, 4b, 4c, 5, 6)
    AllDICOMs/<File Name>_<patient hash>_MG_<L|R>_<CC|MLO>_ANON.dcm
    AllXML/<File Name>.xml   OsiriX ROI plist: Images[0].ROIs[], each with Name ("Mass",
                     "Calcification", "Cluster", "Distortion", "Asymmetry", "Spiculated Region", ...),
                     NumberOfPoints and Point_px, a list of "(x, y)" strings in original pixels

What lands in the catalog: every DICOM of ``AllDICOMs`` with patient = the hash in its file name,
laterality and view from the CSV (the file name when the CSV has no row), BI-RADS, density (ACR
1-4 as A-D), label from BI-RADS, split by patient (the release has none); every ROI as a lesion:
a ``polygon`` when it has three or more points, a ``point`` (the mean of its points) when it has
one or two (INbreast marks single calcifications that way); pathology unknown (the CSV has none).
"""

from __future__ import annotations

import plistlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from xml.parsers.expat import ExpatError

from workspace.data.importers.common import (
    Finding,
    ImporterError,
    ImportReport,
    dataset_folder,
    density_letter,
    find_named,
    normalise_birads,
    point_geometry,
    polygon_geometry,
    read_table,
)

if TYPE_CHECKING:  # annotations only
    import sqlite_utils

    from workspace.base.config import Workspace

DATASET = "inbreast"
TITLE = "INbreast (AllDICOMs/, AllXML/, INbreast.csv)"

CSV_NAME = "INbreast.csv"
_CSV_COLUMNS = {
    "laterality": (), "view": (), "file name": ("filename",), "acr": ("density",),
    "bi-rads": ("birads", "bi rads"),
}

_FILE_RE = re.compile(r"^(\d+)_([0-9A-Za-z]+)_MG_([LR])_([A-Z]+)_ANON$", re.IGNORECASE)
_POINT_RE = re.compile(r"^\s*\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*(?:,\s*[-+0-9.eE]+\s*)?\)\s*$")

ROI_KINDS = {
    "mass": "mass",
    "calcification": "calcification", "calcifications": "calcification",
    "cluster": "calcification",
    "distortion": "distortion", "architectural distortion": "distortion",
    "asymmetry": "asymmetry", "assymetry": "asymmetry",
    "spiculated region": "mass", "espiculated region": "mass",
}
"""ROI names seen in the release (including its spelling variants); anything else is ``other``."""

SINGLE_CALCIFICATION_MAX_POINTS = 2
"""ROIs with this many points or fewer are single calcifications, stored as points."""


@dataclass(frozen=True)
class InbreastFile:
    file_id: str
    patient_hash: str
    laterality: str
    view: str


@dataclass(frozen=True)
class InbreastRow:
    file_id: str
    laterality: str | None
    view: str | None
    birads: str | None
    density: str | None


@dataclass(frozen=True)
class Roi:
    name: str
    points: list[tuple[float, float]]


def parse_file_name(name: str) -> InbreastFile | None:
    """``20586908_6c613a14b80a8591_MG_R_CC_ANON.dcm`` -> its parts, or None for another name."""
    match = _FILE_RE.match(Path(name).stem if name.lower().endswith(".dcm") else name)
    if not match:
        return None
    return InbreastFile(match.group(1), match.group(2), match.group(3).upper(), match.group(4).upper())


def read_csv(path: Path) -> dict[str, InbreastRow]:
    """The CSV's rows by File Name (semicolon-separated; blank ACR allowed)."""
    rows = read_table(path, _CSV_COLUMNS, delimiter=";", what="INbreast CSV")
    out = {}
    for row in rows:
        file_id = row["file name"].strip()
        if not file_id:
            continue
        lat = row["laterality"].upper()[:1]
        out[file_id] = InbreastRow(file_id, lat if lat in ("L", "R") else None,
                                   row["view"].upper() or None, normalise_birads(row["bi-rads"]),
                                   density_letter(row["acr"]))
    return out


def parse_point(text: str) -> tuple[float, float]:
    """``"(x, y)"`` (or ``"(x, y, z)"``, OsiriX's mm form) as ``(x, y)``; ``ValueError`` otherwise."""
    match = _POINT_RE.match(str(text))
    if not match:
        raise ValueError(f"not an '(x, y)' point: {text!r}")
    return float(match.group(1)), float(match.group(2))


def read_rois(path: Path) -> list[Roi]:
    """Every ROI of an INbreast XML plist; :class:`ImporterError` naming the file if unreadable."""
    try:
        with open(path, "rb") as stream:
            document = plistlib.load(stream)
    except (plistlib.InvalidFileException, ExpatError, ValueError) as error:
        raise ImporterError(f"{Path(path).name}: not an OsiriX ROI plist ({error})") from None
    images = document.get("Images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise ImporterError(f"{Path(path).name}: no 'Images' array (not an INbreast ROI file)")
    rois = []
    for image in images:
        entries = image.get("ROIs", []) if isinstance(image, dict) else None
        if not isinstance(entries, list) or not all(isinstance(roi, dict) for roi in entries or []):
            raise ImporterError(f"{Path(path).name}: an 'Images' entry without a list of ROI dictionaries "
                                "(not an INbreast ROI file)")
        for roi in entries:
            raw = roi.get("Point_px") or []
            if not isinstance(raw, list):
                raise ImporterError(f"{Path(path).name}: ROI {roi.get('Name')!r}: Point_px is not a list")
            try:
                points = [parse_point(p) for p in raw]
            except ValueError as error:
                raise ImporterError(f"{Path(path).name}: ROI {roi.get('Name')!r}: {error}") from None
            rois.append(Roi(str(roi.get("Name", "")).strip(), points))
    return rois


def findings_of(rois: list[Roi], image_birads: str | None) -> tuple[list[Finding], list[str]]:
    """Lesions for the ROIs of one image, and a note for each ROI without points."""
    findings, empty = [], []
    for i, roi in enumerate(rois, start=1):
        label = f"ROI {i} ({roi.name or 'unnamed'})"
        if not roi.points:
            empty.append(label)
            continue
        kind = ROI_KINDS.get(roi.name.lower(), "other")
        attributes = {"roi_name": roi.name, "n_points": len(roi.points), "image_birads": image_birads}
        if len(roi.points) <= SINGLE_CALCIFICATION_MAX_POINTS:
            xs, ys = zip(*roi.points, strict=True)
            findings.append(Finding("calcification", "point",
                                    point_geometry(sum(xs) / len(xs), sum(ys) / len(ys)),
                                    label=label, attributes=attributes))
        else:
            findings.append(Finding(kind, "polygon", polygon_geometry(roi.points), label=label,
                                    attributes=attributes))
    return findings, empty


def looks_like(root: Path) -> bool:
    """An ``INbreast.csv`` or an ``AllDICOMs`` folder in ``root`` or one folder down."""
    root = Path(root)
    return bool(find_named(root, (CSV_NAME,), max_depth=1)
                or find_named(root, ("AllDICOMs",), max_depth=1, kind="dir"))


def _dataset_root(root: Path) -> Path:
    found = find_named(root, ("AllDICOMs",), max_depth=2, kind="dir")
    if not found:
        raise ImporterError(f"INbreast: no AllDICOMs folder in {root} (the release keeps its images in "
                            "AllDICOMs/, its ROIs in AllXML/ and its labels in INbreast.csv)")
    return found[0].parent


def import_dataset(ws: Workspace, root: str | Path, *, db: sqlite_utils.Database | None = None, dataset: str | None = None, **_options) -> ImportReport:
    """Import an INbreast folder; see the module docstring for what lands where."""
    from workspace.base.catalog import open_catalog
    from workspace.base.progress import progress
    from workspace.data.importers.common import add_lesions, register_dicom_counted

    name = dataset or DATASET
    root = dataset_folder(root, "INbreast")
    base = _dataset_root(root)
    csv_path = next(iter(find_named(base, (CSV_NAME,), max_depth=0)), None)
    if csv_path is None:
        raise ImporterError(f"INbreast: no {CSV_NAME} in {base} (semicolon-separated labels: Laterality, "
                            "View, File Name, ACR, Bi-Rads)")
    labels = read_csv(csv_path)
    report = ImportReport(name, str(base))
    xml_dir = base / "AllXML"
    if not xml_dir.is_dir():
        report.warn("no AllXML folder: images imported without lesions")
    files = sorted((base / "AllDICOMs").glob("*.dcm"))
    parsed = {}
    for path in files:
        info = parse_file_name(path.name)
        if info is None:
            report.skip(path.name, "unexpected file name",
                        "expected <file id>_<patient>_MG_<L|R>_<view>_ANON.dcm")
        else:
            parsed[info.file_id] = (path, info)
    for file_id in sorted(set(labels) - set(parsed)):
        report.skip(file_id, "image file missing", f"{CSV_NAME} lists it, AllDICOMs has no {file_id}_*.dcm")
    if xml_dir.is_dir():
        for xml in sorted(xml_dir.glob("*.xml")):
            if xml.stem not in parsed:
                report.skip(xml.name, "ROI file without image", f"no AllDICOMs/{xml.stem}_*.dcm")
    db = db if db is not None else open_catalog(ws)
    for file_id in progress(sorted(parsed), desc="INbreast", unit="image"):
        path, info = parsed[file_id]
        row = labels.get(file_id)
        if row is None:
            report.warn(f"{path.name}: not in {CSV_NAME}; laterality and view from the file name, no BI-RADS")
            row = InbreastRow(file_id, None, None, None, None)
        for field_name, from_name, from_csv in (("laterality", info.laterality, row.laterality),
                                                ("view", info.view, row.view)):
            if from_csv and from_csv != from_name:
                report.warn(f"{path.name}: {field_name} {from_csv} in {CSV_NAME}, {from_name} in the file name; "
                            "kept the CSV's")
        image_id = register_dicom_counted(
            ws, db, path, report, dataset=name, patient_source_id=info.patient_hash,
            birads=row.birads, density=row.density,
            extra={"laterality": row.laterality or info.laterality, "view": row.view or info.view})
        if image_id is None:
            continue
        xml = xml_dir / f"{file_id}.xml"
        if not xml.is_file():
            continue
        try:
            rois = read_rois(xml)
        except ImporterError as error:
            report.skip(xml.name, "unreadable ROI file", str(error))
            continue
        findings, empty = findings_of(rois, row.birads)
        for label in empty:
            report.skip(f"{file_id} {label}", "ROI without points")
        size = db.execute("SELECT rows, cols FROM images WHERE image_id = ?", [image_id]).fetchone()
        add_lesions(db, image_id, int(size[0]), int(size[1]), findings, source=DATASET, report=report,
                    image_ref=path.name)
    return report
