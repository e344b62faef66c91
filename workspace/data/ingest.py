"""Bringing images into the catalog: the one door every importer and the synthetic generator use.

:func:`register_dicom` reads a DICOM file (:mod:`workspace.data.dicom_io`), pseudonymises it (patient
``P-...``, image ``I-...``, study ``S-...``: keyed HMACs of the dataset and the source identifier or
the file's SHA-1), writes the display PNG and the foreground mask PNG (normalised orientation) and adds
the ``patients`` and ``images`` rows. Patient identifiers (ID, name, birth date) go to ``patients``
only; file names, PNGs (no text chunks) and every other table carry pseudonyms. Registering the same
file content twice into the same dataset returns the existing id.

:func:`import_folder` walks a folder (any nesting), registers every readable mammogram and collects
a reason for every file it skips; the batch always goes on. :func:`add_lesion` records a finding in
ORIGINAL pixel coordinates, idempotently.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from workspace.base.catalog import file_sha1, geometry_key, pseudonym, split_for
from workspace.base.config import Workspace
from workspace.base.errors import CatalogError, DicomReadError, MammoError
from workspace.base.modality import modality_of
from workspace.base.progress import progress
from workspace.base.schema import utc_now
from workspace.data.dicom_io import (
    FOREGROUND_DOWNSAMPLE,
    PATCH_SIZE,
    DicomImage,
    foreground_mask,
    read_dicom,
    upsample_mask,
)
from workspace.data.domain import image_features, mean_spacing

LESION_KINDS = ("mass", "calcification", "distortion", "asymmetry", "other")
GEOMETRY_TYPES = ("mask", "box", "polygon", "ellipse", "circle", "point")
PATHOLOGIES = ("malignant", "benign", "benign_without_callback", "unknown")
NON_MG_POLICIES = ("warn", "refuse")

# images columns that register_dicom owns (or sets by its own arguments and rules: the patient's split,
# the label from BI-RADS); ``extra`` may set any other column.
_PROTECTED = {"image_id", "patient_id", "dataset", "source_sha1", "created_at", "rows", "cols",
              "display_path", "foreground_path", "flip_horizontal", "flip_vertical", "split", "birads",
              "label", "density", "warnings", "inferred", "domain_features", "modality"}


# -- paths -----------------------------------------------------------------------------------------

def _relative_to(root: Path | None, path: str | os.PathLike) -> str:
    """``path`` relative to ``root`` (POSIX separators) when inside it, else as an absolute path."""
    path = Path(path).absolute()
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


def stored_path(ws: Workspace, path: str | os.PathLike) -> str:
    """How the catalog stores a path: relative to the workspace root when inside it, absolute otherwise."""
    return _relative_to(ws.root, path)


def resolve_path(ws: Workspace, stored: str | os.PathLike) -> Path:
    """A catalog path as a real path (relative ones are under the workspace root)."""
    path = Path(stored)
    return path if path.is_absolute() else ws.root / path


def _workspace_root(db: sqlite_utils.Database) -> Path | None:
    row = db.execute("PRAGMA database_list").fetchone()
    return Path(row[2]).parent if row and row[2] else None


def write_png(array: np.ndarray, path: Path) -> None:
    """Write a grayscale PNG atomically (a reader never sees half a file), creating its folder.

    Pillow adds no text chunks, so no identifiers can ride along in a derived file."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


# -- images ----------------------------------------------------------------------------------------

def label_from_birads(birads: Any) -> int | None:
    """The catalog's binary image label from a BI-RADS category (``0``..``6``, a letter allowed: ``4A``).

    0 for BI-RADS 1 or 2 (negative, benign: the paper's normal images); 1 for every other category
    (0 = recalled for work-up, the paper's "possibly malignant"; 3 to 6 carry a finding to follow);
    ``None`` when blank or not a category. The one rule every importer and the generator use.
    """
    text = "" if birads is None else str(birads).strip()
    if not text or text[0] not in "0123456" or (len(text) > 1 and not text[1:].isalpha()):
        return None
    return 0 if text[0] in "12" else 1


