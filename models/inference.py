"""Reading a whole mammogram with a patch classifier, as in the paper.

The full-resolution image (raw intensities in [0, 1], normalised orientation: chest wall on the left)
is cut into a grid of ``size x size`` patches (non-overlapping by default; ``stride`` < size overlaps;
when the image is not a multiple of the stride a last row/column of patches is aligned with the image's
far edge, so the whole breast is covered). Patches holding less than ``min_tissue`` breast foreground
are skipped. The rest are scored in batches; a patch is *suspicious* when P(possibly malignant) reaches
the checkpoint's operating point (chosen on validation). The image score is the highest patch score.

The dissected layer's maps of each patch are kept (float16, ``(N, units, h, w)``) so ROI queries need
no second forward pass. A read is cached per (image, model digest, stride) under ``ws.reads_dir``:
``<digest>/<layer>/<image_id>[__s<stride>].npz`` (boxes, scores, metadata) and ``...maps.npy`` (memory-mapped
on load), and recorded in the catalog table ``image_reads``. Each read carries the verdict of the domain
check (:mod:`workspace.data.domain`) of its image against the model's training domain (``read.domain``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import LoadedModel, register_model
from models.features import capture
from workspace.base.catalog import get_image, open_catalog
from workspace.base.config import Workspace
from workspace.base.errors import CatalogError, MammoError, ModelError
from workspace.base.progress import progress
from workspace.base.schema import utc_now
from workspace.data.domain import DomainVerdict, domain_of
from workspace.data.ingest import stored_path
from workspace.data.patches import DEFAULT_MIN_TISSUE, tissue_grid  # the read grid is a patch rule

DEFAULT_BATCH = 8
CACHE_VERSION = 1


def image_score_of(patch_scores: Any) -> float:
    """The image score from its patch scores: the highest one (0.0 for an image with no tissue patch)."""
    scores = np.asarray(patch_scores)
    return float(scores.max()) if scores.size else 0.0


@dataclass
class MammogramRead:
    """One image read by one model. Boxes are [x, y, w, h] in normalised orientation (full resolution)."""

    image_id: str
    model_digest: str
    layer: str
    shape: tuple[int, int]  # (rows, cols) of the image
    size: int
    stride: int
    boxes: np.ndarray  # (N, 4) int64
    scores: np.ndarray  # (N,) float32, the score: P(positive class), P(possibly malignant) for ours
    maps: np.ndarray | None  # (N, units, h, w) float16 (memory-mapped when read from the cache), or None
    operating_point: float
    cache_path: Path
    cached: bool
    seconds: float
    domain: DomainVerdict | None = None  # the image against the reading model's training domain
    # scores with groups of units silenced, {(sorted units, patch index or None): scores}: models.ablation's cache
    silenced: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def image_score(self) -> float:
        return image_score_of(self.scores)

    @property
    def suspicious(self) -> np.ndarray:
        """Indices of the patches at or above the operating point, highest score first."""
        idx = np.flatnonzero(self.scores >= self.operating_point)
        return idx[np.argsort(-self.scores[idx], kind="stable")]

    def index_of(self, box: Any) -> int | None:
        """The index of the patch with this [x, y, w, h] box, or None."""
        boxes = np.asarray(self.boxes)
        found = np.flatnonzero((boxes == np.asarray(box, dtype=boxes.dtype)[None, :]).all(axis=1))
        return int(found[0]) if len(found) else None

    def patches_covering(self, x: int, y: int) -> np.ndarray:
        """Indices of the patches whose box contains the point (x, y)."""
        b = self.boxes
        return np.flatnonzero((b[:, 0] <= x) & (x < b[:, 0] + b[:, 2]) & (b[:, 1] <= y) & (y < b[:, 1] + b[:, 3]))


def _cache_paths(ws: Workspace, image_id: str, digest: str, layer: str, stride: int,
                 size: int) -> tuple[Path, Path]:
    suffix = "" if stride == size else f"__s{stride}"
    base = ws.reads_dir / digest / layer / f"{image_id}{suffix}"  # the maps are the layer's: one read per layer
    return base.with_name(base.name + ".npz"), base.with_name(base.name + ".maps.npy")


def _load_cached(npz_path: Path, maps_path: Path, keep_maps: bool, min_tissue: float) -> dict | None:
    if not npz_path.is_file():
        return None
    try:
        with np.load(npz_path) as f:
            meta = json.loads(str(f["meta"]))
            boxes, scores = f["boxes"], f["scores"]
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache entry is simply recomputed
    if meta.get("version") != CACHE_VERSION or meta.get("min_tissue") != min_tissue:
        return None
    maps = None
    if keep_maps:
        if not maps_path.is_file():
            return None
        maps = np.load(maps_path, mmap_mode="r")
        if maps.shape[0] != len(scores):
            return None
    return {"meta": meta, "boxes": boxes, "scores": scores, "maps": maps}


def _foreground(ws: Workspace, row: dict, pixels: np.ndarray) -> np.ndarray:
    """The catalog's breast mask; computed from the pixels when the PNG is missing."""
    from workspace.data import dicom_io, ingest

    if row.get("foreground_path"):
        try:
            return ingest.load_foreground(ws, row)
        except (CatalogError, OSError, ValueError):
            pass
    small = dicom_io.foreground_mask(np.clip(pixels * 255.0, 0, 255))
    return dicom_io.upsample_mask(small, *pixels.shape)


