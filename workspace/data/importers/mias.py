"""mini-MIAS (the Mammographic Image Analysis Society's MiniMammographic Database).

Layout as published (``all-mias.tar.gz``): ``mdb001.pgm`` ... ``mdb322.pgm`` (8-bit binary PGM,
1024 x 1024) and ``Info.txt``, one row per abnormality::

    REFNUM BG CLASS SEVERITY X Y RADIUS
    mdb001 G CIRC B 535 425 197
    mdb003 D NORM

Facts taken from the database's README (quoted in comments where used): pixels are 200 micron;
the origin of X/Y is the BOTTOM-left corner; films come in pairs per patient, left breast on even
reference numbers and right on odd ones; widely distributed calcifications have no centre or
radius; an image with several abnormalities has several rows.

What lands in the catalog: every PGM listed in ``Info.txt`` (converted to a DICOM file inside the
workspace with spacing 0.2 mm, then registered like any DICOM), patient = the film pair, laterality from the reference number, view MLO, density
none (MIAS grades background tissue F/G/D, kept as an attribute, not an ACR density), label 1 when
any abnormality is malignant; one ``circle`` lesion per located abnormality in original (top-left)
pixel coordinates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from workspace.data.importers.common import (
    Finding,
    ImporterError,
    ImportReport,
    as_float,
    circle_geometry,
    dataset_folder,
    find_named,
    label_from_pathology,
    read_text,
)

if TYPE_CHECKING:  # annotations only
    import sqlite_utils

    from workspace.base.config import Workspace

DATASET = "mini-mias"
TITLE = "mini-MIAS (PGM images + Info.txt)"

PIXEL_SPACING_MM = 0.2
"""README: "the original MIAS Database (digitised at 50 micron pixel edge) has been reduced to 200
micron pixel edge and clipped/padded so that every image is 1024 pixels x 1024 pixels"."""

IMAGE_SIZE = 1024

VIEW = "MLO"
"""All MIAS films are medio-lateral oblique views (Suckling et al., 1994, the database's paper)."""

INFO_NAMES = ("Info.txt",)

KINDS = {
    "CALC": ("calcification", "calcification"),
    "CIRC": ("mass", "well-defined/circumscribed mass"),
    "SPIC": ("mass", "spiculated mass"),
    "MISC": ("mass", "other, ill-defined mass"),
    "ARCH": ("distortion", "architectural distortion"),
    "ASYM": ("asymmetry", "asymmetry"),
}
"""README, 3rd column: CALC, CIRC, SPIC, MISC, ARCH, ASYM, and NORM (normal: no lesion)."""

TISSUE = {"F": "fatty", "G": "fatty-glandular", "D": "dense-glandular"}
SEVERITY = {"B": "benign", "M": "malignant"}

_REF_RE = re.compile(r"^mdb(\d{3})$", re.IGNORECASE)


@dataclass(frozen=True)
class MiasRow:
    """One row of ``Info.txt``: ``x``/``y`` as published (origin bottom-left), or None when omitted."""

    refnum: str
    tissue: str
    cls: str
    severity: str | None
    x: float | None
    y: float | None
    radius: float | None
    line: int

    @property
    def number(self) -> int:
        """The reference number (``mdb012`` -> 12)."""
        return int(_REF_RE.match(self.refnum).group(1))


def laterality_of(refnum: str) -> str:
    """README note 1: "The list is arranged in pairs of films, where each pair represents the left
    (even filename numbers) and right mammograms (odd filename numbers) of a single patient"."""
    return "L" if int(_REF_RE.match(refnum).group(1)) % 2 == 0 else "R"


def patient_of(refnum: str) -> str:
    """The film pair (mdb001 + mdb002 = pair 1, mdb003 + mdb004 = pair 2, ...)."""
    return f"pair{(int(_REF_RE.match(refnum).group(1)) + 1) // 2:03d}"


def parse_info(path: Path) -> tuple[list[MiasRow], list[tuple[int, str]]]:
    """All rows of ``Info.txt`` and the lines that could not be read (line number, why).

    The header line is optional; blank lines are ignored; a row whose X/Y are missing or not numbers
    (e.g. ``*NOTE 3*``) keeps ``x = y = radius = None``.
    """
    path = Path(path)
    if not path.is_file():
        raise ImporterError(f"mini-MIAS: Info.txt not found: {path}")
    rows, bad = [], []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].upper() == "REFNUM":
            continue
        if not _REF_RE.match(parts[0]):
            bad.append((number, f"not a mini-MIAS row (expected 'mdbNNN ...'): {line.strip()[:60]!r}"))
            continue
        if len(parts) < 3:
            bad.append((number, f"{parts[0]}: needs at least tissue and class: {line.strip()!r}"))
            continue
        tissue, cls = parts[1].upper(), parts[2].upper()
        if tissue not in TISSUE or (cls not in KINDS and cls != "NORM"):
            bad.append((number, f"{parts[0]}: unknown tissue {parts[1]!r} or class {parts[2]!r}"))
            continue
        severity = parts[3].upper() if len(parts) > 3 and parts[3].upper() in SEVERITY else None
        coords = [as_float(p) for p in parts[4:7]] if severity else [as_float(p) for p in parts[3:6]]
        coords += [None] * (3 - len(coords))
        x, y, radius = coords
        if x is None or y is None:
            x = y = radius = None
        rows.append(MiasRow(parts[0].lower(), tissue, cls, severity, x, y, radius, number))
    if not rows:
        raise ImporterError(f"mini-MIAS: {path} holds no rows like 'mdb001 G CIRC B 535 425 197'")
    return rows, bad


