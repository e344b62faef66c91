"""Label Studio results from reads and ROI queries, and the reader's regions back to masks.

Coordinates: every region is on the displayed image of its task, whose pixels are the normalised
orientation of the mammogram at full resolution (``derived/display/<image_id>.png``) or, in Patch
review, the patch crop. Rectangles are percentages of ``original_width`` / ``original_height``;
brush regions are RLE masks of exactly that size (:mod:`ml_backend.rle`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ml_backend import label_configs as lc
from ml_backend.rle import RleError, decode_mask, encode_mask
from workspace.base.errors import MammoError, QueryError


class RequestError(MammoError):
    """A request the backend cannot answer; ``status`` is the HTTP status, ``code`` a short machine name."""

    def __init__(self, message: str, *, status: int = 400, code: str = "bad_request"):
        super().__init__(message)
        self.status = status
        self.code = code


def region_id(*parts: object) -> str:
    """A short stable region id (Label Studio ids are short strings)."""
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:10]


def rectangle(box: Sequence[float], width: int, height: int, *, label: str, to_name: str,
              from_name: str = "findings", score: float | None = None, rid: str | None = None,
              text: str | None = None) -> dict:
    """A RectangleLabels region for a box [x, y, w, h] in pixels of a width x height image (clipped to it).

    The model's ``findings`` are read-only: the reader cannot drag or resize them, so a drag that starts
    inside a suspicious patch draws the ROI box instead of moving the patch.
    """
    x, y, w, h = (float(v) for v in box)
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    result = {
        "id": rid or region_id(from_name, x, y, w, h),
        "from_name": from_name, "to_name": to_name, "type": "rectanglelabels",
        "original_width": int(width), "original_height": int(height), "image_rotation": 0,
        "value": {"x": 100.0 * x0 / width, "y": 100.0 * y0 / height,
                  "width": 100.0 * (x1 - x0) / width, "height": 100.0 * (y1 - y0) / height,
                  "rotation": 0, "rectanglelabels": [label]},
    }
    if from_name == "findings":
        result["readonly"] = True
    if score is not None:
        result["score"] = float(score)
    if text:
        result["meta"] = {"text": [text]}
    return result


SEE_THROUGH_ALPHA = 128  # a brush pixel's alpha inside a model region (the lowest decode_mask reads as inside)


def see_through(mask: np.ndarray) -> np.ndarray:
    """A bool mask as uint8 alpha levels: a solid outline (255) around a see-through inside
    (:data:`SEE_THROUGH_ALPHA`), so the tissue under a unit's map stays readable. The outline is about
    1/280 of the image's longer side (2-3 screen pixels at the size Label Studio shows a mammogram)."""
    from scipy.ndimage import binary_erosion

    mask = np.asarray(mask, dtype=bool)
    levels = np.zeros(mask.shape, dtype=np.uint8)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return levels
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    width = max(2, round(max(mask.shape) / 280))
    crop = np.pad(mask[y0:y1, x0:x1], width)  # pixels at the image's edge get an outline too
    inner = binary_erosion(crop, iterations=width)[width:-width, width:-width]
    part = levels[y0:y1, x0:x1]
    part[mask[y0:y1, x0:x1]] = 255
    part[inner] = SEE_THROUGH_ALPHA
    return levels


def brush(mask: np.ndarray, *, label: str, to_name: str, from_name: str = "units", score: float | None = None,
          rid: str | None = None, text: str | None = None) -> dict:
    """A BrushLabels region for a bool mask of the displayed image's full size (height, width).

    The model's ``units`` regions are drawn as a solid outline over a see-through inside
    (:func:`see_through`); they decode to the same mask.
    """
    height, width = mask.shape
    rle = encode_mask(see_through(mask), alpha=True) if from_name == "units" else encode_mask(mask)
    result = {
        "id": rid or region_id(from_name, label, text),
        "from_name": from_name, "to_name": to_name, "type": "brushlabels",
        "original_width": int(width), "original_height": int(height), "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
    }
    if score is not None:
        result["score"] = float(score)
    if text:
        result["meta"] = {"text": [text]}
    return result


def choice(value: str, *, to_name: str, from_name: str = "assessment", score: float | None = None) -> dict:
    result = {"id": region_id(from_name, value), "from_name": from_name, "to_name": to_name, "type": "choices",
              "value": {"choices": [value]}}
    if score is not None:
        result["score"] = float(score)
    return result


