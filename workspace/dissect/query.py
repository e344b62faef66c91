"""ROI queries: which units' masks align with a region a reader drew.

Definitions (masks, IoU, "aligned") are those of :mod:`workspace.dissect.dissection`. What this module adds
is speed: no unit's mask depends on the ROI, so :class:`PatchMasks` computes every unit's mask on a
patch ONCE (upsampled with the exact float32 op order of the definition, thresholded) and keeps it
bit-packed with its area; a query is then one intersection count per unit over the ROI's bounding
rows and words. Units whose native map never reaches the threshold (most units on most patches, as
the threshold is a 0.99 quantile) have an empty mask and are skipped: a bilinear value is a convex
combination of four map values, so it cannot exceed the map's max by more than a few float32
rounding steps (~1e-7 relative), and a unit is skipped only when ``max + margin <= T`` with a margin
of 1e-5 relative (with the strictly-above rule an all-zero map under ``T = 0`` is skipped too).

On the CPU the masks are numpy uint64 words and counts use ``np.bitwise_count``; on a GPU
(``device="cuda"``) they are torch bool tensors on the device. Both give the same integers.

Full mammograms (:class:`ImageMasks`, :func:`query_image`): the whole-mammogram read keeps per-patch
maps ``(N, units, h, w)`` and boxes ``[x, y, w, h]`` (normalised orientation); patches may overlap.
Each image pixel is OWNED by one patch: among the patches containing it, the one whose centre is
nearest (squared Euclidean distance from the pixel centre; ties to the lower patch index). On that
shared image grid, unit i's mask is the union over patches of (patch mask AND owned region), and for
an ROI ``A`` the IoU over the patches the ROI touches (the covering patches) is

    IoU_i = sum_p |A & M_i,p & own_p| / sum_p |(A | M_i,p) & own_p|

i.e. summed intersections over summed unions, which equals the IoU of the stitched masks with the
ROI restricted to the covering patches' owned regions. ROI pixels outside every patch are ignored
(counted in ``roi_pixels_outside``); an ROI with no pixel in any patch is a :class:`QueryError`.
Masks and maps come back in full-image coordinates.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from workspace.base.errors import QueryError
from workspace.dissect.dissection import DEFAULT_IOU_THRESHOLD, bilinear_weights, unit_masks, upsample_maps

SKIP_MARGIN = 1e-5          # relative margin of the empty-mask test (see the module docstring)
MASK_CHUNK_UNITS = 16       # units upsampled at once while building masks (16 x 512 x 512 float32 = 16 MB)


def _pack_rows(mask: np.ndarray) -> np.ndarray:
    """(..., H, W) bool -> (..., H, ceil(W / 64)) uint64, bit j of word k = column 64 k + j."""
    packed = np.packbits(mask, axis=-1, bitorder="little")
    pad = (-packed.shape[-1]) % 8
    if pad:
        packed = np.concatenate([packed, np.zeros((*packed.shape[:-1], pad), np.uint8)], axis=-1)
    return np.ascontiguousarray(packed).view(np.uint64)


def _unpack_rows(packed: np.ndarray, width: int) -> np.ndarray:
    return np.unpackbits(packed.view(np.uint8), axis=-1, count=width, bitorder="little").astype(bool)


def _roi_bounds(roi: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(roi.any(axis=1))
    cols = np.flatnonzero(roi.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


class PatchMasks:
    """Every unit's mask on one patch, computed once: bit-packed masks of the units whose mask is not
    empty, the area of every unit's mask, its max activation, and the native maps (for drawing).

    ``from_maps(maps (units, h, w), thresholds (units,), size)``; ``intersections(roi)`` counts
    ``|roi & M_i|`` for every unit; ``mask(i)`` / ``upsampled(i)`` give one unit's mask / map.
    """

    def __init__(self, maps: np.ndarray, thresholds: np.ndarray, size: int, areas: np.ndarray,
                 stored_units: np.ndarray, store: Any, device: torch.device):
        self.maps, self.thresholds, self.size = maps, thresholds, int(size)
        self.n_units = int(maps.shape[0])
        self.areas = areas                              # (units,) int64
        self.stored_units = stored_units                # (k,) units with a non-empty mask
        self._store = store                             # (k, size, words) uint64 or (k, size, size) bool tensor
        self.device = device
        self.max_activation = maps.reshape(self.n_units, -1).max(axis=1)
        self._row_of = np.full(self.n_units, -1, dtype=np.int64)
        self._row_of[stored_units] = np.arange(stored_units.size)

    @classmethod
    def from_maps(cls, maps: np.ndarray | torch.Tensor, thresholds: np.ndarray, size: int = 512,
                  device: str | torch.device | None = None, backend: str | None = None) -> PatchMasks:
        """Precompute the masks of one patch. maps: (units, h, w) any float dtype (float16 from a read
        is fine: it is widened to float32 exactly); thresholds: (units,) from the run. ``backend``:
        "numpy" (bit-packed words, the CPU default) or "torch" (bool tensors, the GPU default)."""
        if isinstance(maps, torch.Tensor):
            maps = maps.detach().cpu().numpy()
        maps = np.asarray(maps, dtype=np.float32)
        thresholds = np.asarray(thresholds, dtype=np.float32)
        if maps.ndim != 3:
            raise QueryError(f"unit maps must be (units, h, w), got shape {maps.shape}")
        if thresholds.shape != (maps.shape[0],):
            raise QueryError(f"{maps.shape[0]} unit maps but {thresholds.shape[0]} thresholds: the maps and the "
                             "run come from different layers or models")
        device = torch.device(device or "cpu")
        backend = backend or ("numpy" if device.type == "cpu" else "torch")
        if backend not in ("numpy", "torch"):
            raise QueryError(f"unknown mask backend {backend!r} (numpy or torch)")
        flat = maps.reshape(maps.shape[0], -1)
        margin = SKIP_MARGIN * (np.abs(flat).max(axis=1) + np.abs(thresholds))   # (units,)
        candidates = np.flatnonzero(flat.max(axis=1) + margin > thresholds)
        if backend == "numpy":
            areas, stored, store = _masks_numpy(maps, thresholds, margin, candidates, size)
        else:
            areas, stored, store = _masks_torch(maps, thresholds, candidates, size, device)
        return cls(maps, thresholds, size, areas, stored, store, device)


    @property
    def nbytes(self) -> int:
        """Bytes held by the masks (not the maps)."""
        if isinstance(self._store, torch.Tensor):
            return int(self._store.numel() * self._store.element_size())
        return int(self._store.nbytes)

    def check_roi(self, roi: np.ndarray) -> np.ndarray:
        roi = np.asarray(roi)
        if roi.shape != (self.size, self.size):
            raise QueryError(f"the ROI mask must be {self.size} x {self.size} (the patch), got {roi.shape}")
        roi = roi.astype(bool, copy=False)
        if not roi.any():
            raise QueryError("the ROI is empty: draw a region inside the patch")
        return roi

    def intersections(self, roi: np.ndarray) -> np.ndarray:
        """``|roi & M_i|`` for every unit (int64, (units,)); roi: (size, size) bool, not empty."""
        roi = self.check_roi(roi)
        out = np.zeros(self.n_units, dtype=np.int64)
        if self.stored_units.size == 0:
            return out
        r0, r1, c0, c1 = _roi_bounds(roi)
        if isinstance(self._store, torch.Tensor):
            sub = torch.from_numpy(np.ascontiguousarray(roi[r0:r1, c0:c1])).to(self.device)
            counts = (self._store[:, r0:r1, c0:c1] & sub).sum(dim=(1, 2))
            out[self.stored_units] = counts.cpu().numpy()
            return out
        w0, w1 = c0 // 64, -(-c1 // 64)
        packed_roi = _pack_rows(roi[r0:r1])[:, w0:w1]
        counts = np.empty(self.stored_units.size, dtype=np.int64)
        step = max(1, (1 << 17) // max(1, packed_roi.size))    # ~1 MB of words per step: stays in cache
        for s in range(0, self.stored_units.size, step):
            block = self._store[s:s + step, r0:r1, w0:w1] & packed_roi
            counts[s:s + step] = np.bitwise_count(block).sum(axis=(1, 2), dtype=np.int64)
        out[self.stored_units] = counts
        return out

    def mask(self, unit: int) -> np.ndarray:
        """(size, size) bool mask of one unit."""
        unit = self._unit(unit)
        row = self._row_of[unit]
        if row < 0:
            return np.zeros((self.size, self.size), dtype=bool)
        if isinstance(self._store, torch.Tensor):
            return self._store[row].cpu().numpy()
        return _unpack_rows(self._store[row], self.size)

    def upsampled(self, unit: int) -> np.ndarray:
        """(size, size) float32: one unit's map upsampled to the patch (what its mask thresholds)."""
        unit = self._unit(unit)
        return upsample_maps(self.maps[unit:unit + 1], self.size)[0]

    def _unit(self, unit: int) -> int:
        unit = int(unit)
        if not 0 <= unit < self.n_units:
            raise QueryError(f"no unit {unit}: this layer has units 0..{self.n_units - 1}")
        return unit


