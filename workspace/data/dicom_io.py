"""Reading a mammogram from DICOM: validated header fields, model pixels, display pixels, orientation.

Intensities (DICOM PS3.3 C.11, in this order):

1. **Modality LUT**: Rescale Slope/Intercept (or a Modality LUT Sequence) turns stored values into
   modality values (``pydicom``'s ``apply_modality_lut``).
2. **VOI LUT or window** (people only): a VOI LUT Sequence (our own table lookup: pydicom 3.0's
   ``apply_voi`` wraps 8-bit tables) or Window Center/Width with the VOI LUT Function LINEAR, LINEAR_EXACT or
   SIGMOID (:func:`window_unit`, the standard's formulas), giving [0, 1].
3. **MONOCHROME1 inversion**, so that dense tissue is bright in both views.

*Model pixels* skip step 2: modality values are scaled to [0, 1] by the modality range of the stored
range, which for the usual identity rescale is ``value / (2**bits_stored - 1)``; a rescale maps the
stored range ``[smin, smax]`` to ``[lo, hi]`` (``lo < hi`` whatever the slope's sign) and we scale by
``(v - lo) / (hi - lo)``, so values never leave [0, 1] (a Modality LUT Sequence uses its own output
range ``[0, 2**lut_bits - 1]``). *Display pixels* are 8-bit. Padding pixels (Pixel Padding Value,
with Pixel Padding Range Limit) are set to 0 (background) in both.

Orientation: every pixel array this module returns is in NORMALISED orientation, chest wall on the
left. A first guess comes from the header (Patient Orientation, else laterality with Field of View
Horizontal Flip); the pixels then decide (the chest-wall half of the breast foreground holds more
tissue). When header and pixels disagree, the pixels win and a warning is recorded.
Geometry coordinates are continuous: pixel column ``i`` spans ``[i, i + 1)``, so a mirror maps ``x`` to
``cols - x`` and a box ``[x, y, w, h]`` to ``[cols - x - w, y, w, h]``; :func:`to_normalised` and
:func:`from_normalised` map points, boxes, polygons, ellipses, circles and mask arrays both ways.

Writing: :func:`grayscale_dataset` and :func:`save_dicom` are the one way the code makes a DICOM file
(the synthetic generator, the mini-MIAS converter and the test fixtures).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from workspace.base.errors import DicomReadError
from workspace.base.modality import modality_of
from workspace.data.view_text import TEXT_ATTRIBUTES, infer_view_laterality

PATCH_SIZE = 512
"""The patch side of the paper: an image smaller than this in either direction has no patch."""

FOREGROUND_DOWNSAMPLE = 8
"""Foreground masks are computed and stored at 1/8 of the image size."""

ORIENTATION_MARGIN = 0.1
"""Pixels decide the chest-wall side only when (left - right) / (left + right) tissue differs by this."""

VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")

# CID 4014 (View for Mammography): SNOMED CT codes (SCT) and their retired SNOMED RT codes (SRT).
_VIEW_CODES = {
    "399162004": "CC", "R-10242": "CC",
    "399368009": "MLO", "R-10226": "MLO",
    "399260004": "ML", "R-10224": "ML",
    "399352003": "LM", "R-10228": "LM",
    "399099002": "LMO", "R-10230": "LMO",
    "399196006": "FB", "R-10244": "FB",
    "399188001": "SIO", "R-102D0": "SIO",
    "441555000": "ISO", "R-40AAA": "ISO",
    "399192008": "XCCL", "R-1024A": "XCCL",
    "399101009": "XCCM", "R-1024B": "XCCM",
}
_VIEW_MEANINGS = {
    "CRANIO-CAUDAL": "CC", "MEDIO-LATERAL OBLIQUE": "MLO", "MEDIO-LATERAL": "ML",
    "LATERO-MEDIAL": "LM", "LATERO-MEDIAL OBLIQUE": "LMO", "CAUDO-CRANIAL (FROM BELOW)": "FB",
    "SUPEROLATERAL TO INFEROMEDIAL OBLIQUE": "SIO", "INFEROMEDIAL TO SUPEROLATERAL OBLIQUE": "ISO",
    "CRANIO-CAUDAL EXAGGERATED LATERALLY": "XCCL", "CRANIO-CAUDAL EXAGGERATED MEDIALLY": "XCCM",
}
_VIEW_POSITIONS = {"CC", "MLO", "ML", "LM", "LMO", "FB", "SIO", "ISO", "XCCL", "XCCM", "AT", "CV"}
_VIEW_ALIASES = {"RCC": "CC", "LCC": "CC", "RMLO": "MLO", "LMLO": "MLO", "CCID": "CC", "MLOID": "MLO"}
_CC_LIKE = {"CC", "XCCL", "XCCM", "FB", "CV"}


# -- intensities ---------------------------------------------------------------------------------

def window_unit(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Window modality values to [0, 1] (float64) by DICOM PS3.3 C.11.2.1.2 / C.11.2.1.3.

    LINEAR: ``x <= c - 0.5 - (w - 1) / 2`` gives 0, ``x > c - 0.5 + (w - 1) / 2`` gives 1, otherwise
    ``((x - (c - 0.5)) / (w - 1) + 0.5)``; needs ``w >= 1``. LINEAR_EXACT: the same with ``c`` and ``w``
    as given (``w > 0``). SIGMOID: ``1 / (1 + exp(-4 (x - c) / w))`` (``w > 0``).
    """
    x = np.asarray(values, dtype=np.float64)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            raise DicomReadError(f"SIGMOID window width must be > 0, got {width}")
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR":
        if width < 1:
            raise DicomReadError(f"LINEAR window width must be >= 1, got {width}")
        c, w = center - 0.5, width - 1.0
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise DicomReadError(f"LINEAR_EXACT window width must be > 0, got {width}")
        c, w = center, float(width)
    else:
        raise DicomReadError(f"unsupported VOI LUT Function {function!r} (known: {', '.join(VOI_FUNCTIONS)})")
    if w == 0:  # LINEAR with width 1: a threshold at c - 0.5
        return (x > c).astype(np.float64)
    out = (x - c) / w + 0.5
    out[x <= c - w / 2] = 0.0
    out[x > c + w / 2] = 1.0
    return np.clip(out, 0.0, 1.0)