def _existing_image(db: sqlite_utils.Database, dataset: str, sha1: str) -> str | None:
    row = db.execute("SELECT image_id FROM images WHERE dataset = ? AND source_sha1 = ?",
                     [dataset, sha1]).fetchone()
    return row[0] if row else None


def _ensure_patient(ws: Workspace, db: sqlite_utils.Database, dataset: str, source_id: str,
                    identifiers: dict, split: str | None) -> tuple[str, str]:
    """(patient_id, the patient's split); creates the row on first sight."""
    patient_id = pseudonym(ws, "P", dataset, source_id)
    row = db.execute("SELECT split FROM patients WHERE patient_id = ?", [patient_id]).fetchone()
    if row:
        return patient_id, row[0]
    chosen = split or split_for(patient_id)
    db.execute(
        "INSERT OR IGNORE INTO patients (patient_id, dataset, source_patient_id, patient_name, birth_date,"
        " split, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [patient_id, dataset, source_id, identifiers.get("patient_name"), identifiers.get("birth_date"),
         chosen, utc_now()])
    row = db.execute("SELECT split FROM patients WHERE patient_id = ?", [patient_id]).fetchone()
    return patient_id, row[0]


def _register_image(ws: Workspace, db: sqlite_utils.Database, image: DicomImage, sha1: str, *,
                    dataset: str, patient_source_id: str | None, split: str | None, birads: Any,
                    label: int | None, density: str | None, extra: dict | None) -> str:
    extra = {k: v for k, v in (extra or {}).items() if v is not None}  # None: keep what the file says
    columns = set(db["images"].columns_dict)
    unknown = sorted(set(extra) - columns)
    protected = sorted(set(extra) & _PROTECTED)
    if unknown or protected:
        raise CatalogError(f"register_dicom: extra keys {unknown + protected} are not settable images "
                           f"columns (settable: {sorted(columns - _PROTECTED)})")
    source_id = (patient_source_id or image.patient.get("source_patient_id")
                 or (f"study:{image.study_instance_uid}" if image.study_instance_uid else f"file:{sha1}"))
    patient_id, patient_split = _ensure_patient(ws, db, dataset, str(source_id), image.patient, split)
    image_id = pseudonym(ws, "I", dataset, sha1)

    display = image.display_pixels()
    mask = foreground_mask(display, FOREGROUND_DOWNSAMPLE)
    display_file = ws.display_dir / f"{image_id}.png"
    foreground_file = ws.foreground_dir / f"{image_id}.png"
    write_png(display, display_file)
    write_png(mask.astype(np.uint8) * 255, foreground_file)

    notes = list(image.warnings)
    if split and patient_split and split != patient_split:
        # A patient's images share one split, or patches of one woman could sit in train and test.
        notes.append(f"split: asked for {split!r}, but this patient's images are in {patient_split!r}; "
                     f"kept {patient_split!r}")
    if image.modality != "MG":
        notes.append(f"modality is {image.modality or 'missing'}, not MG")
    if not mask.any():
        notes.append("foreground: no breast found (blank image?)")
    birads_text = None if birads is None else str(birads)
    row = dict(image.meta)
    row.update(
        image_id=image_id, patient_id=patient_id, dataset=dataset,
        source_path=stored_path(ws, image.path), source_sha1=sha1,
        study_id=pseudonym(ws, "S", dataset, image.study_instance_uid) if image.study_instance_uid else None,
        split=patient_split or split, birads=birads_text,
        label=label if label is not None else (label_from_birads(birads_text)
                                               if modality_of(image.modality).birads else None), density=density,
        display_path=stored_path(ws, display_file), foreground_path=stored_path(ws, foreground_file),
        warnings=json.dumps(notes) if notes else None, created_at=utc_now(),
    )
    for key, value in extra.items():
        row[key] = stored_path(ws, value) if key.endswith("_path") and value and Path(value).is_absolute() \
            else value
    # a value the importer gives (e.g. the view from a data set's CSV) is not one read from the file's text
    inferred = {k: v for k, v in image.inferred.items() if k not in extra}
    row["inferred"] = json.dumps(inferred, sort_keys=True) if inferred else None
    row["domain_features"] = json.dumps(image_features(
        image.model_pixels(), mask, bits_stored=image.bits_stored,
        pixel_spacing=mean_spacing(*(image.pixel_spacing or (None, None)))))
    names = list(row)
    db.execute(f"INSERT OR IGNORE INTO images ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
               [row[n] for n in names])
    return _existing_image(db, dataset, sha1) or image_id