def text_area(text: str, *, to_name: str, from_name: str = "report") -> dict:
    return {"id": region_id(from_name, text), "from_name": from_name, "to_name": to_name, "type": "textarea",
            "value": {"text": [text]}}


def assessment(score: float, operating_point: float, *, to_name: str, choices: list[str]) -> dict:
    """The image- (or patch-) level choice of the project's ``choices`` (positive, negative: the
    ``assessment`` labels of its config): the positive one when the score reaches the operating point."""
    positive, negative = choices
    return choice(positive if score >= operating_point else negative, to_name=to_name, score=score)


def unit_text(unit: int, *, iou: float | None = None, concept: str | None = None,
              activation: float | None = None, proposed: str | None = None) -> str:
    """The label shown with a unit's region: ``unit 17 · IoU 0.42 · spiculation``, or for an unlabelled unit with
    a pending proposal ``unit 17 · IoU 0.42 · unlabelled · proposed: spiculated (IoU 0.31 over 42 lesions)``."""
    parts = [f"unit {unit}"]
    if iou is not None:
        parts.append(f"IoU {iou:.2f}")
    if activation is not None:
        parts.append(f"max act. {activation:.2f}")
    parts.append(concept or "unlabelled")
    if proposed and not concept:
        parts.append(f"proposed: {proposed}")
    return " · ".join(parts)


def unit_region_id(unit: int, *extra: object) -> str:
    """Unit regions carry the unit in their id (``u17-...``), so the webhook knows which units a reader kept."""
    return f"u{int(unit)}-{region_id('unit', unit, *extra)[:6]}"


def unit_of_region(result: dict) -> int | None:
    """The unit a region answered by the backend stands for, or None."""
    rid = str(result.get("id", ""))
    if rid.startswith("u") and "-" in rid:
        head = rid[1:].split("-", 1)[0]
        if head.isdigit():
            return int(head)
    return None


# ----------------------------------------------------------------------------- the reader's regions
ROI_CONTROLS = ("roi", "roi_box")  # the ROI brush (API, submitted annotations) and the UI's smart rectangle


def check_results(results: Any, where: str) -> list[dict]:
    """``results`` as Label Studio sends them (a list of region objects, each ``value`` an object), else one
    :class:`RequestError` naming the first item that is not."""
    if results is None:
        return []
    if not isinstance(results, list):
        raise RequestError(f"{where} is not a list of regions", code="bad_result")
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise RequestError(f"{where}: item {i} is a {type(r).__name__}, not a region object", code="bad_result")
        if not isinstance(r.get("value", {}), dict):
            raise RequestError(f"{where}: the value of item {i} is not an object", code="bad_result")
    return results


def roi_regions(results: Sequence[dict] | None) -> list[dict]:
    """The ROI regions among ``results`` (the interactive context, or a submitted annotation): brush
    regions of ``roi`` and rectangles of ``roi_box``."""
    found = []
    for r in results or []:
        if not isinstance(r, dict):
            continue
        value = r.get("value") or {}
        name = r.get("from_name")
        labelled_roi = lc.ROI_LABEL in (value.get("brushlabels") or value.get("rectanglelabels") or [])
        if name in ROI_CONTROLS or (name is None and labelled_roi):
            found.append(r)
    return found


ECHO_PREFIX = "roi-"  # ids of the ROI boxes the backend sends back with its answer


def asked_rois(results: Sequence[dict] | None) -> list[dict]:
    """The ROI regions an interactive request asks about. Label Studio sends every ROI box of the
    annotation (the boxes echoed with earlier answers too); when a new box is among them, the question
    is that box alone ("draw another box to ask again"), else all of them."""
    regions = roi_regions(results)
    fresh = [r for r in regions if not str(r.get("id", "")).startswith(ECHO_PREFIX)]
    return fresh or regions


def echo_rois(regions: Sequence[dict], query_id: object) -> list[dict]:
    """The asked ROI boxes, to send back with the answer. Label Studio deletes the box a reader drew with
    the smart tool when its answer is accepted; the echoed copy (a plain region) stays in the annotation,
    so the ROI reaches the webhook on Submit. Brush ROIs (API clients) are not echoed."""
    echoed = []
    for i, r in enumerate(regions):
        if r.get("type") != "rectanglelabels" or str(r.get("id", "")).startswith(ECHO_PREFIX):
            continue
        value = {k: r["value"][k] for k in ("x", "y", "width", "height", "rotation") if k in (r.get("value") or {})}
        echoed.append({"id": f"{ECHO_PREFIX}{query_id}-{i}", "from_name": r.get("from_name", "roi_box"),
                       "to_name": r.get("to_name"), "type": "rectanglelabels",
                       "original_width": r.get("original_width"), "original_height": r.get("original_height"),
                       "image_rotation": r.get("image_rotation", 0),
                       "value": {**value, "rectanglelabels": [lc.ROI_LABEL]}})
    return echoed