def _first(value: Any) -> Any:
    """The first of a multi-valued element, or the value itself."""
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return value[0] if len(value) else None
    return value


def _float_or_none(value: Any) -> float | None:
    value = _first(value)
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(_first(value) if keyword != "PatientOrientation" else value).strip()
    return text or None


def _apply_voi_lut_item(values: np.ndarray, item, ds) -> np.ndarray:
    """A VOI LUT Sequence item (PS3.3 C.11.2.1.1) applied to modality values, output scaled to [0, 1].

    Inputs below the first mapped value take the first entry, inputs past the table the last one; the
    output is divided by ``2**bits - 1`` (bits: the descriptor's third value). Not pydicom's ``apply_voi``:
    in pydicom 3.0 it indexes 8-bit tables with a uint8 array, so any input past 255 wraps around.
    """
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2 ** 16
    data = item.LUTData
    if isinstance(data, bytes | bytearray):  # OW: 16-bit words in the file's byte order
        little = ds.file_meta._tsyntax_encoding[1] if hasattr(ds, "file_meta") else True
        table = np.frombuffer(bytes(data), dtype="<u2" if little is not False else ">u2")[:entries]
    else:
        table = np.asarray(data if isinstance(data, list | tuple) or hasattr(data, "__len__") else [data],
                           dtype=np.float64)
    table = np.asarray(table, dtype=np.float64)
    if table.size < entries:
        raise DicomReadError(f"VOI LUT has {table.size} entries, its descriptor says {entries}")
    index = np.clip(np.rint(values) - first, 0, entries - 1).astype(np.int64)
    return np.clip(table[index] / float(2 ** bits - 1), 0.0, 1.0)


# -- geometry ------------------------------------------------------------------------------------

def _flips(image: Any) -> tuple[int, int, bool, bool]:
    """(rows, cols, flip_horizontal, flip_vertical) from a catalog row, a dict or a DicomImage."""
    get = image.get if isinstance(image, Mapping) else (lambda key: getattr(image, key))
    return int(get("rows")), int(get("cols")), bool(get("flip_horizontal")), bool(get("flip_vertical"))