def _load_pixels(ws: Workspace, row: dict) -> np.ndarray:
    from workspace.data import ingest

    try:
        return ingest.load_model_pixels(ws, row)
    except MammoError:
        raise
    except Exception as error:  # noqa: BLE001 - any other failure to decode is "unreadable"
        raise MammoError(f"image {row['image_id']}: cannot read its pixels ({type(error).__name__}: {error})") \
            from None


def _atomic_npz(path: Path, **arrays: Any) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


@torch.inference_mode()
def score_grid(loaded: LoadedModel, pixels: np.ndarray, boxes: np.ndarray, *, keep_maps: bool = True,
               batch_size: int = DEFAULT_BATCH, desc: str = "") -> tuple[np.ndarray, np.ndarray | None]:
    """Scores (N,) and optionally the dissected layer's maps (N, units, h, w) float16 for ``boxes``."""
    scores = np.empty(len(boxes), dtype=np.float32)
    maps: np.ndarray | None = None
    bar = progress(total=len(boxes), desc=desc or "patches", unit="patch", leave=False)
    with capture(loaded.model, loaded.dissected_layer) as tap:
        for start in range(0, len(boxes), batch_size):
            chunk = boxes[start:start + batch_size]
            x = np.stack([pixels[y:y + h, x0:x0 + w] for x0, y, w, h in chunk])[:, None]
            logits = loaded.model(loaded.preprocess(torch.from_numpy(np.ascontiguousarray(x))))
            scores[start:start + len(chunk)] = loaded.positive_probability(logits).cpu().numpy()
            if keep_maps:
                fmap = tap.output.to(torch.float16).cpu().contiguous().numpy()
                if maps is None:
                    maps = np.empty((len(boxes), *fmap.shape[1:]), dtype=np.float16)
                maps[start:start + len(chunk)] = fmap
            bar.update(len(chunk))
    bar.close()
    return scores, maps