def read_pgm(path: Path) -> np.ndarray:
    """A binary (P5) or plain (P2) PGM as uint8 (maxval < 256) or uint16, shape (rows, cols)."""
    data = Path(path).read_bytes()
    tokens, pos = [], 0
    while len(tokens) < 4:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if pos < len(data) and data[pos:pos + 1] == b"#":
            while pos < len(data) and data[pos:pos + 1] not in (b"\n", b"\r"):
                pos += 1
            continue
        start = pos
        while pos < len(data) and not data[pos:pos + 1].isspace() and data[pos:pos + 1] != b"#":
            pos += 1
        if start == pos:
            raise ImporterError(f"{Path(path).name}: not a PGM file (header ends early)")
        tokens.append(data[start:pos])
    magic = tokens[0]
    if magic not in (b"P5", b"P2"):
        raise ImporterError(f"{Path(path).name}: not a PGM file (magic {magic[:8]!r}, expected P5 or P2)")
    try:
        cols, rows, maxval = (int(t) for t in tokens[1:])
    except ValueError:
        raise ImporterError(f"{Path(path).name}: PGM header is not width, height, maxval") from None
    if not (0 < maxval < 65536) or rows <= 0 or cols <= 0:
        raise ImporterError(f"{Path(path).name}: PGM header out of range ({cols} x {rows}, maxval {maxval})")
    if magic == b"P2":
        values = np.array(data[pos:].split()[: rows * cols], dtype=np.int64)
        if values.size != rows * cols:
            raise ImporterError(f"{Path(path).name}: truncated PGM ({values.size} of {rows * cols} values)")
        return values.reshape(rows, cols).astype(np.uint8 if maxval < 256 else np.uint16)
    pos += 1  # exactly one whitespace byte ends the header
    dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
    need = rows * cols * dtype.itemsize
    if len(data) - pos < need:
        raise ImporterError(f"{Path(path).name}: truncated PGM ({len(data) - pos} of {need} pixel bytes)")
    pixels = np.frombuffer(data, dtype=dtype, count=rows * cols, offset=pos).reshape(rows, cols)
    return pixels.astype(np.uint8 if maxval < 256 else np.uint16)


def findings_of(rows: list[MiasRow], image_rows: int, report: ImportReport) -> list[Finding]:
    """The located abnormalities of one image as circles in top-left pixel coordinates.

    README note 3: "Coordinate system origin is the bottom-left corner", so row = rows - Y (continuous
    coordinates: Y = 0 is the bottom edge of the image). Note 4: widely distributed calcifications
    have no centre or radius; they are reported, not stored.
    """
    findings = []
    for i, row in enumerate(rows, start=1):
        if row.cls == "NORM":
            continue
        kind, description = KINDS[row.cls]
        pathology = SEVERITY.get(row.severity or "", "unknown")
        label = f"abnormality {i} ({row.cls})"
        if row.x is None or row.radius is None:
            report.skip(f"{row.refnum} {label}", "lesion without coordinates",
                        f"Info.txt line {row.line}: no centre/radius given (README note 4)")
            continue
        findings.append(Finding(
            kind=kind, geometry_type="circle",
            geometry=circle_geometry(row.x, image_rows - row.y, row.radius),
            pathology=pathology, label=label,
            attributes={"mias_class": row.cls, "description": description,
                        "background_tissue": TISSUE[row.tissue], "published_xy": [row.x, row.y]}))
    return findings


def looks_like(root: Path) -> bool:
    """An ``Info.txt`` whose first data row starts with ``mdb``, or ``mdbNNN.pgm`` files, near ``root``."""
    root = Path(root)
    for info in find_named(root, INFO_NAMES, max_depth=1):
        head = read_text(info)[:2000].split()
        if any(_REF_RE.match(t) for t in head[:40]):
            return True
    return any(_REF_RE.match(p.stem) for p in list(root.glob("*.pgm"))[:5] + list(root.glob("*/*.pgm"))[:5])


def _find_info(root: Path) -> Path:
    found = find_named(root, INFO_NAMES, max_depth=2)
    if not found:
        raise ImporterError(f"mini-MIAS: no Info.txt in {root} (the README's table of REFNUM, BG, CLASS, "
                            "SEVERITY, X, Y, RADIUS; it ships beside the mdbNNN.pgm files)")
    return found[0]


