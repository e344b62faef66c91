"""CBIS-DDSM (the Curated Breast Imaging Subset of DDSM, The Cancer Imaging Archive).

What a download holds:

- DICOM files in one folder per TCIA "patient", named like the case: ``Mass-Training_P_00001_LEFT_CC``
  (the full mammogram) and ``Mass-Training_P_00001_LEFT_CC_1`` (abnormality 1: its ROI mask and its
  cropped image). Below that folder three layouts exist, all read the same way here:

  * as the CSVs' paths say: ``<case>/<StudyInstanceUID>/<SeriesInstanceUID>/000000.dcm`` (and
    ``000001.dcm``; which of the two is the mask varies);
  * the NBIA Data Retriever's "classic" names: ``<case>/<StudyUID>/<SeriesUID>/1-1.dcm``, ``1-2.dcm``;
  * its "descriptive" names: ``<case>/07-20-2016-DDSM-NA-74994/1.000000-full mammogram images-24515/1-1.dcm``
    (``ROI mask images`` / ``cropped images`` series).

  Files are classified by Series Description ("full mammogram images", "ROI mask images",
  "cropped images", or the same words in the series folder name); when that does not settle it, by
  their pixels: a mask is binary (and normally image-sized), a crop is not.
- Case description CSVs, one row per abnormality: ``mass_case_description_{train,test}_set.csv``
  (``breast_density``, ``mass shape``, ``mass margins``) and ``calc_case_description_{train,test}_set.csv``
  (``breast density``, ``calc type``, ``calc distribution``); both with ``patient_id``,
  ``left or right breast``, ``image view``, ``abnormality id``, ``abnormality type``, ``assessment``,
  ``pathology`` (MALIGNANT, BENIGN, BENIGN_WITHOUT_CALLBACK), ``subtlety`` and the three file paths.

What lands in the catalog: every full mammogram named by a CSV row (patient = ``patient_id``,
laterality and view from the CSV, density 1-4 as A-D, BI-RADS = the highest assessment of its
abnormalities, label 1 when any is malignant, split: the published test set stays ``test``, the
training set is divided into train/val by patient; a patient with any test image is ``test``);
every abnormality as a ``mask`` lesion (a PNG in original pixel coordinates under
``derived/masks/``, its bounding box and area as the geometry) with its pathology and descriptors.
Some masks are not the size of their image: reported, then rescaled to the image (nearest
neighbour; ``mask_mismatch="rescale"``, the default) or skipped (``"skip"``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from workspace.data.importers.common import (
    Finding,
    ImporterError,
    ImportReport,
    as_float,
    dataset_folder,
    density_letter,
    find_named,
    label_from_pathology,
    mask_geometry,
    normalise_birads,
    read_table,
)
from workspace.data.ingest import write_png
from workspace.data.view_text import CBIS_DDSM_CASE_RE

if TYPE_CHECKING:  # annotations only
    import sqlite_utils

    from workspace.base.config import Workspace

DATASET = "cbis-ddsm"
TITLE = "CBIS-DDSM (TCIA DICOM folders + case description CSVs)"

MASK_MISMATCH_POLICIES = ("rescale", "skip")

CASE_RE = CBIS_DDSM_CASE_RE  # one definition: reading a DICOM infers view and laterality from it too

_COLUMNS = {
    "patient_id": (), "breast density": ("breast_density",), "left or right breast": (),
    "image view": (), "abnormality id": (), "abnormality type": (), "assessment": (),
    "pathology": (), "image file path": (), "roi mask file path": (),
}
_OPTIONAL = {
    "subtlety": (), "cropped image file path": (), "mass shape": (), "mass margins": (),
    "calc type": (), "calc distribution": (),
}

PATHOLOGIES = {"MALIGNANT": "malignant", "BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign_without_callback"}
ROLES = (("full mammogram", "full"), ("roi mask", "mask"), ("cropped", "crop"))


@dataclass(frozen=True)
class CbisCase:
    """One CSV row: one abnormality on one full mammogram."""

    csv_name: str
    line: int
    patient_id: str
    density: str | None
    laterality: str
    view: str
    abnormality_id: int
    kind: str                       # mass | calcification
    assessment: str | None
    pathology: str
    subtlety: int | None
    full_folder: str                # first component of 'image file path'
    roi_folder: str                 # first component of 'ROI mask file path'
    full_path: str
    mask_path: str
    descriptors: dict = field(default_factory=dict)

    @property
    def is_test(self) -> bool:
        return "-test_" in self.full_folder.lower()


@dataclass
class DicomEntry:
    """One DICOM file found on disk, header only."""

    path: Path
    folder: str                     # the case folder it belongs to
    role: str | None                # full | mask | crop | None (undescribed)
    series_uid: str | None
    rows: int
    cols: int


def _first_component(path: str) -> str:
    return path.replace("\\", "/").strip().strip("/").split("/")[0]


def read_case_csv(path: Path, report: ImportReport | None = None) -> list[CbisCase]:
    """The abnormalities of one case description CSV (mass or calc, either spelling of density).

    A file without the needed columns raises :class:`ImporterError`. A row with a value we cannot
    read (abnormality type, pathology) raises too, unless ``report`` is given: then that row is
    skipped with its reason and the other rows are read (one bad row must not stop an import).
    """
    path = Path(path)
    rows = read_table(path, _COLUMNS, what="CBIS-DDSM case description CSV", optional=_OPTIONAL)
    cases = []
    for line, row in enumerate(rows, start=2):
        kind = row["abnormality type"].strip().lower()
        kind = "calcification" if kind.startswith("calc") else "mass" if kind == "mass" else kind
        pathology = PATHOLOGIES.get(row["pathology"].strip().upper())
        problem = None
        if kind not in ("mass", "calcification"):
            problem = f"abnormality type {row['abnormality type']!r} (expected mass or calcification)"
        elif pathology is None:
            problem = f"pathology {row['pathology']!r} (expected {', '.join(PATHOLOGIES)})"
        if problem:
            if report is None:
                raise ImporterError(f"{path.name} line {line}: {problem}")
            report.skip(f"{path.name} line {line}", "unreadable CSV row", problem)
            continue
        side = row["left or right breast"].strip().upper()
        abnormality = as_float(row["abnormality id"])
        subtlety = as_float(row["subtlety"])
        cases.append(CbisCase(
            csv_name=path.name, line=line, patient_id=row["patient_id"].strip(),
            density=density_letter(row["breast density"]),
            laterality={"LEFT": "L", "RIGHT": "R"}.get(side, side[:1]),
            view=row["image view"].strip().upper(),
            abnormality_id=int(abnormality) if abnormality is not None else 0,
            kind=kind, assessment=normalise_birads(row["assessment"]), pathology=pathology,
            subtlety=int(subtlety) if subtlety is not None else None,
            full_folder=_first_component(row["image file path"]),
            roi_folder=_first_component(row["roi mask file path"]),
            full_path=row["image file path"].strip(), mask_path=row["roi mask file path"].strip(),
            descriptors={k: row[k] for k in ("mass shape", "mass margins", "calc type", "calc distribution")
                         if row.get(k)}))
    return cases


def role_from_text(*texts: str | None) -> str | None:
    """full | mask | crop from a Series Description or a series folder name, else None."""
    for text in texts:
        low = (text or "").lower()
        for needle, role in ROLES:
            if needle in low:
                return role
    return None


def _case_folder(path: Path, root: Path, patient_tag: str | None) -> str | None:
    for part in path.relative_to(root).parts[:-1]:
        if CASE_RE.match(part):
            return part
    return patient_tag if patient_tag and CASE_RE.match(patient_tag) else None


def scan_dicoms(root: Path, report: ImportReport) -> dict[str, list[DicomEntry]]:
    """Every DICOM under ``root`` by case folder, read header-only; files outside any case folder are
    reported."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from workspace.base.progress import progress

    found: dict[str, list[DicomEntry]] = {}
    files = sorted(p for p in root.rglob("*.dcm") if p.is_file())
    for path in progress(files, desc="CBIS-DDSM headers", unit="file"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (InvalidDicomError, AttributeError, TypeError, ValueError, OSError) as error:
            report.skip(path, "unreadable image", f"{type(error).__name__}: {error}")
            continue
        folder = _case_folder(path, root, str(ds.get("PatientID", "")).strip() or None)
        if folder is None:
            report.skip(path, "not in a CBIS-DDSM case folder",
                        "expected a folder like Mass-Training_P_00001_LEFT_CC above it")
            continue
        role = role_from_text(str(ds.get("SeriesDescription", "")), path.parent.name)
        found.setdefault(folder, []).append(DicomEntry(path, folder, role, ds.get("SeriesInstanceUID"),
                                                       rows, cols))
    return found


def _pixels(path: Path) -> np.ndarray:
    """The decoded pixels of a mask or crop file; :class:`ImporterError` saying why when they cannot be."""
    import pydicom

    try:
        return pydicom.dcmread(path).pixel_array
    except Exception as error:  # pydicom raises many kinds for cut files and missing decoders
        raise ImporterError(f"{path.name}: pixels cannot be read ({type(error).__name__}: {error})") from None


def is_binary(pixels: np.ndarray) -> bool:
    """Two values at most, one of them 0: how a CBIS-DDSM ROI mask looks (0 / 255 or 0 / 1)."""
    values = np.unique(pixels[:: max(1, pixels.shape[0] // 256), :: max(1, pixels.shape[1] // 256)])
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        return False
    return len(np.unique(pixels)) <= 2


def pick_full(entries: list[DicomEntry], case: CbisCase) -> DicomEntry | None:
    """The full mammogram of a case folder: described as one, or the only file there."""
    described = [e for e in entries if e.role == "full"]
    pool = described or [e for e in entries if e.role is None]
    if not pool:
        return None
    by_uid = [e for e in pool if e.series_uid and e.series_uid in case.full_path]
    return (by_uid or pool)[0]


def pick_mask(entries: list[DicomEntry], image_shape: tuple[int, int]) -> tuple[DicomEntry, np.ndarray] | None:
    """The ROI mask among an abnormality folder's files (mask and crop, in any layout).

    Trusted from the description when exactly one file is described as a mask and it is binary;
    otherwise by pixels: binary files are masks, the one of the image's size (else the largest) wins.
    A file whose pixels cannot be read is passed over; when no mask is found and some file could
    not be read, that file's :class:`ImporterError` is raised (the likelier reason than "no mask").
    """
    candidates = sorted((e for e in entries if e.role != "full"), key=lambda e: (e.role != "mask", str(e.path)))
    described = [e for e in candidates if e.role == "mask"]
    binary, unreadable = [], []
    for entry in candidates:
        try:
            pixels = _pixels(entry.path)
        except ImporterError as error:
            unreadable.append(error)
            continue
        if is_binary(pixels):
            if len(described) == 1 and entry is described[0]:
                return entry, pixels
            binary.append((entry, pixels))
    if not binary:
        if unreadable:
            raise unreadable[0]
        return None
    same = [b for b in binary if b[1].shape == image_shape]
    return (same or sorted(binary, key=lambda b: -b[1].size))[0]


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``shape`` (rows, cols)."""
    from PIL import Image

    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((shape[1], shape[0]), Image.NEAREST)) > 127


CSV_NAMES = tuple(f"{kind}_case_description_{split}_set.csv" for kind in ("mass", "calc") for split in ("train", "test"))


def find_case_csvs(root: Path) -> list[Path]:
    """The case description CSVs in ``root`` or up to two folders down (as TCIA names them)."""
    return find_named(Path(root), CSV_NAMES, max_depth=2)


def looks_like(root: Path) -> bool:
    """A case description CSV near ``root``, or case folders (``Mass-Training_P_00001_LEFT_CC``) in it or
    one folder down."""
    root = Path(root)
    if find_case_csvs(root):
        return True
    for level in (root, *[p for p in root.iterdir() if p.is_dir()][:20]) if root.is_dir() else ():
        if any(CASE_RE.match(p.name) for p in list(level.iterdir())[:50] if p.is_dir()):
            return True
    return False


def import_dataset(ws: Workspace, root: str | Path, *, db: sqlite_utils.Database | None = None, dataset: str | None = None, mask_mismatch: str = "rescale",
                   **_options) -> ImportReport:
    """Import a CBIS-DDSM download; see the module docstring for what lands where."""
    from workspace.base.catalog import open_catalog
    from workspace.base.progress import progress
    from workspace.data.importers.common import add_lesions, official_split, register_dicom_counted

    if mask_mismatch not in MASK_MISMATCH_POLICIES:
        raise ImporterError(f"CBIS-DDSM: mask_mismatch must be one of {', '.join(MASK_MISMATCH_POLICIES)}, "
                            f"got {mask_mismatch!r}")
    name = dataset or DATASET
    root = dataset_folder(root, "CBIS-DDSM")
    csvs = find_case_csvs(root)
    if not csvs:
        raise ImporterError(f"CBIS-DDSM: no case description CSV in {root} (mass_case_description_train_set.csv, "
                            "mass_case_description_test_set.csv, calc_case_description_train_set.csv or "
                            "calc_case_description_test_set.csv, as downloaded from TCIA)")
    report = ImportReport(name, str(root))
    cases = [case for path in csvs for case in read_case_csv(path, report)]
    entries = scan_dicoms(root, report)
    test_patients = {c.patient_id for c in cases if c.is_test}
    by_image: dict[str, list[CbisCase]] = {}
    for case in cases:
        by_image.setdefault(case.full_folder, []).append(case)
    named = set(by_image) | {c.roi_folder for c in cases}
    for folder in sorted(set(entries) - named):
        report.skip(folder, "folder not in any case description CSV", f"{len(entries[folder])} file(s)")

    db = db if db is not None else open_catalog(ws)
    for folder in progress(sorted(by_image), desc="CBIS-DDSM", unit="image"):
        image_cases = by_image[folder]
        first = image_cases[0]
        full = pick_full(entries.get(folder, []), first)
        if full is None:
            for case in image_cases:
                report.skip(f"{folder} abnormality {case.abnormality_id}", "image file missing",
                            f"{case.csv_name} line {case.line}: no full mammogram DICOM under {folder}/")
            continue
        assessments = [c.assessment for c in image_cases if c.assessment]
        image_id = register_dicom_counted(
            ws, db, full.path, report, dataset=name, patient_source_id=first.patient_id,
            split=official_split(name, first.patient_id, first.patient_id in test_patients),
            birads=max(assessments) if assessments else None,
            label=label_from_pathology(c.pathology for c in image_cases),
            density=first.density,
            extra={"laterality": first.laterality, "view": first.view})
        if image_id is None:
            continue
        findings = []
        for case in image_cases:
            finding = _mask_finding(ws, case, entries.get(case.roi_folder, []), image_id,
                                    (full.rows, full.cols), mask_mismatch, report)
            if finding is not None:
                findings.append(finding)
        add_lesions(db, image_id, full.rows, full.cols, findings, source=DATASET, report=report,
                    image_ref=folder)
    return report


def _mask_finding(ws, case: CbisCase, entries: list[DicomEntry], image_id: str, shape: tuple[int, int],
                  policy: str, report: ImportReport) -> Finding | None:
    """The lesion of one abnormality from its ROI mask, or None (reported) when there is none to use."""
    what = f"{case.full_folder} abnormality {case.abnormality_id}"
    if not entries:
        report.skip(what, "ROI mask missing", f"{case.csv_name} line {case.line}: no DICOM under {case.roi_folder}/")
        return None
    try:
        picked = pick_mask(entries, shape)
    except ImporterError as error:
        report.skip(what, "unreadable ROI mask", f"{case.roi_folder}/: {error}")
        return None
    if picked is None:
        report.skip(what, "ROI mask missing", f"no binary mask among {len(entries)} file(s) in {case.roi_folder}/")
        return None
    entry, pixels = picked
    mask = pixels > 0
    attributes = {"abnormality_id": case.abnormality_id, "assessment": case.assessment,
                  "subtlety": case.subtlety, **{k.replace(" ", "_"): v for k, v in case.descriptors.items()}}
    if mask.shape != shape:
        detail = (f"mask {mask.shape[0]} x {mask.shape[1]}, image {shape[0]} x {shape[1]} "
                  f"({entry.path.name} in {case.roi_folder})")
        if policy == "skip":
            report.skip(what, "mask size mismatch", detail + "; skipped (--mask-mismatch skip)")
            return None
        report.adjust(what, "mask size mismatch, rescaled to the image", detail)
        attributes["mask_rescaled_from"] = [int(mask.shape[0]), int(mask.shape[1])]
        mask = resize_mask(mask, shape)
    if not mask.any():
        report.skip(what, "empty ROI mask", f"{entry.path.name} in {case.roi_folder} has no foreground")
        return None
    # The content digest in the name: a later import with another mask for this abnormality adds a
    # file (and a lesion) instead of overwriting the file an earlier lesion points to.
    digest = hashlib.sha1(np.packbits(mask).tobytes() + repr(mask.shape).encode()).hexdigest()[:10]
    mask_file = ws.masks_dir / f"{image_id}_{case.kind[:4]}{case.abnormality_id}_{digest}.png"
    if not mask_file.exists():
        write_png(mask.astype(np.uint8) * 255, mask_file)
    return Finding(kind=case.kind, geometry_type="mask", geometry=mask_geometry(mask),
                   pathology=case.pathology, label=f"abnormality {case.abnormality_id} ({case.kind})",
                   mask_path=str(mask_file), attributes=attributes)