def _map_geometry(geometry_type: str, geometry: Any, rows: int, cols: int, fh: bool, fv: bool) -> Any:
    """Apply the mirrors (each its own inverse) to one geometry; JSON shapes as in the catalog."""
    def px(x):
        return cols - x if fh else x

    def py(y):
        return rows - y if fv else y

    kind = geometry_type.lower()
    if kind == "point":
        x, y = geometry
        return [px(x), py(y)]
    if kind == "box":
        x, y, w, h = geometry
        return [cols - x - w if fh else x, rows - y - h if fv else y, w, h]
    if kind == "polygon":
        return [[px(x), py(y)] for x, y in geometry]
    if kind == "ellipse":
        out = dict(geometry, cx=px(geometry["cx"]), cy=py(geometry["cy"]))
        angle = float(geometry.get("angle", 0.0))
        out["angle"] = -angle if fh != fv else angle  # one mirror reverses the rotation sense
        return out
    if kind == "circle":
        return dict(geometry, cx=px(geometry["cx"]), cy=py(geometry["cy"]))
    if kind == "mask":
        if isinstance(geometry, np.ndarray):
            return flip_array(geometry, fh, fv)
        out = dict(geometry)
        if "bbox" in out:
            out["bbox"] = _map_geometry("box", out["bbox"], rows, cols, fh, fv)
        return out
    raise ValueError(f"unknown geometry type {geometry_type!r} "
                     "(point, box, polygon, ellipse, circle, mask)")


def flip_array(array: np.ndarray, flip_horizontal: bool, flip_vertical: bool) -> np.ndarray:
    """Mirror an image-shaped array (rows, cols, ...) at any resolution; its own inverse."""
    if flip_horizontal:
        array = array[:, ::-1]
    if flip_vertical:
        array = array[::-1]
    return np.ascontiguousarray(array)


def to_normalised(geometry_type: str, geometry: Any, image: Any) -> Any:
    """Map a geometry from ORIGINAL pixel coordinates to NORMALISED ones (chest wall left).

    ``image`` is a catalog row, a dict or a :class:`DicomImage` with ``rows``, ``cols``,
    ``flip_horizontal``, ``flip_vertical``. ``geometry_type`` is ``point`` ([x, y]), ``box``
    ([x, y, w, h]), ``polygon`` ([[x, y], ...]), ``ellipse`` ({cx, cy, rx, ry, angle (degrees)}),
    ``circle`` ({cx, cy, r}) or ``mask`` (a 2-D array of any resolution, or a dict whose ``bbox`` is mapped).
    """
    return _map_geometry(geometry_type, geometry, *_flips(image))


def from_normalised(geometry_type: str, geometry: Any, image: Any) -> Any:
    """Map a geometry from NORMALISED coordinates back to ORIGINAL ones (the inverse of :func:`to_normalised`)."""
    return _map_geometry(geometry_type, geometry, *_flips(image))


# -- foreground ----------------------------------------------------------------------------------

def downsample_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Block means over ``factor x factor`` blocks (edges padded with 0); shape ceil(rows/f), ceil(cols/f)."""
    if factor <= 1:
        return image.astype(np.float32)
    rows, cols = image.shape
    r, c = -(-rows // factor), -(-cols // factor)
    padded = np.zeros((r * factor, c * factor), dtype=np.float32)
    padded[:rows, :cols] = image
    return padded.reshape(r, factor, c, factor).mean(axis=(1, 3))


_STRIP_MAX_DEPTH = 0.15
"""A run from an image edge at most this fraction of the image's smaller side deep is thin (a strip)."""

_STRIP_MIN_COVER = 1 / 3
"""An image is a scanned film when thin runs cover at least this fraction of one of its edges."""