def read_mammogram(ws: Workspace, image_id: str, loaded: LoadedModel, *, stride: int | None = None,
                   keep_maps: bool = True, min_tissue: float = DEFAULT_MIN_TISSUE,
                   batch_size: int = DEFAULT_BATCH, db: Any = None, record: bool = True) -> MammogramRead:
    """Read one catalog image (cached per image and model; a second call only loads the cache).
    ``record=False`` leaves the catalog to the caller (:func:`record_read`; a Ray worker's driver)."""
    started = time.perf_counter()
    db = db if db is not None else open_catalog(ws)
    row = get_image(db, image_id)  # CatalogError for an unknown id
    size = loaded.input_size
    stride = int(stride or size)
    if stride <= 0 or stride > size:
        raise ModelError(f"stride must be between 1 and the patch size {size}, got {stride}")
    rows, cols = int(row["rows"]), int(row["cols"])
    if rows < size or cols < size:
        raise ModelError(f"image {image_id} is {rows} x {cols} pixels, smaller than the model's "
                         f"{size} x {size} patch")
    npz_path, maps_path = _cache_paths(ws, image_id, loaded.digest, loaded.dissected_layer, stride, size)
    hit = _load_cached(npz_path, maps_path, keep_maps, min_tissue)
    profile = loaded.meta.get("training_domain")
    if hit is not None:
        return MammogramRead(image_id=image_id, model_digest=loaded.digest, layer=hit["meta"]["layer"],
                             shape=(rows, cols), size=size, stride=stride, boxes=hit["boxes"],
                             scores=hit["scores"], maps=hit["maps"],
                             operating_point=float(hit["meta"]["operating_point"]), cache_path=npz_path,
                             cached=True, seconds=time.perf_counter() - started,
                             domain=domain_of(ws, row, profile, db=db))

    pixels = _load_pixels(ws, row)
    foreground = _foreground(ws, row, pixels)
    domain = domain_of(ws, row, profile, db=db, pixels=pixels, foreground=foreground)
    boxes = tissue_grid(foreground, size, stride, min_tissue)
    scores, maps = score_grid(loaded, pixels, boxes, keep_maps=keep_maps, batch_size=batch_size, desc=image_id)
    if keep_maps and maps is None:  # no tissue patch: an empty map array of the right rank
        maps = np.zeros((0, 0, 0, 0), dtype=np.float16)
    meta = {"version": CACHE_VERSION, "image_id": image_id, "model_digest": loaded.digest,
            "layer": loaded.dissected_layer, "operating_point": loaded.operating_point, "stride": stride,
            "size": size, "min_tissue": min_tissue, "shape": [rows, cols], "created_at": utc_now()}
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    if keep_maps:
        _atomic_npy(maps_path, maps)
    _atomic_npz(npz_path, boxes=boxes, scores=scores, meta=np.array(json.dumps(meta)))
    read = MammogramRead(image_id=image_id, model_digest=loaded.digest, layer=loaded.dissected_layer,
                         shape=(rows, cols), size=size, stride=stride, boxes=boxes, scores=scores, maps=maps,
                         operating_point=loaded.operating_point, cache_path=npz_path, cached=False,
                         seconds=time.perf_counter() - started, domain=domain)
    if record:
        record_read(ws, db, read, loaded, meta["created_at"])
    return read


def record_read(ws: Workspace, db: Any, read: MammogramRead, loaded: LoadedModel, created_at: str | None = None) -> None:
    """The catalog's row of a fresh read (``image_reads``), its model registered."""
    register_model(db, loaded)
    db["image_reads"].upsert({
        "image_id": read.image_id, "model_digest": loaded.digest, "score": read.image_score,
        "n_patches": int(len(read.boxes)), "n_suspicious": int(len(read.suspicious)),
        "operating_point": read.operating_point,
        "cache_path": stored_path(ws, read.cache_path),
        "created_at": created_at or utc_now(),
    }, pk=("image_id", "model_digest"))


@dataclass
class ReadSummary:
    reads: list[MammogramRead]
    errors: list[tuple[str, str]]  # (image_id, message)


def read_many(ws: Workspace, image_ids: list[str], loaded: LoadedModel, **options: Any) -> ReadSummary:
    """Read several images; a bad one is reported in ``errors`` and the rest go on."""
    db = open_catalog(ws)
    reads, errors = [], []
    for image_id in progress(image_ids, desc="reading mammograms", unit="image"):
        try:
            reads.append(read_mammogram(ws, image_id, loaded, db=db, **options))
        except MammoError as error:
            errors.append((image_id, str(error)))
    return ReadSummary(reads=reads, errors=errors)


__all__ = ["MammogramRead", "ReadSummary", "image_score_of", "score_grid", "read_mammogram", "record_read",
           "read_many"]