def _masks_torch(maps, thresholds, candidates, size, device):
    """Masks of the candidate units, whole patches at a time, as bool tensors on ``device``
    (:func:`workspace.dissect.dissection.unit_masks`, the definition itself)."""
    areas = np.zeros(maps.shape[0], dtype=np.int64)
    chunks, kept = [], []
    for start in range(0, candidates.size, MASK_CHUNK_UNITS):
        units = candidates[start:start + MASK_CHUNK_UNITS]
        mask = unit_masks(torch.from_numpy(maps[units]).to(device), thresholds[units], size)
        counts = mask.flatten(1).count_nonzero(dim=1).cpu().numpy()
        areas[units] = counts
        nonempty = counts > 0
        if nonempty.any():
            kept.append(units[nonempty])
            chunks.append(mask[torch.from_numpy(nonempty).to(device)])
    stored = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    store = torch.cat(chunks) if chunks else torch.zeros((0, size, size), dtype=torch.bool, device=device)
    return areas, stored, store


def _masks_numpy(maps, thresholds, margin, candidates, size):
    """Masks of the candidate units as packed uint64 rows, computing each unit's map only in the
    window of output pixels that have a near-threshold native cell among their four neighbours
    (every other pixel is provably not above the threshold). Same weights, same op order and the
    same strictly-above test as :func:`workspace.dissect.dissection.unit_masks`, so the masks are identical
    (``tests/test_query_exact.py`` checks it, the value equal to ``T`` included)."""
    _units, h, w = maps.shape
    r0, r1, h0, h1 = bilinear_weights(h, size)
    c0, c1, w0, w1 = bilinear_weights(w, size)
    words = -(-size // 64)
    areas = np.zeros(maps.shape[0], dtype=np.int64)
    kept, chunks = [], []
    block = np.zeros((MASK_CHUNK_UNITS, size, size), dtype=bool)
    block_units: list[int] = []

    def flush() -> None:
        if block_units:
            kept.append(np.array(block_units, dtype=np.int64))
            chunks.append(_pack_rows(block[:len(block_units)]))
            block[:len(block_units)] = False
            block_units.clear()

    for u in candidates:
        m = maps[u]
        hot = m + margin[u] > thresholds[u]
        rows, cols = np.flatnonzero(hot.any(axis=1)), np.flatnonzero(hot.any(axis=0))
        y_lo, y_hi = np.searchsorted(r1, rows[0], "left"), np.searchsorted(r0, rows[-1], "right")
        x_lo, x_hi = np.searchsorted(c1, cols[0], "left"), np.searchsorted(c0, cols[-1], "right")
        across = w0[x_lo:x_hi] * m[:, c0[x_lo:x_hi]] + w1[x_lo:x_hi] * m[:, c1[x_lo:x_hi]]
        window = (h0[y_lo:y_hi, None] * across[r0[y_lo:y_hi]]
                  + h1[y_lo:y_hi, None] * across[r1[y_lo:y_hi]]) > thresholds[u]   # MASK_RULE
        area = int(np.count_nonzero(window))
        areas[u] = area
        if area:
            block[len(block_units), y_lo:y_hi, x_lo:x_hi] = window
            block_units.append(int(u))
            if len(block_units) == MASK_CHUNK_UNITS:
                flush()
    flush()
    stored = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    store = np.concatenate(chunks) if chunks else np.zeros((0, size, words), dtype=np.uint64)
    return areas, stored, store


def _rank(iou: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    ranking = np.lexsort((np.arange(iou.size), -iou))      # IoU descending, ties to the lower unit
    aligned = ranking[iou[ranking] >= threshold]
    return ranking, aligned


@dataclass
class QueryResult:
    """The answer for one patch: IoU per unit and what follows from it.

    ``ranking``: units by IoU, best first (ties: lower unit first); ``aligned``: the units with
    ``IoU >= iou_threshold`` in ranking order; ``most_activated``: the unit with the highest max
    activation on the patch; ``most_aligned``: the best-ranked unit, None when no unit's mask touches
    the ROI (every IoU is 0). ``map_of(u)`` / ``mask_of(u)`` give a unit's upsampled map / mask.
    """

    iou: np.ndarray
    intersection: np.ndarray
    union: np.ndarray
    roi_area: int
    iou_threshold: float
    ranking: np.ndarray
    aligned: np.ndarray
    most_activated: int
    most_aligned: int | None
    masks: PatchMasks = field(repr=False)

    def map_of(self, unit: int) -> np.ndarray:
        return self.masks.upsampled(unit)

    def mask_of(self, unit: int) -> np.ndarray:
        return self.masks.mask(unit)

    def to_dict(self, top: int = 20) -> dict[str, Any]:
        return {"roi_area": self.roi_area, "iou_threshold": self.iou_threshold,
                "ranking": [[int(u), float(self.iou[u])] for u in self.ranking[:top]],
                "aligned": [int(u) for u in self.aligned], "most_activated": self.most_activated,
                "most_aligned": self.most_aligned}


def roi_from_box(box: tuple[float, float, float, float], shape: tuple[int, int]) -> np.ndarray:
    """A bool mask of ``shape`` (rows, cols) for a box [x, y, w, h] (pixel units; clipped to the
    shape). A box with no pixel inside is a :class:`QueryError`."""
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise QueryError(f"the ROI box {list(box)} is empty (width and height must be positive)")
    rows, cols = shape
    x0, y0 = max(0, int(np.floor(x))), max(0, int(np.floor(y)))
    x1, y1 = min(cols, int(np.ceil(x + w))), min(rows, int(np.ceil(y + h)))
    if x0 >= x1 or y0 >= y1:
        raise QueryError(f"the ROI box {list(box)} has no pixel inside the {cols} x {rows} area")
    roi = np.zeros(shape, dtype=bool)
    roi[y0:y1, x0:x1] = True
    return roi


def query_patch(patch_masks: PatchMasks, roi: np.ndarray, iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> QueryResult:
    """IoU of every unit's mask with the ROI (a (size, size) bool mask of the patch)."""
    roi = patch_masks.check_roi(roi)
    inter = patch_masks.intersections(roi)
    area = int(roi.sum())
    union = area + patch_masks.areas - inter
    iou = inter / union
    ranking, aligned = _rank(iou, iou_threshold)
    top = int(ranking[0])
    return QueryResult(iou, inter, union, area, float(iou_threshold), ranking, aligned,
                       int(np.argmax(patch_masks.max_activation)), top if iou[top] > 0 else None, patch_masks)


# ---------------------------------------------------------------------------------------------
# full mammograms
# ---------------------------------------------------------------------------------------------
@dataclass
class ImageQueryResult:
    """The answer for an ROI on a full mammogram (see the module docstring for the aggregation)."""

    iou: np.ndarray
    intersection: np.ndarray
    union: np.ndarray
    roi_area: int
    roi_pixels_outside: int
    iou_threshold: float
    ranking: np.ndarray
    aligned: np.ndarray
    most_activated: int
    most_aligned: int | None
    patches: list[int]                  # indices (into the read's boxes) of the covering patches
    image: ImageMasks = field(repr=False)

    @property
    def boxes(self) -> np.ndarray:
        return self.image.boxes[self.patches]

    def mask_of(self, unit: int) -> np.ndarray:
        """(rows, cols) bool: the unit's stitched mask over the covering patches' owned regions."""
        return self.image.stitched(unit, self.patches, maps=False)

    def map_of(self, unit: int) -> np.ndarray:
        """(rows, cols) float32: the unit's upsampled map over the covering patches (0 elsewhere)."""
        return self.image.stitched(unit, self.patches, maps=True)

    def to_dict(self, top: int = 20) -> dict[str, Any]:
        return {"roi_area": self.roi_area, "roi_pixels_outside": self.roi_pixels_outside,
                "iou_threshold": self.iou_threshold,
                "ranking": [[int(u), float(self.iou[u])] for u in self.ranking[:top]],
                "aligned": [int(u) for u in self.aligned], "most_activated": self.most_activated,
                "most_aligned": self.most_aligned, "patch_boxes": self.boxes.tolist()}


class ImageMasks:
    """Per-patch masks of a whole-mammogram read, built lazily (only for patches a query touches)
    and kept, with each patch's owned region and the mask areas inside it."""

    def __init__(self, boxes: np.ndarray, maps: np.ndarray, thresholds: np.ndarray,
                 image_shape: tuple[int, int], device: str | torch.device | None = None):
        self.boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        self.maps = maps                      # (N, units, h, w), float16 from a read: read per patch
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        self.shape = (int(image_shape[0]), int(image_shape[1]))
        self.device = device
        if len(self.boxes) == 0:
            raise QueryError("the read has no patches")
        if len(self.boxes) != len(maps):
            raise QueryError(f"{len(self.boxes)} patch boxes but {len(maps)} map sets in the read")
        if np.any(self.boxes[:, 2] != self.boxes[:, 3]) or len(np.unique(self.boxes[:, 2])) != 1:
            raise QueryError("the read's patches must be squares of one size")
        self.size = int(self.boxes[0, 2])
        self._patch: dict[int, PatchMasks] = {}
        self._own: dict[int, np.ndarray] = {}
        self._own_area: dict[int, np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the masks built so far and the patches' owned regions (not the maps)."""
        return (sum(pm.nbytes for pm in list(self._patch.values()))
                + sum(own.nbytes for own in list(self._own.values())))

    def patch(self, p: int) -> PatchMasks:
        if p not in self._patch:
            self._patch[p] = PatchMasks.from_maps(np.asarray(self.maps[p]), self.thresholds, self.size,
                                                  device=self.device)
        return self._patch[p]

    def owned(self, p: int) -> np.ndarray:
        """(size, size) bool, patch coordinates: the pixels of patch p's box that p owns (inside the image)."""
        if p in self._own:
            return self._own[p]
        x, y, s = (int(v) for v in self.boxes[p, :3])
        rows2 = 2 * np.arange(y, y + s, dtype=np.int64) + 1          # doubled pixel centres
        cols2 = 2 * np.arange(x, x + s, dtype=np.int64) + 1
        best = np.full((s, s), np.iinfo(np.int64).max, dtype=np.int64)
        owner = np.full((s, s), -1, dtype=np.int64)
        bx, by = self.boxes[:, 0], self.boxes[:, 1]
        overlapping = np.flatnonzero((bx < x + s) & (bx + s > x) & (by < y + s) & (by + s > y))
        for q in overlapping:             # ascending index: strict < keeps ties with the lower index
            qx, qy = int(self.boxes[q, 0]), int(self.boxes[q, 1])
            inside_r = (rows2 > 2 * qy) & (rows2 < 2 * (qy + s))
            inside_c = (cols2 > 2 * qx) & (cols2 < 2 * (qx + s))
            dy = (rows2 - (2 * qy + s)) ** 2
            dx = (cols2 - (2 * qx + s)) ** 2
            dist = np.where(inside_r[:, None] & inside_c[None, :], dy[:, None] + dx[None, :],
                            np.iinfo(np.int64).max)
            better = dist < best
            best = np.where(better, dist, best)
            owner = np.where(better, q, owner)
        own = owner == p
        own &= ((rows2 - 1) // 2 < self.shape[0])[:, None] & ((rows2 - 1) // 2 >= 0)[:, None]
        own &= ((cols2 - 1) // 2 < self.shape[1])[None, :] & ((cols2 - 1) // 2 >= 0)[None, :]
        self._own[p] = own
        return own

    def own_area(self, p: int) -> np.ndarray:
        """(units,) |M_i,p & own_p|."""
        if p not in self._own_area:
            own = self.owned(p)
            pm = self.patch(p)
            self._own_area[p] = pm.intersections(own) if own.any() else np.zeros(pm.n_units, np.int64)
        return self._own_area[p]

    def _window(self, p: int) -> tuple[slice, slice, slice, slice]:
        """Image slices and patch slices of patch p's box clipped to the image."""
        x, y, s = (int(v) for v in self.boxes[p, :3])
        iy0, iy1 = max(0, y), min(self.shape[0], y + s)
        ix0, ix1 = max(0, x), min(self.shape[1], x + s)
        return slice(iy0, iy1), slice(ix0, ix1), slice(iy0 - y, iy1 - y), slice(ix0 - x, ix1 - x)

    def roi_in_patch(self, roi: np.ndarray, p: int) -> np.ndarray:
        iy, ix, py, px = self._window(p)
        local = np.zeros((self.size, self.size), dtype=bool)
        local[py, px] = roi[iy, ix]
        return local & self.owned(p)

    def query(self, roi: np.ndarray, iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> ImageQueryResult:
        roi = np.asarray(roi)
        if roi.shape != self.shape:
            raise QueryError(f"the ROI mask must have the image's shape {self.shape}, got {roi.shape}")
        roi = roi.astype(bool, copy=False)
        if not roi.any():
            raise QueryError("the ROI is empty: draw a region on the image")
        r0, r1, c0, c1 = _roi_bounds(roi)
        bx, by, s = self.boxes[:, 0], self.boxes[:, 1], self.size
        near = np.flatnonzero((bx < c1) & (bx + s > c0) & (by < r1) & (by + s > r0))
        n_units = self.thresholds.size
        inter = np.zeros(n_units, dtype=np.int64)
        union = np.zeros(n_units, dtype=np.int64)
        covering, inside = [], 0
        for p in near:
            local = self.roi_in_patch(roi, int(p))
            area = int(local.sum())
            if area == 0:
                continue
            covering.append(int(p))
            inside += area
            i_p = self.patch(int(p)).intersections(local)
            inter += i_p
            union += area + self.own_area(int(p)) - i_p
        if not covering:
            raise QueryError("the ROI has no pixel inside any patch of the read (outside the imaged tissue?)")
        iou = inter / union
        ranking, aligned = _rank(iou, iou_threshold)
        top = int(ranking[0])
        peak = np.max([self.patch(p).max_activation for p in covering], axis=0)
        return ImageQueryResult(iou, inter, union, inside, int(roi.sum()) - inside, float(iou_threshold),
                                ranking, aligned, int(np.argmax(peak)), top if iou[top] > 0 else None,
                                covering, self)

    def stitched(self, unit: int, patches: list[int], *, maps: bool) -> np.ndarray:
        out = np.zeros(self.shape, dtype=np.float32 if maps else bool)
        for p in patches:
            pm = self.patch(p)
            local = pm.upsampled(unit) if maps else pm.mask(unit)
            own = self.owned(p)
            iy, ix, py, px = self._window(p)
            region = out[iy, ix]
            keep = own[py, px]
            region[keep] = local[py, px][keep]
        return out


_IMAGE_CACHE: OrderedDict[tuple, ImageMasks] = OrderedDict()
MASK_CACHE_MB = 1024   # the images' patch masks kept in memory, least recently asked dropped first


def mask_cache_bytes() -> int:
    """The memory the cached masks may hold: ``MAMMO_MASK_CACHE_MB`` (megabytes), else :data:`MASK_CACHE_MB`.
    What a fully built image holds: bench/RESULTS.md, "Concurrent readers" (`bench/bench_readers.py` prints it)."""
    raw = os.environ.get("MAMMO_MASK_CACHE_MB", "")
    try:
        mb = float(raw) if raw else MASK_CACHE_MB
    except ValueError as error:
        raise QueryError(f"MAMMO_MASK_CACHE_MB={raw!r}: expected a number of megabytes") from error
    return int(mb * 2**20)


def still_cached(masks: ImageMasks) -> bool:
    """Whether these masks are still in the cache (a background warm-up stops once they are dropped)."""
    return any(m is masks for m in list(_IMAGE_CACHE.values()))


def _trim_cache() -> None:
    """Drop the least recently asked images until the rest fit the budget (the newest always stays)."""
    budget = mask_cache_bytes()
    total = sum(m.nbytes for m in _IMAGE_CACHE.values())
    while len(_IMAGE_CACHE) > 1 and total > budget:
        _key, dropped = _IMAGE_CACHE.popitem(last=False)
        total -= dropped.nbytes


def image_masks_for(ws: Any, image_id: str, loaded: Any, run: Any, *, read: Any = None) -> ImageMasks:
    """The (cached) per-patch masks of a whole-mammogram read under a run's thresholds. Reuses the
    maps the read kept (``models.inference.read_mammogram(..., keep_maps=True)``): no second forward.
    A given ``read`` reuses the cached masks when its patch grid is the cached one (same image, model
    and grid: same maps), so a caller that already holds the read does not rebuild them."""
    if run.model_digest != loaded.digest:
        raise QueryError(f"run {run.run_id} dissected model {run.model_digest}, not the loaded model {loaded.digest}")
    key = (str(ws.root), image_id, loaded.digest, run.run_id)
    cached = _IMAGE_CACHE.get(key)
    if cached is not None and (read is None or np.array_equal(cached.boxes, np.asarray(read.boxes).reshape(-1, 4))):
        _IMAGE_CACHE.move_to_end(key)
        _trim_cache()   # masks grow after they are cached (lazily, and by warm-ups)
        return cached
    if read is None:
        from models.inference import read_mammogram

        read = read_mammogram(ws, image_id, loaded, keep_maps=True)
    if read.maps is None:
        raise QueryError(f"the read of {image_id} kept no feature maps (read it again with keep_maps=True)")
    if read.layer != run.layer:
        raise QueryError(f"run {run.run_id} dissected layer {run.layer}, but the read kept maps of {read.layer}")
    masks = ImageMasks(read.boxes, read.maps, run.thresholds, tuple(read.shape),
                       device=getattr(loaded, "device", None))
    _IMAGE_CACHE[key] = masks
    _trim_cache()
    return masks


def query_image(ws: Any, image_id: str, roi_full: np.ndarray, loaded: Any, run: Any, *,
                iou_threshold: float = DEFAULT_IOU_THRESHOLD, read: Any = None) -> ImageQueryResult:
    """An ROI (bool (rows, cols), normalised orientation) on a full mammogram against a run."""
    return image_masks_for(ws, image_id, loaded, run, read=read).query(roi_full, iou_threshold)


def patch_maps(loaded: Any, x01: torch.Tensor, layer: str | None = None) -> np.ndarray:
    """One forward pass of one patch ((1, 1, S, S) or (S, S) in [0, 1]); its (units, h, w) float32 maps."""
    from models.features import capture

    x = torch.as_tensor(x01, dtype=torch.float32)
    while x.dim() < 4:
        x = x.unsqueeze(0)
    with torch.inference_mode(), capture(loaded.model, layer or loaded.dissected_layer) as tap:
        loaded.model(loaded.preprocess(x))
    return tap.output[0].float().cpu().numpy()


__all__ = ["PatchMasks", "QueryResult", "ImageMasks", "ImageQueryResult", "query_patch", "query_image",
           "image_masks_for", "roi_from_box", "patch_maps"]