def pgm_to_dicom(pixels: np.ndarray, out: Path, *, refnum: str, source_sha1: str) -> Path:
    """Write a mini-MIAS film as a DICOM file so that every later step (display, patches, model
    pixels read again from ``source_path``) treats it like any other image.

    Secondary Capture, MONOCHROME2, the data set's spacing, laterality and view; no real patient
    identifiers exist, and the file (a derived file) carries none: Patient ID is left empty, the film
    pair is given to ``register_dicom`` and kept in ``patients`` only. UIDs are derived from the PGM's SHA-1, so
    the same PGM always gives the same bytes and a re-import finds the image already there.
    """
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    from workspace.data.dicom_io import grayscale_dataset, save_dicom

    ds = grayscale_dataset(pixels, sop_class_uid=SecondaryCaptureImageStorage,
                           sop_instance_uid=generate_uid(entropy_srcs=["mini-mias", source_sha1, "sop"]))
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["mini-mias", patient_of(refnum), "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["mini-mias", source_sha1, "series"])
    ds.Modality = "MG"
    ds.ConversionType = "DF"  # digitised film
    ds.PatientID = ""  # type 2: present, empty (the pair goes to the patients table, not into files)
    ds.ImageLaterality = laterality_of(refnum)
    ds.ViewPosition = VIEW
    ds.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
    ds.DerivationDescription = f"mini-MIAS {refnum}.pgm converted to DICOM by mammo-dissect"
    return save_dicom(ds, out)


def import_dataset(ws: Workspace, root: str | Path, *, db: sqlite_utils.Database | None = None, dataset: str | None = None, **_options) -> ImportReport:
    """Import a mini-MIAS folder; see the module docstring for what lands where.

    Each PGM is converted to a DICOM file ``<workspace>/dicom/mini-mias/mdbNNN_<sha1 of the PGM>.dcm``
    (the catalog's ``source_path``), then registered through ``ingest.register_dicom`` like every
    other image.
    """
    from workspace.base.catalog import file_sha1, open_catalog
    from workspace.base.progress import progress
    from workspace.data.importers.common import add_lesions, register_dicom_counted

    name = dataset or DATASET
    root = dataset_folder(root, "mini-MIAS")
    info = _find_info(root)
    rows, bad = parse_info(info)
    report = ImportReport(name, str(root))
    for number, why in bad:
        report.skip(f"Info.txt line {number}", "unreadable Info.txt row", why)
    by_ref: dict[str, list[MiasRow]] = {}
    for row in rows:
        by_ref.setdefault(row.refnum, []).append(row)
    pgms = {p.stem.lower(): p for p in sorted(root.rglob("*.pgm")) if _REF_RE.match(p.stem)}
    for stem in sorted(set(pgms) - set(by_ref)):
        report.skip(pgms[stem], "image not in Info.txt", "no row names it, so no labels")
    db = db if db is not None else open_catalog(ws)
    converted_dir = ws.dicom_dir / DATASET
    for refnum in progress(sorted(by_ref), desc="mini-MIAS", unit="image"):
        image_rows = by_ref[refnum]
        path = pgms.get(refnum)
        if path is None:
            report.skip(refnum, "image file missing", f"{refnum}.pgm not found under {root}")
            continue
        try:
            pixels = read_pgm(path)
            sha1 = file_sha1(path)
        except ImporterError as error:
            report.skip(path, "unreadable image", str(error))
            continue
        except OSError as error:
            report.skip(path, "unreadable image", f"cannot read file: {error.strerror or error}")
            continue
        if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE):
            report.warn(f"{path.name}: {pixels.shape[0]} x {pixels.shape[1]} pixels, the README says every "
                        f"image is {IMAGE_SIZE} x {IMAGE_SIZE}; coordinates taken from its bottom edge")
        # Named by the PGM's content: another copy of mdbNNN (another --dataset, a corrected file) gets
        # its own DICOM instead of overwriting the file an image already in the catalog is read from.
        converted = converted_dir / f"{refnum}_{sha1[:12]}.dcm"
        if not converted.is_file():
            pgm_to_dicom(pixels, converted, refnum=refnum, source_sha1=sha1)
        pathologies = [SEVERITY.get(r.severity or "") for r in image_rows if r.cls != "NORM"]
        image_id = register_dicom_counted(
            ws, db, converted, report, dataset=name, patient_source_id=patient_of(refnum),
            label=label_from_pathology(pathologies),
            extra={"laterality": laterality_of(refnum), "view": VIEW})
        if image_id is None:
            continue
        add_lesions(db, image_id, pixels.shape[0], pixels.shape[1],
                    findings_of(image_rows, pixels.shape[0], report),
                    source=DATASET, report=report, image_ref=refnum)
    return report