def foreground_mask(display_u8: np.ndarray, downsample: int = FOREGROUND_DOWNSAMPLE) -> np.ndarray:
    """The breast, on the downsampled windowed image: threshold, largest connected component, holes filled.

    The threshold is Otsu's, except on a scanned film, recognised by its border strips (thin bright
    bands along an image edge, :func:`_edge_strips`): there Otsu falls between fat and dense tissue, so
    the threshold sits just above the film background (:func:`_background_threshold`), which puts the
    mask edge on the skin line, and the strips are removed before the largest component is taken.
    Burned-in labels and markers are components of their own and stay out. Returns a bool array of
    shape ``(ceil(rows / downsample), ceil(cols / downsample))``; all False for a blank image."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    small = downsample_mean(np.asarray(display_u8, dtype=np.float32), downsample)
    if float(small.max()) - float(small.min()) < 1.0:
        return np.zeros(small.shape, dtype=bool)
    otsu = float(threshold_otsu(small))
    mask = small > otsu
    outline = small > _background_threshold(small, otsu)
    strips = _edge_strips(outline)
    if strips is not None:
        mask = outline & ~strips
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(small.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def _background_threshold(small: np.ndarray, otsu: float) -> float:
    """Just above the background: its level (the most common value of the dark class) plus the larger of
    3 robust noise sigmas, 2 display levels and 5% of the way to Otsu's threshold."""
    dark = small[small <= otsu]
    level = float(np.argmax(np.bincount(np.rint(np.maximum(dark, 0)).astype(np.int64))))
    near = dark[np.abs(dark - level) < max((otsu - level) / 4, 1.0)]
    sigma = 1.4826 * float(np.median(np.abs(near - level))) if near.size else 0.0
    return level + max(3 * sigma, 2.0, 0.05 * (otsu - level))


def _edge_strips(mask: np.ndarray) -> np.ndarray | None:
    """The border strips of a scanned film in ``mask`` (bool, True where they are), or None when no edge
    carries one (the image is not a film).

    Along each edge, every line across it has a run of foreground starting at the edge; a run at most
    :data:`_STRIP_MAX_DEPTH` of the smaller side deep is thin. An edge where thin runs cover
    :data:`_STRIP_MIN_COVER` of the lines carries a strip. The strip depth of an edge is the median thin
    run: runs up to 1.3 times that (+2 pixels) are removed whole, deeper runs (the breast, which reaches the
    chest-wall edge and, in an MLO, the top) are kept whole."""
    max_depth = max(2, int(round(_STRIP_MAX_DEPTH * min(mask.shape))))
    strips = np.zeros(mask.shape, dtype=bool)
    film = False
    # Each view puts one edge at column 0; writing through the same view of `strips` maps back.
    for view, out in ((mask, strips), (mask[:, ::-1], strips[:, ::-1]),
                      (mask.T, strips.T), (mask[::-1].T, strips[::-1].T)):
        background = ~view
        runs = np.where(background.any(axis=1), background.argmax(axis=1), view.shape[1])
        thin = (runs > 0) & (runs <= max_depth)
        if not thin.any():
            continue
        film = film or float(thin.mean()) >= _STRIP_MIN_COVER
        cut = min(max_depth, int(np.ceil(1.3 * float(np.median(runs[thin])))) + 2)
        removed = (runs > 0) & (runs <= cut)
        out |= removed[:, None] & (np.arange(view.shape[1])[None, :] < runs[:, None])
    return strips if film else None


