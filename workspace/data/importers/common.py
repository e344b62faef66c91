"""What the data-set importers share: the end-of-import report, label and density rules, lesion
geometries with their bounds checks, and counted registration of images and lesions.

Every rule the four importers have in common lives here once:

- :class:`ImportReport` counts images and lesions (new and already present), lesions clipped or
  dropped because they fall outside their image, and every skip with its reason; ``to_text()`` is
  the summary printed at the end of ``mammo import``.
- :func:`label_from_birads` (from :mod:`workspace.data.ingest`, the generator's rule too), :func:`density_letter`:
  one mapping of BI-RADS to the catalog's binary label and of density scales to A-D.
- ``*_geometry`` builders and :func:`fit_to_image`: lesion geometries in ORIGINAL pixel coordinates
  (x = column, y = row, continuous: pixel (c, r) covers [c, c+1) x [r, r+1); shapes as in
  :func:`workspace.data.dicom_io.to_normalised`), and what to do with one that leaves its image (clip a box or polygon, drop one wholly outside, report either way).
- :func:`register_dicom_counted`, :func:`add_lesions`: the one door (``ingest.register_dicom`` /
  ``ingest.add_lesion``) with outcomes counted in the report; bounds checked before a lesion is stored.
  (Images that are not DICOM, mini-MIAS, are first converted to DICOM inside the workspace, so every
  later step reads them like any other image.)
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workspace.base.errors import MammoError
from workspace.data.ingest import label_from_birads  # one rule for every importer: 1/2 -> 0, 0 and 3-6 -> 1

if TYPE_CHECKING:  # annotations only
    import sqlite_utils

    from workspace.base.config import Workspace


class ImporterError(MammoError):
    """A data-set folder that cannot be imported as the named format (the message says why)."""


# ----------------------------------------------------------------------------------------------
# labels and densities
# ----------------------------------------------------------------------------------------------

_BIRADS_RE = re.compile(r"^\s*(?:bi-?rads)?\s*([0-6])\s*([abc])?\s*$", re.IGNORECASE)


def _category_text(value: Any) -> str:
    """A category cell as text; ``"3.0"`` (a spreadsheet's float) reads as ``"3"``."""
    text = "" if value is None else str(value).strip()
    return text[:-2] if text.endswith(".0") else text


def normalise_birads(value: Any) -> str | None:
    """``"BI-RADS 4"``, ``"4a"``, ``4`` or ``"4.0"`` -> ``"4"`` / ``"4A"``; ``None`` for blanks or junk."""
    match = _BIRADS_RE.match(_category_text(value))
    if not match:
        return None
    return match.group(1) + (match.group(2) or "").upper()


def label_from_pathology(pathologies: Iterable[str | None]) -> int:
    """For data sets graded by biopsy rather than BI-RADS (CBIS-DDSM, mini-MIAS): 1 when any
    finding is malignant, else 0 (benign findings and normal images)."""
    return int(any(p == "malignant" for p in pathologies))


_DENSITY_RE = re.compile(r"^\s*(?:density|acr)?\s*([a-d1-4])\s*$", re.IGNORECASE)


def density_letter(value: Any) -> str | None:
    """BI-RADS/ACR density as A-D from ``"DENSITY C"``, ``"c"``, ``3`` or ``"3.0"``; ``None`` if blank."""
    match = _DENSITY_RE.match(_category_text(value))
    if not match:
        return None
    code = match.group(1).upper()
    return "ABCD"["1234".index(code)] if code.isdigit() else code


# ----------------------------------------------------------------------------------------------
# geometries (ORIGINAL pixel coordinates) and their bounds
# ----------------------------------------------------------------------------------------------

def _num(v: float) -> float | int:
    """Keep integers as integers in JSON so geometry keys are stable across re-imports."""
    f = float(v)
    return int(f) if f.is_integer() else round(f, 3)


def box_geometry(x0: float, y0: float, x1: float, y1: float) -> list:
    """An axis-aligned box from its corners, as ``[x, y, w, h]`` (the catalog's box shape)."""
    x0, x1 = sorted((float(x0), float(x1)))
    y0, y1 = sorted((float(y0), float(y1)))
    return [_num(x0), _num(y0), _num(x1 - x0), _num(y1 - y0)]


def polygon_geometry(points: Iterable[tuple[float, float]]) -> list:
    """A closed contour, as ``[[x, y], ...]``."""
    return [[_num(x), _num(y)] for x, y in points]


def point_geometry(x: float, y: float) -> list:
    return [_num(x), _num(y)]


def circle_geometry(cx: float, cy: float, r: float) -> dict:
    return {"cx": _num(cx), "cy": _num(cy), "r": _num(r)}


def mask_geometry(mask: np.ndarray) -> dict:
    """The summary stored beside a mask file: ``bbox`` [x, y, w, h] of its pixels, area, size."""
    ys, xs = np.nonzero(mask)
    rows, cols = mask.shape
    if len(xs) == 0:
        return {"bbox": [0, 0, 0, 0], "area": 0, "rows": int(rows), "cols": int(cols)}
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    return {"bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(len(xs)), "rows": int(rows), "cols": int(cols)}


INSIDE, CLIPPED, PARTLY_OUTSIDE, OUTSIDE = "inside", "clipped", "partly_outside", "outside"


def fit_to_image(geometry_type: str, geometry: Any, rows: int, cols: int) -> tuple[str, Any]:
    """Check a geometry against an image of ``rows`` x ``cols`` pixels.

    Returns ``(status, geometry)``: ``inside`` (unchanged), ``clipped`` (a box or polygon cut to the
    image), ``partly_outside`` (a circle whose centre is inside but whose disc crosses an edge: kept
    as given, since a cut circle is no longer a circle), or ``outside`` (nothing of it in the image:
    geometry ``None``, the lesion must be dropped).
    """
    if geometry_type == "box":
        x0, y0, w, h = geometry
        x1, y1 = x0 + w, y0 + h
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, cols), min(y1, rows)
        if cx1 <= cx0 or cy1 <= cy0:
            return OUTSIDE, None
        if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
            return INSIDE, geometry
        return CLIPPED, box_geometry(cx0, cy0, cx1, cy1)
    if geometry_type == "polygon":
        pts = np.asarray(geometry, dtype=float).reshape(-1, 2)
        inside = (pts[:, 0] >= 0) & (pts[:, 0] <= cols) & (pts[:, 1] >= 0) & (pts[:, 1] <= rows)
        if inside.all():
            return INSIDE, geometry
        if not inside.any():
            return OUTSIDE, None
        clipped = np.column_stack([pts[:, 0].clip(0, cols), pts[:, 1].clip(0, rows)])
        return CLIPPED, polygon_geometry(map(tuple, clipped))
    if geometry_type == "point":
        ok = 0 <= geometry[0] <= cols and 0 <= geometry[1] <= rows
        return (INSIDE, geometry) if ok else (OUTSIDE, None)
    if geometry_type == "circle":
        cx, cy, r = geometry["cx"], geometry["cy"], geometry["r"]
        if not (0 <= cx <= cols and 0 <= cy <= rows):
            return OUTSIDE, None
        if cx - r < 0 or cy - r < 0 or cx + r > cols or cy + r > rows:
            return PARTLY_OUTSIDE, geometry
        return INSIDE, geometry
    if geometry_type == "mask":
        same = geometry.get("rows") == rows and geometry.get("cols") == cols
        return (INSIDE, geometry) if same else (OUTSIDE, None)
    raise ValueError(f"unknown geometry type {geometry_type!r}")


# ----------------------------------------------------------------------------------------------
# the end-of-import report
# ----------------------------------------------------------------------------------------------

@dataclass
class ImportReport:
    """What one import did. Counts are exact; ``skipped`` and ``out_of_bounds`` keep the detail
    (which file or finding, why) so the summary can name them."""

    dataset: str
    source: str = ""
    images_new: int = 0
    images_existing: int = 0
    lesions_new: int = 0
    lesions_existing: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)     # (what, reason, detail)
    out_of_bounds: list[tuple[str, str, str]] = field(default_factory=list)  # (image, finding, status)
    adjusted: list[tuple[str, str, str]] = field(default_factory=list)   # (what, how, detail)
    warnings: list[str] = field(default_factory=list)

    # -- recording ---------------------------------------------------------------------------
    def skip(self, what: str, reason: str, detail: str = "") -> None:
        """One thing not imported (an image, a lesion, a CSV row), with a short reason to count by."""
        self.skipped.append((str(what), reason, detail))

    def outside(self, image: str, finding: str, status: str) -> None:
        self.out_of_bounds.append((str(image), finding, status))

    def adjust(self, what: str, how: str, detail: str = "") -> None:
        """One thing imported after a repair (e.g. a mask rescaled to its image), counted by ``how``."""
        self.adjusted.append((str(what), how, detail))

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    # -- reading -----------------------------------------------------------------------------
    @property
    def images(self) -> int:
        return self.images_new + self.images_existing

    @property
    def ok(self) -> bool:
        """True unless things were found and none of them could be imported."""
        return bool(self.images or not self.skipped)

    @property
    def lesions(self) -> int:
        return self.lesions_new + self.lesions_existing

    def skip_counts(self) -> Counter:
        return Counter(reason for _what, reason, _detail in self.skipped)

    def bounds_counts(self) -> Counter:
        return Counter(status for _img, _finding, status in self.out_of_bounds)

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset, "source": self.source,
            "images": self.images, "images_new": self.images_new, "images_existing": self.images_existing,
            "lesions": self.lesions, "lesions_new": self.lesions_new,
            "lesions_existing": self.lesions_existing,
            "skipped": dict(self.skip_counts()),
            "out_of_bounds": dict(self.bounds_counts()),
            "adjusted": dict(Counter(how for _w, how, _d in self.adjusted)),
            "skipped_detail": [list(s) for s in self.skipped],
            "out_of_bounds_detail": [list(o) for o in self.out_of_bounds],
            "adjusted_detail": [list(a) for a in self.adjusted],
            "warnings": list(self.warnings),
        }

    def to_text(self, max_examples: int = 3) -> str:
        lines = [f"{self.dataset}: {self.images} images ({self.images_new} new, "
                 f"{self.images_existing} already in the catalog), {self.lesions} lesions "
                 f"({self.lesions_new} new, {self.lesions_existing} already in the catalog)"]
        if self.out_of_bounds:
            counts = self.bounds_counts()
            lines.append("  lesions reaching outside their image: " + ", ".join(
                f"{n} {status.replace('_', ' ')}" for status, n in sorted(counts.items())))
            for image, finding, status in self.out_of_bounds[:max_examples]:
                lines.append(f"    {image}: {finding} ({status.replace('_', ' ')})")
        if self.adjusted:
            lines.append(f"  imported after a repair {len(self.adjusted)}:")
            for how, n in Counter(how for _w, how, _d in self.adjusted).most_common():
                examples = [f"{w}{': ' + d if d else ''}" for w, h, d in self.adjusted if h == how]
                lines.append(f"    {n} x {how}, e.g. {examples[0]}")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)}:")
            for reason, n in self.skip_counts().most_common():
                examples = [f"{w}{': ' + d if d else ''}" for w, r, d in self.skipped if r == reason]
                lines.append(f"    {n} x {reason}, e.g. {examples[0]}")
                for example in examples[1:max_examples]:
                    lines.append(f"         {example}")
        for message in self.warnings[:max_examples * 3]:
            lines.append(f"  warning: {message}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# files and CSVs
# ----------------------------------------------------------------------------------------------

def find_named(root: Path, names: Iterable[str], max_depth: int = 2, kind: str = "file") -> list[Path]:
    """Files (or folders) under ``root`` whose name matches one of ``names`` ignoring case, at most
    ``max_depth`` levels down, shallowest first. A data set is often unpacked one folder deeper."""
    wanted = {n.lower() for n in names}
    found, level = [], [Path(root)]
    for _depth in range(max_depth + 1):
        nxt = []
        for folder in level:
            try:
                entries = sorted(folder.iterdir())
            except OSError:
                continue
            for entry in entries:
                if entry.name.lower() in wanted and (entry.is_dir() if kind == "dir" else entry.is_file()):
                    found.append(entry)
                if entry.is_dir() and not entry.name.startswith("."):
                    nxt.append(entry)
        level = nxt
    return found


def dataset_folder(root: str | Path, title: str) -> Path:
    """The folder a user named for an import, absolute; :class:`ImporterError` when it is not a folder."""
    folder = Path(root).expanduser().resolve()
    if not folder.is_dir():
        raise ImporterError(f"{title}: {folder} is not a folder")
    return folder


def read_text(path: Path) -> str:
    """A text file as str, tolerating a BOM and the Latin-1 some releases were saved in."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def column_key(name: str) -> str:
    """Column names compared loosely: case, spaces, underscores and dashes do not matter."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def read_table(path: Path, required: dict[str, tuple[str, ...]], *, delimiter: str = ",",
               what: str = "CSV", optional: dict[str, tuple[str, ...]] | None = None) -> list[dict[str, str]]:
    """Rows of a CSV as dicts keyed by our canonical names.

    ``required`` maps each canonical name to the spellings seen in the releases; a missing column
    raises :class:`ImporterError` naming the file, what is missing and what was found. Cells are
    stripped (the published CSVs have trailing newlines and padding inside quoted cells). Columns
    in ``optional`` are read when present and are ``""`` otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise ImporterError(f"{what} not found: {path}")
    text = read_text(path)
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise ImporterError(f"{what} {path} is empty") from None
    index = {column_key(h): i for i, h in enumerate(header)}
    where: dict[str, int] = {}
    missing = []
    for canonical, spellings in required.items():
        hit = next((index[column_key(s)] for s in (canonical, *spellings) if column_key(s) in index), None)
        if hit is None:
            missing.append(canonical)
        else:
            where[canonical] = hit
    for canonical, spellings in (optional or {}).items():
        hit = next((index[column_key(s)] for s in (canonical, *spellings) if column_key(s) in index), None)
        if hit is not None:
            where[canonical] = hit
    if missing:
        found = ", ".join(repr(h.strip()) for h in header) or "none"
        sep = "semicolon" if delimiter == ";" else "comma"
        raise ImporterError(f"{what} {path} lacks the column(s) {', '.join(repr(m) for m in missing)} "
                            f"({sep}-separated; found {found})")
    rows = []
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        row = {name: (cells[i].strip() if i < len(cells) else "") for name, i in where.items()}
        rows.append({**{name: "" for name in optional or {}}, **row})
    return rows


def as_float(text: Any) -> float | None:
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return None if value != value else value  # NaN -> None


# ----------------------------------------------------------------------------------------------
# catalog bookkeeping shared by the importers
# ----------------------------------------------------------------------------------------------

def official_split(dataset: str, source_patient_id: str, is_test: bool) -> str:
    """A published train/test split kept as is, with a validation set carved from the training
    patients (1 in 9, a pure function of the patient, so re-imports agree): train | val | test."""
    from workspace.base.catalog import split_for

    if is_test:
        return "test"
    return split_for(f"{dataset}\x1f{source_patient_id}", ratios=(8, 1, 0))


def image_count(db: sqlite_utils.Database, dataset: str) -> int:
    """Images of ``dataset`` in the catalog (before/after counts tell new from existing)."""
    return db.execute("SELECT count(*) FROM images WHERE dataset = ?", [dataset]).fetchone()[0]


def lesion_count(db: sqlite_utils.Database, image_id: str) -> int:
    """Lesions of one image in the catalog."""
    return db.execute("SELECT count(*) FROM lesions WHERE image_id = ?", [image_id]).fetchone()[0]


@dataclass
class Finding:
    """One lesion as a data set gives it, before it is checked and stored."""

    kind: str                       # mass | calcification | distortion | asymmetry | other
    geometry_type: str              # box | polygon | point | circle | mask
    geometry: Any                   # the catalog's JSON shapes (see workspace.data.dicom_io.to_normalised)
    pathology: str = "unknown"      # malignant | benign | benign_without_callback | unknown
    label: str = ""                 # how the report names it ("finding 3 (Mass)")
    mask_path: str | None = None
    attributes: dict | None = None


def add_lesions(db: sqlite_utils.Database, image_id: str, rows: int, cols: int, findings: Iterable[Finding], *,
                source: str, report: ImportReport, image_ref: str) -> list[int]:
    """Store each finding on a registered image: bounds checked (clip, keep or drop, reported),
    idempotent (a finding already stored is counted as existing, not added twice). A finding the
    catalog refuses (a malformed geometry) is skipped with the reason; the others are stored."""
    from workspace.data.ingest import add_lesion

    ids = []
    for finding in findings:
        status, geometry = fit_to_image(finding.geometry_type, finding.geometry, rows, cols)
        if status != INSIDE:
            report.outside(image_ref, finding.label or finding.kind, status)
        if geometry is None:
            report.skip(f"{image_ref} {finding.label or finding.kind}", "lesion outside its image",
                        json.dumps(finding.geometry))
            continue
        attributes = dict(finding.attributes or {})
        if status == CLIPPED:
            attributes["clipped_from"] = finding.geometry
        before = lesion_count(db, image_id)
        try:
            lesion_id = add_lesion(db, image_id, kind=finding.kind, geometry_type=finding.geometry_type,
                                   geometry=geometry, pathology=finding.pathology, source=source,
                                   mask_path=finding.mask_path, attributes=attributes or None)
        except MammoError as error:  # e.g. a radius of 0 in the data set's table: this finding only
            report.skip(f"{image_ref} {finding.label or finding.kind}", "invalid lesion", str(error))
            continue
        if lesion_count(db, image_id) > before:
            report.lesions_new += 1
        else:
            report.lesions_existing += 1
        ids.append(lesion_id)
    return ids


def register_dicom_counted(ws: Workspace, db: sqlite_utils.Database, path: Path, report: ImportReport, **kwargs) -> str | None:
    """``ingest.register_dicom`` with the outcome counted: new image, existing image, or a skip
    (with the reader's specific reason) so the batch goes on. Returns the image id or ``None``."""
    from workspace.data.ingest import register_dicom

    before = image_count(db, kwargs["dataset"])
    try:
        image_id = register_dicom(ws, db, path, **kwargs)
    except MammoError as error:
        report.skip(path, "unreadable image", str(error))
        return None
    except OSError as error:
        report.skip(path, "unreadable image", f"cannot read file: {error.strerror or error}")
        return None
    if image_count(db, kwargs["dataset"]) > before:
        report.images_new += 1
    else:
        report.images_existing += 1
    return image_id


__all__ = [
    "ImporterError", "ImportReport", "Finding", "normalise_birads", "label_from_birads",
    "label_from_pathology", "density_letter", "box_geometry", "polygon_geometry", "point_geometry",
    "circle_geometry", "mask_geometry", "fit_to_image", "find_named", "dataset_folder", "read_text", "read_table",
    "column_key", "as_float", "official_split", "add_lesions", "register_dicom_counted",
    "INSIDE", "CLIPPED", "PARTLY_OUTSIDE", "OUTSIDE",
]