def register_dicom(ws: Workspace, db: sqlite_utils.Database, path: str | os.PathLike, *, dataset: str,
                   patient_source_id: str | None = None, split: str | None = None, birads: Any = None,
                   label: int | None = None, density: str | None = None, extra: dict | None = None) -> str:
    """Add one DICOM image to the catalog and return its pseudonymous ``image_id`` (``I-...``).

    Idempotent by (dataset, SHA-1 of the file): a second call returns the first id and writes nothing.
    ``patient_source_id`` overrides the file's Patient ID (which is kept only in ``patients``).
    ``split`` is the split of a NEW patient (default :func:`workspace.base.catalog.split_for`); a patient
    already in the catalog keeps the split of its first image, so no patient is in two splits (a
    differing ``split`` is kept as a warning on the image). ``label`` defaults from ``birads``
    (:func:`label_from_birads`: 1/2 -> 0, 0 and 3-6 -> 1). ``extra`` sets other ``images`` columns (e.g.
    ``laterality``, ``view`` when the file lacks them, ``annotated_path``; ``None`` values are ignored).
    Raises :class:`DicomReadError` for a missing or unreadable file, :class:`CatalogError` for unknown
    ``extra`` keys.
    """
    try:
        sha1 = file_sha1(path)
    except OSError as error:  # missing, a folder, unreadable: the same one-line error as a bad file
        raise DicomReadError(f"{path}: cannot read file ({error.strerror or error})") from None
    existing = _existing_image(db, dataset, sha1)
    if existing:
        return existing
    image = read_dicom(path)
    return _register_image(ws, db, image, sha1, dataset=dataset, patient_source_id=patient_source_id,
                           split=split, birads=birads, label=label, density=density, extra=extra)


def load_model_pixels(ws: Workspace, image_row: dict) -> np.ndarray:
    """float32 (rows, cols) in [0, 1], normalised orientation (the catalog's flips), from the source file."""
    path = resolve_path(ws, image_row["source_path"])
    image = read_dicom(path, orientation=(bool(image_row["flip_horizontal"]), bool(image_row["flip_vertical"])))
    if (image.rows, image.cols) != (image_row["rows"], image_row["cols"]):
        raise DicomReadError(f"{path}: now {image.rows} x {image.cols}, the catalog says "
                             f"{image_row['rows']} x {image_row['cols']} (file changed since import?)")
    return image.model_pixels()


def load_foreground(ws: Workspace, image_row: dict) -> np.ndarray:
    """The breast mask at full resolution (rows, cols), bool, normalised orientation."""
    from PIL import Image

    path = resolve_path(ws, image_row["foreground_path"])
    try:
        small = np.asarray(Image.open(path)) > 127
    except FileNotFoundError:
        raise CatalogError(f"foreground mask of {image_row['image_id']} is missing: {path}") from None
    return upsample_mask(small, int(image_row["rows"]), int(image_row["cols"]))