def upsample_mask(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A downsampled mask back to (rows, cols) by nearest neighbour (block repeat when it fits)."""
    r, c = mask.shape
    fr, fc = -(-rows // r), -(-cols // c)
    if -(-rows // fr) == r and -(-cols // fc) == c:
        return np.repeat(np.repeat(mask, fr, axis=0), fc, axis=1)[:rows, :cols]
    ri = np.minimum((np.arange(rows) * r) // rows, r - 1)
    ci = np.minimum((np.arange(cols) * c) // cols, c - 1)
    return mask[ri][:, ci]


def chest_wall_side(mask: np.ndarray) -> str | None:
    """``"left"`` or ``"right"``: the half of the foreground holding more tissue (the breast is widest at
    the chest wall), or None when the halves differ by less than :data:`ORIENTATION_MARGIN`."""
    cols = mask.shape[1]
    profile = mask.sum(axis=0, dtype=np.int64)
    left, right = int(profile[: cols // 2].sum()), int(profile[cols - cols // 2:].sum())
    if left + right == 0 or abs(left - right) / (left + right) < ORIENTATION_MARGIN:
        return None
    return "left" if left > right else "right"


# -- the image -----------------------------------------------------------------------------------

@dataclass
class DicomImage:
    """One mammogram read from a DICOM file. Pixel accessors return NORMALISED orientation arrays.

    Header fields are plain attributes; :attr:`meta` holds the ones the catalog's ``images`` table keeps;
    :attr:`patient` holds the identifiers (they go to the ``patients`` table only). A ``view`` or
    ``laterality`` the header lacks may be read from the file's text (:mod:`workspace.data.view_text`);
    :attr:`inferred` then says where from, e.g. ``{"view": "PatientID (CBIS-DDSM naming)"}`` (attribute
    names only, never their values).
    """

    path: Path
    rows: int
    cols: int
    modality: str | None
    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    pixel_spacing: tuple[float, float] | None
    photometric: str
    bits_stored: int
    bits_allocated: int
    pixel_representation: int
    transfer_syntax: str
    window_center: float | None
    window_width: float | None
    voi_function: str | None
    laterality: str | None
    view: str | None
    patient_orientation: tuple[str, ...] | None
    fov_horizontal_flip: bool | None
    patient: dict = field(repr=False)
    flip_horizontal: bool = False
    flip_vertical: bool = False
    warnings: list[str] = field(default_factory=list)
    inferred: dict[str, str] = field(default_factory=dict)
    _ds: Any = field(default=None, repr=False)
    _stored: np.ndarray | None = field(default=None, repr=False)

    # -- intensities ---------------------------------------------------------------------------
    @cached_property
    def padding(self) -> np.ndarray | None:
        """Bool (rows, cols), ORIGINAL orientation: pixels equal to the padding value (or in its range)."""
        ds = self._ds
        value = ds.get("PixelPaddingValue")
        if value is None:
            return None
        limit = ds.get("PixelPaddingRangeLimit")
        lo, hi = (int(value), int(value)) if limit is None else sorted((int(value), int(limit)))
        mask = (self._stored >= lo) & (self._stored <= hi)
        return mask if mask.any() else None

    @cached_property
    def modality_values(self) -> np.ndarray:
        """Stored values through the Modality LUT (rescale), ORIGINAL orientation, float64."""
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(self._stored, self._ds), dtype=np.float64)

    def modality_range(self) -> tuple[float, float]:
        """(lo, hi): where the Modality LUT sends the stored range (lo < hi)."""
        ds = self._ds
        if ds.get("ModalityLUTSequence"):
            return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
        if self.pixel_representation:
            smin, smax = -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        else:
            smin, smax = 0, 2 ** self.bits_stored - 1
        slope = _float_or_none(ds.get("RescaleSlope"))
        intercept = _float_or_none(ds.get("RescaleIntercept"))
        slope = 1.0 if slope is None or slope == 0 else slope
        intercept = 0.0 if intercept is None else intercept
        a, b = smin * slope + intercept, smax * slope + intercept
        return (a, b) if a < b else (b, a)

    def _original_model(self) -> np.ndarray:
        lo, hi = self.modality_range()
        out = (self.modality_values - lo) / (hi - lo)
        np.clip(out, 0.0, 1.0, out=out)
        if self.photometric == "MONOCHROME1":
            out = 1.0 - out
        out = out.astype(np.float32)
        if self.padding is not None:
            out[self.padding] = 0.0
        return out

    def _original_display_unit(self) -> np.ndarray:
        """VOI LUT or window to [0, 1], then MONOCHROME1 inverted; ORIGINAL orientation, float64."""
        ds = self._ds
        values = self.modality_values
        voi = ds.get("VOILUTSequence")
        if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
            out = _apply_voi_lut_item(values, voi[0], ds)
        elif self.window_center is not None and self.window_width is not None:
            out = window_unit(values, self.window_center, self.window_width, self.voi_function or "LINEAR")
        else:  # no VOI in the file: the full range of the (non-padding) pixels
            real = values if self.padding is None else values[~self.padding]
            lo, hi = (float(real.min()), float(real.max())) if real.size else (0.0, 1.0)
            out = window_unit(values, (lo + hi) / 2, max(hi - lo, 1e-6), "LINEAR_EXACT")
        if self.photometric == "MONOCHROME1":
            out = 1.0 - out
        if self.padding is not None:
            out[self.padding] = 0.0
        return out

    @cached_property
    def _original_display(self) -> np.ndarray:
        """8-bit display, ORIGINAL orientation (computed once: the orientation check needs it too)."""
        return np.rint(self._original_display_unit() * 255.0).astype(np.uint8)

    def model_pixels(self) -> np.ndarray:
        """float32 (rows, cols) in [0, 1], NORMALISED orientation: modality LUT, MONOCHROME1 inverted,
        scaled by the modality range of the stored range (``/ (2**bits_stored - 1)`` without rescale)."""
        return flip_array(self._original_model(), self.flip_horizontal, self.flip_vertical)

    def display_pixels(self) -> np.ndarray:
        """uint8 (rows, cols), NORMALISED orientation: modality LUT, VOI LUT or window, MONOCHROME1 inverted."""
        return flip_array(self._original_display, self.flip_horizontal, self.flip_vertical)

    def foreground(self, downsample: int = FOREGROUND_DOWNSAMPLE) -> np.ndarray:
        """The breast mask of :func:`foreground_mask`, NORMALISED orientation, downsampled."""
        return foreground_mask(self.display_pixels(), downsample)

    @property
    def stored_pixels(self) -> np.ndarray:
        """The decoded stored values, ORIGINAL orientation (read-only view)."""
        view = self._stored.view()
        view.flags.writeable = False
        return view

    # -- catalog fields ------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        """The ``images`` columns this file determines (no patient identifiers)."""
        row_mm, col_mm = self.pixel_spacing if self.pixel_spacing else (None, None)
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "laterality": self.laterality,
            "view": self.view,
            "rows": self.rows,
            "cols": self.cols,
            "pixel_spacing_row": row_mm,
            "pixel_spacing_col": col_mm,
            "photometric": self.photometric,
            "bits_stored": self.bits_stored,
            "transfer_syntax": self.transfer_syntax,
            "window_center": self.window_center,
            "window_width": self.window_width,
            "voi_function": self.voi_function,
            "flip_horizontal": int(self.flip_horizontal),
            "flip_vertical": int(self.flip_vertical),
            "modality": self.modality,
        }

    # -- orientation ---------------------------------------------------------------------------
    def header_flips(self) -> tuple[bool | None, bool]:
        """(flip_horizontal or None when the header does not say, flip_vertical) from the header alone."""
        row_dir, col_dir = None, None
        if self.patient_orientation and len(self.patient_orientation) == 2:
            row_dir, col_dir = (v.upper() for v in self.patient_orientation)
        flip_h: bool | None = None
        if row_dir and ("A" in row_dir) != ("P" in row_dir):
            flip_h = "P" in row_dir  # rows run towards posterior: the chest wall is on the right
        elif self.laterality in ("L", "R"):
            # Without Patient Orientation, vendors store as hung: right breasts with the chest wall right.
            flip_h = self.laterality == "R"
            if self.fov_horizontal_flip:
                flip_h = not flip_h
        flip_v = False
        if col_dir:
            if "H" in col_dir and "F" not in col_dir:
                flip_v = True  # columns run towards the head: upside down for every standard view
            elif "F" not in col_dir and self.view in _CC_LIKE and self.laterality in ("L", "R"):
                # CC: the lateral side is at the top, so columns run towards the other breast.
                flip_v = self.laterality in col_dir
        return flip_h, flip_v

    def decide_orientation(self) -> None:
        """Set the flips: header first guess, verified (and overruled) by the pixels. Only for a modality
        with a chest wall to put on the left (:mod:`workspace.base.modality`); any other keeps its stored
        orientation."""
        if not modality_of(self.modality).chest_wall_left:
            self.flip_horizontal = self.flip_vertical = False
            return
        header_h, self.flip_vertical = self.header_flips()
        side = chest_wall_side(foreground_mask(self._original_display))
        pixel_h = None if side is None else side == "right"
        if pixel_h is None:
            self.flip_horizontal = bool(header_h)
            if header_h is None:
                self.warnings.append("orientation: neither the header nor the pixels show the chest-wall "
                                     "side; kept as stored")
        else:
            self.flip_horizontal = pixel_h
            if header_h is not None and header_h != pixel_h:
                self.warnings.append(
                    f"orientation: header puts the chest wall on the {'right' if header_h else 'left'} "
                    f"but the pixels show it on the {side}; trusted the pixels")


# -- writing -------------------------------------------------------------------------------------

def grayscale_dataset(pixels: np.ndarray | None, *, sop_class_uid: str, sop_instance_uid: str,
                      photometric: str = "MONOCHROME2", bits_stored: int | None = None) -> Any:
    """A new pydicom ``Dataset`` for one grayscale frame, to which the caller adds its own elements.

    File meta (Explicit VR Little Endian), SOP class and instance and, when ``pixels`` (uint8 or uint16,
    (rows, cols), stored values) are given, the Image Pixel module: unsigned, Bits Allocated 8 or 16
    from the dtype, Bits Stored ``bits_stored`` (default: all allocated bits).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    if pixels is None:
        return ds
    if pixels.dtype not in (np.uint8, np.uint16) or pixels.ndim != 2:
        raise ValueError(f"grayscale pixels must be uint8 or uint16 (rows, cols), got {pixels.dtype} "
                         f"{pixels.shape}")
    bits = pixels.dtype.itemsize * 8
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def save_dicom(ds: Any, path: str | os.PathLike) -> Path:
    """Write ``ds`` (with its file meta) to ``path`` atomically, creating its folder: a reader never
    sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
    return path


# -- reading -------------------------------------------------------------------------------------

def _view(ds) -> str | None:
    position = (_text(ds, "ViewPosition") or "").upper().replace(" ", "")
    if position in _VIEW_POSITIONS:
        return position
    if position in _VIEW_ALIASES:
        return _VIEW_ALIASES[position]
    for item in ds.get("ViewCodeSequence") or []:
        code = str(item.get("CodeValue", "")).strip()
        if code in _VIEW_CODES:
            return _VIEW_CODES[code]
        meaning = str(item.get("CodeMeaning", "")).strip().upper()
        if meaning in _VIEW_MEANINGS:
            return _VIEW_MEANINGS[meaning]
    return position or None


def _laterality(ds) -> str | None:
    for keyword in ("ImageLaterality", "Laterality"):
        value = (_text(ds, keyword) or "").upper()
        if value in ("L", "R", "B", "U"):
            return value
    return None


def _view_and_laterality(ds) -> tuple[str | None, str | None, dict[str, str], list[str]]:
    """(view, laterality, inferred, warnings): header values first, what the header lacks from its text."""
    texts = [(keyword, _text(ds, keyword) or "") for keyword in TEXT_ATTRIBUTES]
    found = infer_view_laterality(texts, view=_view(ds), laterality=_laterality(ds))
    return found.view, found.laterality, found.inferred, found.warnings


def _spacing(ds) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            if value is not None and len(value) == 2 and float(value[0]) > 0 and float(value[1]) > 0:
                return float(value[0]), float(value[1])
        except (TypeError, ValueError):
            continue
    return None


def _decoder_problem(uid) -> str | None:
    """Why pixel data in this transfer syntax cannot be decoded here, or None when it can."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"no pixel data decoder exists in pydicom for transfer syntax {uid.name} ({uid})"
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        return f"no decoder installed for transfer syntax {uid.name} ({uid}): install {missing}"
    return None


def read_dicom(path: str | os.PathLike, *, min_size: int = 0,
               orientation: tuple[bool, bool] | None = None) -> DicomImage:
    """Read and validate one DICOM mammogram, decoding its pixels.

    ``min_size``: refuse images with fewer rows or columns (import uses :data:`PATCH_SIZE`).
    ``orientation``: (flip_horizontal, flip_vertical) known already (e.g. from the catalog): used as
    given, skipping the pixel check. Raises :class:`DicomReadError` naming the problem: not DICOM or
    truncated, no pixel data, a transfer syntax with no decoder (naming the plugins that would decode it),
    colour or multi-frame data, too small.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import pixel_array

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise DicomReadError(f"{path.name}: not a DICOM file (no 'DICM' file header)") from None
    except FileNotFoundError:
        raise DicomReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DicomReadError(f"{path}: is a folder, not a file") from None
    except Exception as error:  # pydicom raises many kinds on cut or corrupt files
        raise DicomReadError(f"{path.name}: truncated or corrupt DICOM file "
                             f"({type(error).__name__}: {error})") from None

    last = next(reversed(ds._dict.values()), None) if len(ds._dict) else None
    if getattr(last, "value", None) is not None and getattr(last, "length", 0) not in (None, 0xFFFFFFFF) \
            and len(last.value) < last.length:
        raise DicomReadError(f"{path.name}: truncated DICOM file (element {last.tag} declares {last.length} "
                             f"bytes, the file holds {len(last.value)})")
    if "PixelData" not in ds:
        sop = ds.get("SOPClassUID")
        sop_name = getattr(sop, "name", str(sop))
        if "Image Storage" in str(sop_name) or "Rows" in ds:
            raise DicomReadError(f"{path.name}: no pixel data although it is a {sop_name} (truncated file?)")
        other = next((k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
        what = f"only {other}" if other else "no pixel data"
        raise DicomReadError(f"{path.name}: {what} (SOP class {sop_name}, modality {ds.get('Modality')})")
    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if uid is None:
        raise DicomReadError(f"{path.name}: no Transfer Syntax UID in the file meta information")
    problem = _decoder_problem(uid)
    if problem:
        raise DicomReadError(f"{path.name}: {problem}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomReadError(f"{path.name}: not a grayscale image (Photometric Interpretation "
                             f"{photometric or 'missing'})")
    frames = int(_float_or_none(ds.get("NumberOfFrames")) or 1)
    if frames > 1:
        raise DicomReadError(f"{path.name}: {frames} frames (e.g. tomosynthesis); only single-frame "
                             "projection mammograms are supported")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits_stored, bits_allocated = int(ds.BitsStored), int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        raise DicomReadError(f"{path.name}: Rows, Columns, Bits Stored or Bits Allocated missing") from None
    if min(rows, cols) < min_size:
        raise DicomReadError(f"{path.name}: image too small ({rows} x {cols}) for one {min_size} x "
                             f"{min_size} patch")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = pixel_array(ds)
    except Exception as error:
        text = str(error)
        if "less than expected" in text or ("length" in text and "expected" in text):
            raise DicomReadError(f"{path.name}: truncated pixel data ({text})") from None
        raise DicomReadError(f"{path.name}: pixel data could not be decoded with {uid.name} "
                             f"({type(error).__name__}: {text})") from None
    if stored.shape != (rows, cols):
        raise DicomReadError(f"{path.name}: decoded pixels have shape {stored.shape}, header says "
                             f"{rows} x {cols}")

    voi_function = (_text(ds, "VOILUTFunction") or "").upper() or None
    center, width = _float_or_none(ds.get("WindowCenter")), _float_or_none(ds.get("WindowWidth"))
    if center is not None and width is not None and voi_function is None:
        voi_function = "LINEAR"
    po = ds.get("PatientOrientation")
    patient_orientation = tuple(str(v).strip() for v in po) if po else None
    fov = _text(ds, "FieldOfViewHorizontalFlip")
    birth = _text(ds, "PatientBirthDate")
    name = ds.get("PatientName")
    view, laterality, inferred, notes = _view_and_laterality(ds)
    image = DicomImage(
        path=path, rows=rows, cols=cols,
        modality=(_text(ds, "Modality") or "").upper() or None,
        sop_class_uid=_text(ds, "SOPClassUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        pixel_spacing=_spacing(ds),
        photometric=photometric, bits_stored=bits_stored, bits_allocated=bits_allocated,
        pixel_representation=int(ds.get("PixelRepresentation", 0) or 0),
        transfer_syntax=str(uid),
        window_center=center, window_width=width, voi_function=voi_function,
        laterality=laterality, view=view,
        patient_orientation=patient_orientation,
        fov_horizontal_flip=None if fov is None else fov.upper() == "YES",
        patient={"source_patient_id": _text(ds, "PatientID"),
                 "patient_name": str(name).strip() or None if name is not None else None,
                 "birth_date": birth},
        warnings=notes, inferred=inferred,
        _ds=ds, _stored=stored,
    )
    if voi_function is not None and voi_function not in VOI_FUNCTIONS:
        raise DicomReadError(f"{path.name}: unsupported VOI LUT Function {voi_function!r}")
    if orientation is None:
        image.decide_orientation()
    else:
        image.flip_horizontal, image.flip_vertical = bool(orientation[0]), bool(orientation[1])
    return image


__all__ = ["PATCH_SIZE", "FOREGROUND_DOWNSAMPLE", "DicomImage", "read_dicom", "window_unit",
           "foreground_mask", "upsample_mask", "downsample_mean", "chest_wall_side", "flip_array",
           "to_normalised", "from_normalised", "grayscale_dataset", "save_dicom"]