def _rectangle_mask(value: dict, width: int, height: int) -> np.ndarray:
    """A rectangle region (percentages of the image, rotated by ``rotation`` degrees clockwise about its
    top-left corner, as Label Studio stores it) as a bool mask: the pixels whose centre lies inside."""
    try:
        x, y = float(value["x"]) * width / 100.0, float(value["y"]) * height / 100.0
        w, h = float(value["width"]) * width / 100.0, float(value["height"]) * height / 100.0
        angle = np.deg2rad(float(value.get("rotation") or 0.0))
    except (KeyError, TypeError, ValueError):
        raise RequestError("the ROI rectangle has no numeric x, y, width and height", code="malformed_roi") from None
    if not all(np.isfinite([x, y, w, h, angle])) or w < 0 or h < 0:
        raise RequestError("the ROI rectangle has a negative or non-finite size", code="malformed_roi")
    cos, sin = np.cos(angle), np.sin(angle)
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]]) @ np.array([[cos, sin], [-sin, cos]]) + [x, y]
    x0, y0 = np.floor(corners.min(axis=0)).astype(int)
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    mask = np.zeros((height, width), dtype=bool)
    if x1 <= x0 or y1 <= y0:
        return mask
    cy, cx = np.mgrid[y0:y1, x0:x1] + 0.5
    u = (cx - x) * cos + (cy - y) * sin      # the pixel centre in the rectangle's own axes
    v = -(cx - x) * sin + (cy - y) * cos
    mask[y0:y1, x0:x1] = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    return mask


def roi_mask(results: Sequence[dict] | None, width: int, height: int) -> np.ndarray:
    """The union of the ROI regions (brushes and rectangles) as a bool mask (height, width) of the displayed
    image.

    Raises :class:`RequestError` for a missing, malformed, mis-sized, outside-the-image or empty ROI.
    """
    regions = roi_regions(results)
    if not regions:
        raise RequestError("no ROI in the request: draw a box (or a brush region) labelled "
                           f"\"{lc.ROI_LABEL}\" on the image", code="no_roi")
    mask = np.zeros((height, width), dtype=bool)
    for r in regions:
        value = r.get("value") or {}
        ow, oh = r.get("original_width"), r.get("original_height")
        if ow is not None and oh is not None and (int(ow), int(oh)) != (width, height):
            raise RequestError(f"the ROI was drawn on a {ow} x {oh} image, but this task's image is "
                               f"{width} x {height}", code="roi_outside_image")
        if r.get("type") == "rectanglelabels" or "rectanglelabels" in value:
            mask |= _rectangle_mask(value, width, height)
            continue
        if value.get("format", "rle") != "rle" or "rle" not in value:
            raise RequestError("the ROI is not a brush region with an RLE mask", code="malformed_rle")
        try:
            mask |= decode_mask(value["rle"], width, height)
        except RleError as error:
            raise RequestError(f"malformed ROI: {error}", code="malformed_rle") from None
    if not mask.any():
        raise RequestError("the ROI is empty: draw a box over the region (or paint a few pixels with the ROI "
                           "brush)", code="empty_roi")
    return mask


def as_request_error(error: Exception) -> RequestError:
    """A core error (unknown image, bad query...) as a request error with the right status."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, RleError):
        return RequestError(str(error), code="malformed_rle")
    if isinstance(error, QueryError):
        text = str(error)
        code = "roi_outside_image" if "outside" in text else "empty_roi" if "empty" in text else "bad_query"
        return RequestError(text, code=code)
    name = type(error).__name__
    if name == "CatalogError":
        return RequestError(str(error), status=404, code="unknown_image")
    if name == "LabelConfigError":
        return RequestError(str(error), status=422, code="wrong_label_config")
    return RequestError(str(error), status=422, code=name)


__all__ = ["RequestError", "rectangle", "brush", "see_through", "SEE_THROUGH_ALPHA", "choice", "text_area",
           "assessment", "check_results", "unit_text", "unit_region_id", "unit_of_region", "ROI_CONTROLS", "ECHO_PREFIX", "roi_regions",
           "asked_rois", "echo_rois", "roi_mask", "as_request_error", "region_id"]