# -- lesions ---------------------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _check_geometry(geometry_type: str, geometry: Any) -> None:
    def bad(expected: str) -> CatalogError:
        return CatalogError(f"{geometry_type} geometry must be {expected}, got {geometry!r}"[:300])

    if geometry_type == "box":
        if not (isinstance(geometry, list | tuple) and len(geometry) == 4 and all(map(_is_number, geometry))
                and geometry[2] > 0 and geometry[3] > 0):
            raise bad("[x, y, w, h] with w, h > 0")
    elif geometry_type == "point":
        if not (isinstance(geometry, list | tuple) and len(geometry) == 2 and all(map(_is_number, geometry))):
            raise bad("[x, y]")
    elif geometry_type == "polygon":
        if not (isinstance(geometry, list | tuple) and len(geometry) >= 3 and all(
                isinstance(p, list | tuple) and len(p) == 2 and all(map(_is_number, p)) for p in geometry)):
            raise bad("[[x, y], ...] with at least 3 points")
    elif geometry_type == "ellipse":
        if not (isinstance(geometry, dict) and all(_is_number(geometry.get(k)) for k in ("cx", "cy", "rx", "ry"))
                and geometry["rx"] > 0 and geometry["ry"] > 0 and _is_number(geometry.get("angle", 0.0))):
            raise bad("{cx, cy, rx, ry, angle (degrees)} with rx, ry > 0")
    elif geometry_type == "circle":
        if not (isinstance(geometry, dict) and all(_is_number(geometry.get(k)) for k in ("cx", "cy", "r"))
                and geometry["r"] > 0):
            raise bad("{cx, cy, r} with r > 0")
    elif geometry_type == "mask":
        if not isinstance(geometry, dict):
            raise bad("a JSON object (e.g. {\"bbox\": [x, y, w, h]}) with mask_path set")
    else:
        raise CatalogError(f"unknown geometry type {geometry_type!r} (known: {', '.join(GEOMETRY_TYPES)})")


def add_lesion(db: sqlite_utils.Database, image_id: str, *, kind: str, geometry_type: str, geometry: Any,
               pathology: str | None, source: str, mask_path: str | os.PathLike | None = None,
               attributes: dict | None = None) -> int:
    """Record a finding on an image, geometry in ORIGINAL pixel coordinates; return its ``lesion_id``.

    Idempotent: the same (image, source, kind, geometry type, geometry) returns the existing id.
    ``geometry_type`` "mask" needs ``mask_path`` (a PNG in original coordinates; stored relative to the
    workspace when inside it). Raises :class:`CatalogError` for an unknown image or a malformed geometry.
    """
    if db.execute("SELECT 1 FROM images WHERE image_id = ?", [image_id]).fetchone() is None:
        raise CatalogError(f"no image {image_id!r} in the catalog")
    if kind not in LESION_KINDS:
        raise CatalogError(f"unknown lesion kind {kind!r} (known: {', '.join(LESION_KINDS)})")
    if pathology is not None and pathology not in PATHOLOGIES:
        raise CatalogError(f"unknown pathology {pathology!r} (known: {', '.join(PATHOLOGIES)})")
    if isinstance(geometry, tuple):
        geometry = list(geometry)
    _check_geometry(geometry_type, geometry)
    if geometry_type == "mask" and not mask_path:
        raise CatalogError("a mask lesion needs mask_path")
    if mask_path is not None:
        mask_path = _relative_to(_workspace_root(db), mask_path) if Path(mask_path).is_absolute() \
            else str(mask_path)
    key = geometry_key(kind, geometry_type, geometry)
    db.execute(
        "INSERT OR IGNORE INTO lesions (image_id, kind, geometry_type, geometry, mask_path, pathology, source,"
        " attributes, geometry_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [image_id, kind, geometry_type, json.dumps(geometry), mask_path, pathology, source,
         json.dumps(attributes) if attributes else None, key, utc_now()])
    row = db.execute("SELECT lesion_id FROM lesions WHERE image_id = ? AND source = ? AND geometry_key = ?",
                     [image_id, source, key]).fetchone()
    return int(row[0])


# -- folders ---------------------------------------------------------------------------------------

@dataclass
class ImportSummary:
    """What an import did: ids imported, ids already present, files skipped (with reasons), warnings."""

    root: str
    imported: list[str] = field(default_factory=list)
    already_present: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True unless files were found and none could be used."""
        return bool(self.imported or self.already_present or not self.skipped)

    def to_dict(self) -> dict:
        """Plain data (JSON-able): ids, skips with reasons, warnings, seconds."""
        return {"root": self.root, "imported": self.imported, "already_present": self.already_present,
                "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
                "warnings": [{"file": f, "warning": w} for f, w in self.warnings], "seconds": self.seconds}

    def to_text(self) -> str:
        """The end-of-import summary: counts, skips grouped by kind, then each file with its reason."""
        lines = [f"import of {self.root}: {len(self.imported)} imported, {len(self.already_present)} already "
                 f"present, {len(self.skipped)} skipped ({self.seconds:.1f} s)"]
        if self.skipped:
            kinds = Counter(_reason_kind(r) for _, r in self.skipped)
            lines.append("skipped: " + ", ".join(f"{n} {k}" for k, n in kinds.most_common()))
            lines += [f"  {f}: {r}" for f, r in self.skipped]
        if self.warnings:
            lines.append(f"warnings ({len(self.warnings)}):")
            lines += [f"  {f}: {w}" for f, w in self.warnings]
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    for needle, kind in (("not a DICOM", "not DICOM"), ("truncated", "truncated"), ("decoder", "no decoder"),
                         ("no pixel data", "no pixels"), ("too small", "too small"), ("not MG", "not MG"),
                         ("grayscale", "not grayscale"), ("frames", "multi-frame")):
        if needle in reason:
            return kind
    return "other"


def _files_under(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(folder) / n for n in sorted(names) if not n.startswith(".")]
    return files


def import_folder(ws: Workspace, path: str | os.PathLike, *, dataset: str = "local",
                  non_mg: str = "warn") -> ImportSummary:
    """Import every DICOM mammogram under ``path`` (any nesting); re-running is idempotent.

    Each file that cannot be used is skipped with its reason (not DICOM or truncated, no pixel data,
    no decoder for its transfer syntax, not grayscale, multi-frame, smaller than one patch
    (:data:`~workspace.data.dicom_io.PATCH_SIZE`) in a direction, a non-MG modality when
    ``non_mg="refuse"``); with ``non_mg="warn"`` non-MG images are imported and warned about. Shows a progress bar; returns an :class:`ImportSummary`.
    """
    from workspace.base.catalog import open_catalog

    if non_mg not in NON_MG_POLICIES:
        raise MammoError(f"non_mg must be one of {', '.join(NON_MG_POLICIES)}, got {non_mg!r}")
    root = Path(path).expanduser()
    if not root.exists():
        raise MammoError(f"{root}: no such file or folder")
    files = _files_under(root)
    if not files:
        raise MammoError(f"{root}: no files to import")
    db = open_catalog(ws)
    summary = ImportSummary(root=str(root))
    started = time.perf_counter()
    bar = progress(files, total=len(files), desc="import", unit="file")
    for file in bar:
        name = file.relative_to(root).as_posix() if file != root else file.name
        try:
            sha1 = file_sha1(file)
            existing = _existing_image(db, dataset, sha1)
            if existing:
                summary.already_present.append(existing)
                continue
            image = read_dicom(file, min_size=PATCH_SIZE)
            not_mg = f"modality is {image.modality or 'missing'}, not MG" if image.modality != "MG" else None
            if not_mg and non_mg == "refuse":
                raise DicomReadError(f"{not_mg} (refused: --non-mg refuse)")
            image_id = _register_image(ws, db, image, sha1, dataset=dataset, patient_source_id=None, split=None,
                                       birads=None, label=None, density=None, extra=None)
            summary.imported.append(image_id)
            summary.warnings += [(name, w) for w in image.warnings + ([not_mg] if not_mg else [])]
        except DicomReadError as error:
            reason = str(error)
            prefix = f"{file.name}: "
            summary.skipped.append((name, reason[len(prefix):] if reason.startswith(prefix) else reason))
        except OSError as error:
            summary.skipped.append((name, f"cannot read file: {error.strerror or error}"))
        except Exception as error:  # one bad file must not stop the batch
            summary.skipped.append((name, f"unexpected error: {type(error).__name__}: {error}"))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(imported=len(summary.imported), present=len(summary.already_present),
                            skipped=len(summary.skipped), refresh=False)
    summary.seconds = time.perf_counter() - started
    return summary


__all__ = ["register_dicom", "add_lesion", "import_folder", "ImportSummary", "load_model_pixels",
           "load_foreground", "stored_path", "resolve_path", "label_from_birads", "write_png", "LESION_KINDS",
           "GEOMETRY_TYPES", "PATHOLOGIES"]
