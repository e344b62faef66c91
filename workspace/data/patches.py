"""The paper's patch data set: lesion patches inside annotated regions, normal patches from tissue.

Recipe (Lu & Perer, following the data they used):

- **Lesion patches** (label 1) come from the lesions of label-1 images (BI-RADS 0). Candidate
  ``size x size`` patches lie on a grid of step ``step`` anchored on the lesion's centre; a candidate
  is kept when it is "inside" the lesion region by the rule ``inside``:

  - ``"centre"`` (default): the patch centre lies in the region;
  - ``"all"``: the whole patch lies in the region;
  - ``"fraction:F"``: at least a fraction ``F`` of the patch area lies in the region.

  A region too small for any candidate still gets one patch centred on it. Where an image has
  lesions from an annotated copy (``source="annotated_copy"``: the white ellipses, the paper's path)
  only those are used; otherwise every lesion that is not benign (masks, boxes, polygons, circles,
  ellipses from importers).
- **Normal patches** (label 0) come from label-0 images (BI-RADS 1/2): grid positions (step ``step``)
  that touch no lesion that is not benign and pass the rule ``normal``:

  - ``"centre:F"`` (default ``centre:0.25``): the patch centre lies in the breast foreground (the
    rule lesion patches use by default) and at least a fraction ``F`` of the patch is foreground;
  - ``"centre"``: the same with ``F = 0``;
  - ``"all"``: the whole patch lies in the breast foreground (the original recipe, "normal patches
    from all-tissue areas").

  Why not ``all`` by default: lesion patches follow their lesion, so those of lesions near the skin
  line reach into the dark background past it, while ``all`` never draws a normal patch there. A
  model trained on that set learned the shortcut "background in the patch => lesion" and flagged the
  skin line of normal mammograms as suspicious (models/README.md, "History", measured with
  ``bench/check_shortcut.py``). Drawing normal patches by the same centre rule gives both classes a
  like spread of tissue fractions, so the skin line is no cue (``tests/test_patches.py`` checks it).
  The minimum 0.25 only drops patches that are mostly background (a centre just inside a sharp
  corner of the mask).

  Benign findings (e.g. benign calcifications) may lie inside normal patches on purpose: they are
  part of the normal class, so "any blob" is not a cue. ``ceil(P / N)`` are drawn per image
  (``P`` lesion patches, ``N`` normal images), then ``P`` are drawn uniformly from that pool.
- Each patch takes its image's split (patient-level, from the catalog).

Coordinates of patches are NORMALISED (chest wall left); lesion geometry is mapped with
:func:`workspace.data.dicom_io.to_normalised`. Pixels live in one uint16 memmap
``patches/<name>/pixels.u16`` of shape (N, size, size) holding ``round(model_pixels * 65535)``; row
``i`` is the patch whose ``array_index`` is ``i``. Thumbnails (8-bit windowed, ``size`` pixels) are
``patches/<name>/thumbs/<patch_id>.png``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np

from workspace.base.config import Workspace
from workspace.base.errors import CatalogError, MammoError
from workspace.base.progress import progress
from workspace.base.schema import utc_now

BENIGN = ("benign", "benign_without_callback")
DEFAULT_MIN_TISSUE = 0.1
DEFAULT_BATCH_SIZE = 8   # patches per forward pass (dissection, proposals; Ray shards are cut on its multiples)
"""A read grid's patch holds at least this fraction of foreground (:func:`tissue_grid`)."""
UNLABELLED = -1
"""``patches.label`` of a patch from an unlabelled image (:func:`build_tissue_patch_set`): neither lesion (1)
nor normal (0); such a set is for dissection, not for training."""


class PatchError(MammoError):
    """A patch-set request that cannot be met (bad rule, nothing to extract, unknown set)."""


# -- the "inside" rule ---------------------------------------------------------------------------

@dataclass(frozen=True)
class InsideRule:
    mode: str              # centre | all | fraction
    fraction: float = 0.0

    @classmethod
    def parse(cls, text: str) -> InsideRule:
        text = (text or "centre").strip().lower()
        if text in ("centre", "center"):
            return cls("centre")
        if text == "all":
            return cls("all")
        if text.startswith("fraction:"):
            try:
                f = float(text.split(":", 1)[1])
            except ValueError:
                f = -1.0
            if 0.0 < f <= 1.0:
                return cls("fraction", f)
        raise PatchError(f"unknown inside rule {text!r}: use centre, all or fraction:F with 0 < F <= 1")

    def __str__(self) -> str:
        return f"fraction:{self.fraction:g}" if self.mode == "fraction" else self.mode


DEFAULT_NORMAL_RULE = "centre:0.25"


@dataclass(frozen=True)
class NormalRule:
    """Where a normal patch may lie: ``centre[:F]`` (centre in the foreground, tissue >= F) or ``all``."""

    mode: str              # centre | all
    min_tissue: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> NormalRule:
        text = (text or DEFAULT_NORMAL_RULE).strip().lower()
        if text == "all":
            return cls("all", 1.0)
        head, _, tail = text.partition(":")
        if head in ("centre", "center"):
            if not tail:
                return cls("centre", 0.0)
            try:
                f = float(tail)
            except ValueError:
                f = -1.0
            if 0.0 <= f <= 1.0:
                return cls("centre", f)
        raise PatchError(f"unknown normal rule {text!r}: use centre, centre:F with 0 <= F <= 1, or all")

    def __str__(self) -> str:
        return "all" if self.mode == "all" else f"centre:{self.min_tissue:g}"


# -- lesion regions in normalised coordinates ------------------------------------------------------

@dataclass
class Region:
    """A lesion rasterised in NORMALISED full-resolution pixels: a bool crop with its top-left."""

    lesion_id: int
    x0: int
    y0: int
    mask: np.ndarray
    centre: tuple[float, float]     # continuous coordinates

    @property
    def box(self) -> tuple[int, int, int, int]:
        h, w = self.mask.shape
        return self.x0, self.y0, self.x0 + w, self.y0 + h

    def area_in(self, x: int, y: int, size: int) -> int:
        """Pixels of the region inside the patch with top-left (x, y)."""
        x0, y0, x1, y1 = self.box
        ix0, iy0, ix1, iy1 = max(x, x0), max(y, y0), min(x + size, x1), min(y + size, y1)
        if ix0 >= ix1 or iy0 >= iy1:
            return 0
        return int(self.mask[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0].sum())

    def contains(self, px: float, py: float) -> bool:
        c, r = int(math.floor(px)) - self.x0, int(math.floor(py)) - self.y0
        return 0 <= r < self.mask.shape[0] and 0 <= c < self.mask.shape[1] and bool(self.mask[r, c])


def _grid(x0: float, x1: float, y0: float, y1: float):
    ys, xs = np.mgrid[int(math.floor(y0)):int(math.ceil(y1)), int(math.floor(x0)):int(math.ceil(x1))]
    return int(math.floor(x0)), int(math.floor(y0)), xs + 0.5, ys + 0.5


def lesion_region(ws: Workspace, image_row: dict, lesion: dict) -> Region:
    """Rasterise one catalog lesion (geometry in ORIGINAL coordinates) in normalised coordinates."""
    from PIL import Image

    from workspace.data.dicom_io import flip_array, to_normalised
    from workspace.data.ingest import resolve_path

    rows, cols = int(image_row["rows"]), int(image_row["cols"])
    gtype = lesion["geometry_type"]
    geometry = lesion["geometry"]
    if isinstance(geometry, str):
        geometry = json.loads(geometry)
    if gtype == "mask":
        if not lesion.get("mask_path"):
            raise CatalogError(f"lesion {lesion['lesion_id']}: mask geometry without mask_path")
        full = np.asarray(Image.open(resolve_path(ws, lesion["mask_path"]))) > 0
        if full.ndim == 3:
            full = full.any(axis=2)
        if full.shape != (rows, cols):  # a mask at another resolution: nearest neighbour to full size
            from workspace.data.dicom_io import upsample_mask

            full = upsample_mask(full, rows, cols)
        full = flip_array(full, bool(image_row["flip_horizontal"]), bool(image_row["flip_vertical"]))
        ys, xs = np.nonzero(full)
        if len(xs) == 0:
            raise CatalogError(f"lesion {lesion['lesion_id']}: empty mask {lesion['mask_path']}")
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        crop = full[y0:y1, x0:x1].copy()
        return Region(lesion["lesion_id"], int(x0), int(y0), crop, (float(xs.mean() + 0.5), float(ys.mean() + 0.5)))
    g = to_normalised(gtype, geometry, image_row)
    if gtype == "ellipse":
        cx, cy, rx, ry = g["cx"], g["cy"], g["rx"], g["ry"]
        a = math.radians(float(g.get("angle", 0.0)))
        ext = max(rx, ry)
        x0, y0, xs, ys = _grid(cx - ext, cx + ext + 1, cy - ext, cy + ext + 1)
        u = (xs - cx) * math.cos(a) + (ys - cy) * math.sin(a)
        v = -(xs - cx) * math.sin(a) + (ys - cy) * math.cos(a)
        mask = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
        centre = (cx, cy)
    elif gtype == "circle":
        cx, cy, r = g["cx"], g["cy"], g["r"]
        x0, y0, xs, ys = _grid(cx - r, cx + r + 1, cy - r, cy + r + 1)
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
        centre = (cx, cy)
    elif gtype == "box":
        bx, by, bw, bh = g
        x0, y0, xs, ys = _grid(bx, bx + bw, by, by + bh)
        mask = (xs >= bx) & (xs <= bx + bw) & (ys >= by) & (ys <= by + bh)
        centre = (bx + bw / 2, by + bh / 2)
    elif gtype == "polygon":
        from skimage.draw import polygon as fill_polygon

        pts = np.asarray(g, dtype=float)
        x0, y0 = int(math.floor(pts[:, 0].min())), int(math.floor(pts[:, 1].min()))
        w = int(math.ceil(pts[:, 0].max())) - x0 + 1
        h = int(math.ceil(pts[:, 1].max())) - y0 + 1
        mask = np.zeros((h, w), bool)
        rr, cc = fill_polygon(pts[:, 1] - y0 - 0.5, pts[:, 0] - x0 - 0.5, (h, w))
        mask[rr, cc] = True
        centre = (float(pts[:, 0].mean()), float(pts[:, 1].mean()))
    elif gtype == "point":
        px, py = g
        x0, y0 = int(math.floor(px)), int(math.floor(py))
        mask = np.ones((1, 1), bool)
        centre = (float(px), float(py))
    else:
        raise CatalogError(f"lesion {lesion['lesion_id']}: unknown geometry type {gtype!r}")
    # clip the crop to the image
    h, w = mask.shape
    cx0, cy0 = max(0, -x0), max(0, -y0)
    cx1, cy1 = min(w, cols - x0), min(h, rows - y0)
    if cx0 >= cx1 or cy0 >= cy1 or not mask[cy0:cy1, cx0:cx1].any():
        raise CatalogError(f"lesion {lesion['lesion_id']}: region lies outside the image")
    return Region(lesion["lesion_id"], x0 + cx0, y0 + cy0, np.ascontiguousarray(mask[cy0:cy1, cx0:cx1]),
                  (float(centre[0]), float(centre[1])))


def lesion_patch_positions(region: Region, rows: int, cols: int, size: int, step: int,
                           rule: InsideRule) -> list[tuple[int, int]]:
    """Top-left corners (x, y) of the lesion's patches: grid of ``step`` anchored on its centre."""
    cx, cy = region.centre
    bx0, by0, bx1, by1 = region.box
    ax, ay = int(round(cx - size / 2)), int(round(cy - size / 2))
    # grid offsets so that the patch centres cover the region's box
    nx0 = int(math.floor((bx0 - size / 2 - ax) / step)) - 1
    nx1 = int(math.ceil((bx1 - size / 2 - ax) / step)) + 1
    ny0 = int(math.floor((by0 - size / 2 - ay) / step)) - 1
    ny1 = int(math.ceil((by1 - size / 2 - ay) / step)) + 1
    chosen: list[tuple[int, int]] = []
    for j in range(ny0, ny1 + 1):
        for i in range(nx0, nx1 + 1):
            x, y = ax + i * step, ay + j * step
            if rule.mode == "centre":
                ok = region.contains(x + size / 2, y + size / 2)
            else:
                inside = region.area_in(x, y, size)
                ok = inside == size * size if rule.mode == "all" else inside >= rule.fraction * size * size
            if ok:
                chosen.append((x, y))
    if not chosen:
        chosen = [(ax, ay)]
    out = []
    for x, y in chosen:  # keep patches on the image
        p = (min(max(x, 0), cols - size), min(max(y, 0), rows - size))
        if p not in out:
            out.append(p)
    return out


def tissue_fraction(foreground: np.ndarray, x: int, y: int, size: int) -> float:
    """Fraction of the ``size x size`` patch with top-left (x, y) that is breast foreground."""
    return float(foreground[y:y + size, x:x + size].mean())


def normal_patch_positions(foreground: np.ndarray, size: int, step: int, avoid: list[Region],
                           rule: NormalRule | None = None) -> list[tuple[int, int]]:
    """Grid positions (step ``step`` from the top-left corner) that pass ``rule`` and touch none of ``avoid``.

    ``rule`` defaults to :data:`DEFAULT_NORMAL_RULE`; see the module docstring for why.
    """
    rule = rule or NormalRule.parse(None)
    rows, cols = foreground.shape
    if rows < size or cols < size:
        return []
    # summed-area table: the foreground pixels of any patch in O(1)
    table = np.zeros((rows + 1, cols + 1), np.int64)
    np.cumsum(np.cumsum(foreground, axis=0, dtype=np.int64), axis=1, out=table[1:, 1:])
    need = size * size if rule.mode == "all" else rule.min_tissue * size * size
    half = size // 2
    out = []
    for y in range(0, rows - size + 1, step):
        for x in range(0, cols - size + 1, step):
            if rule.mode == "centre" and not foreground[y + half, x + half]:
                continue
            tissue = table[y + size, x + size] - table[y, x + size] - table[y + size, x] + table[y, x]
            if tissue < need:
                continue
            if all(r.area_in(x, y, size) == 0 for r in avoid):
                out.append((x, y))
    return out


# -- building a set ------------------------------------------------------------------------------

def _lesions_for_patches(lesions: list[dict]) -> list[dict]:
    annotated = [le for le in lesions if le["source"] == "annotated_copy"]
    if annotated:
        return annotated
    return [le for le in lesions if le["pathology"] not in BENIGN]


def grid_positions(length: int, size: int, stride: int) -> list[int]:
    """Patch starts along one axis: every ``stride``, plus one flush with the far edge if needed."""
    starts = list(range(0, length - size + 1, stride))
    if starts and starts[-1] + size < length:
        starts.append(length - size)
    return starts


def tissue_grid(foreground: np.ndarray, size: int, stride: int, min_tissue: float) -> np.ndarray:
    """(N, 4) [x, y, w, h] boxes of the grid whose foreground fraction is at least ``min_tissue``."""
    rows, cols = foreground.shape
    integral = np.zeros((rows + 1, cols + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(foreground, axis=0, dtype=np.int64), axis=1)
    boxes = []
    for y in grid_positions(rows, size, stride):
        for x in grid_positions(cols, size, stride):
            inside = (integral[y + size, x + size] - integral[y, x + size] - integral[y + size, x]
                      + integral[y, x])
            if inside >= min_tissue * size * size:
                boxes.append((x, y, size, size))
    return np.array(boxes, dtype=np.int64).reshape(-1, 4)


def build_patch_set(ws: Workspace, name: str = "default", *, size: int = 512, step: int = 256,
                    inside: str = "centre", normal: str = DEFAULT_NORMAL_RULE, seed: int = 0,
                    dataset: str | None = None) -> dict[str, Any]:
    """Build (or rebuild) patch set ``name`` from the catalog; returns a summary dict.

    ``dataset`` limits the images used (default: all). Raises :class:`PatchError` when there are no
    lesion patches or no normal images to draw from. Per-image problems (an unreadable file, a lesion
    outside its image) are collected in the summary's ``problems`` and the build goes on.
    """
    from workspace.base.catalog import lesions_of, open_catalog
    from workspace.data.ingest import load_foreground

    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise PatchError(f"bad patch set name {name!r}")
    if size < 8 or step < 1:
        raise PatchError(f"patch size must be >= 8 and step >= 1, got size {size}, step {step}")
    rule = InsideRule.parse(inside)
    normal_rule = NormalRule.parse(normal)
    db = open_catalog(ws)
    where, args = ("WHERE dataset = ?", [dataset]) if dataset else ("", [])
    # ordered by source path, not by pseudonym (keyed per workspace): the same cohort gives the same set
    images = {r["image_id"]: r for r in db.query(f"SELECT * FROM images {where} ORDER BY source_path, image_id",
                                                 args)}
    order = {image_id: n for n, image_id in enumerate(images)}
    problems: list[str] = []
    rng = np.random.default_rng(seed)

    # lesion patches
    lesion_patches: list[dict] = []
    positives = [r for r in images.values() if r["label"] == 1]
    for row in progress(positives, desc="lesion patches", unit="image"):
        if row["rows"] < size or row["cols"] < size:
            problems.append(f"{row['image_id']}: {row['rows']} x {row['cols']} is smaller than one patch")
            continue
        for lesion in _lesions_for_patches(lesions_of(db, row["image_id"])):
            try:
                region = lesion_region(ws, row, lesion)
            except (MammoError, OSError) as error:
                problems.append(f"{row['image_id']} lesion {lesion['lesion_id']}: {error}")
                continue
            for x, y in lesion_patch_positions(region, row["rows"], row["cols"], size, step, rule):
                lesion_patches.append({"image_id": row["image_id"], "x": x, "y": y, "label": 1,
                                       "lesion_id": lesion["lesion_id"]})
    if not lesion_patches:
        raise PatchError("no lesion patches: the catalog has no label-1 image with a usable lesion "
                         "(run `mammo synth` or import annotated data first)")

    # normal patches
    negatives = [r for r in images.values() if r["label"] == 0]
    if not negatives:
        raise PatchError("no normal images (label 0, BI-RADS 1/2) to draw normal patches from")
    per_image = math.ceil(len(lesion_patches) / len(negatives))
    pool: list[dict] = []
    for row in progress(negatives, desc="normal patches", unit="image"):
        try:
            foreground = load_foreground(ws, row)
            avoid = [lesion_region(ws, row, le) for le in lesions_of(db, row["image_id"])
                     if le["pathology"] not in BENIGN]
        except (MammoError, OSError) as error:
            problems.append(f"{row['image_id']}: {error}")
            continue
        positions = normal_patch_positions(foreground, size, step, avoid, normal_rule)
        if not positions:
            continue
        take = rng.choice(len(positions), size=min(per_image, len(positions)), replace=False)
        pool.extend({"image_id": row["image_id"], "x": positions[i][0], "y": positions[i][1], "label": 0,
                     "lesion_id": None} for i in sorted(take))
    if len(pool) > len(lesion_patches):
        keep = np.sort(rng.choice(len(pool), size=len(lesion_patches), replace=False))
        pool = [pool[i] for i in keep]
    if len(pool) < len(lesion_patches):
        problems.append(f"only {len(pool)} normal patches for {len(lesion_patches)} lesion patches "
                        f"(too few positions passing the normal rule {normal_rule})")

    patches = sorted(lesion_patches + pool, key=lambda p: (order[p["image_id"]], p["label"], p["y"], p["x"]))
    for p in patches:
        p["split"] = images[p["image_id"]]["split"]
    # not the name: same patches, same digest (the original rule "all" keeps the digests of older sets)
    normal_key = "" if normal_rule.mode == "all" else f"|normal={normal_rule}"
    params = {"size": size, "step": step, "inside": str(rule), "normal": str(normal_rule), "seed": seed,
              "dataset": dataset,
              "normal_per_image": per_image, "lesion_sources": "annotated_copy when present, else non-benign"}
    summary = _write_patch_set(ws, db, name, images, patches, size=size, step=step, params=params,
                               digest_key=f"{size}|{step}|{rule}|{seed}{normal_key}", problems=problems)
    patches = summary.pop("patches")  # the ones written: an unreadable image's are left out
    counts: dict[str, dict[str, int]] = {}
    for p in patches:
        c = counts.setdefault(p["split"], {"lesion": 0, "normal": 0})
        c["lesion" if p["label"] else "normal"] += 1
    return {**summary, "lesion_patches": sum(p["label"] for p in patches),
            "normal_patches": sum(1 - p["label"] for p in patches), "per_split": counts}


def build_tissue_patch_set(ws: Workspace, name: str = "tissue", *, size: int = 512,
                           min_tissue: float | None = None, dataset: str | None = None) -> dict[str, Any]:
    """A patch set that needs no labels: every patch of every image's read grid (non-overlapping
    ``size`` patches holding at least ``min_tissue`` breast foreground, the grid ``mammo read`` scores),
    ``label`` :data:`UNLABELLED`. Dissection needs no labels (the paper dissects over patches), so an
    unlabelled folder can be imported, read and dissected. ``dataset`` limits the images."""
    from workspace.base.catalog import open_catalog
    from workspace.data.ingest import load_foreground

    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise PatchError(f"bad patch set name {name!r}")
    min_tissue = DEFAULT_MIN_TISSUE if min_tissue is None else float(min_tissue)
    db = open_catalog(ws)
    where, args = ("WHERE dataset = ?", [dataset]) if dataset else ("", [])
    images = {r["image_id"]: r for r in db.query(f"SELECT * FROM images {where} ORDER BY source_path, image_id",
                                                 args)}
    problems: list[str] = []
    patches: list[dict] = []
    for row in progress(list(images.values()), desc="tissue patches", unit="image"):
        if row["rows"] < size or row["cols"] < size:
            problems.append(f"{row['image_id']}: {row['rows']} x {row['cols']} is smaller than one patch")
            continue
        try:
            foreground = load_foreground(ws, row)
        except (MammoError, OSError) as error:
            problems.append(f"{row['image_id']}: {error}")
            continue
        patches.extend({"image_id": row["image_id"], "x": int(x), "y": int(y), "label": UNLABELLED,
                        "lesion_id": None, "split": row["split"]}
                       for x, y, _w, _h in tissue_grid(foreground, size, size, min_tissue))
    if not patches:
        raise PatchError("no tissue patches: no image in the catalog" + (f" of data set {dataset!r}" if dataset else "")
                         + f" holds a {size} x {size} patch with {min_tissue:.0%} breast")
    params = {"size": size, "step": size, "source": "tissue grid of every read (unlabelled)",
              "min_tissue": min_tissue, "dataset": dataset}
    summary = _write_patch_set(ws, db, name, images, patches, size=size, step=size, params=params,
                               digest_key=f"tissue|{size}|{min_tissue}", problems=problems)
    written = summary.pop("patches")
    return {**summary, "images": len({p["image_id"] for p in written})}


def _write_patch_set(ws: Workspace, db: Any, name: str, images: dict[str, dict], patches: list[dict], *,
                     size: int, step: int, params: dict, digest_key: str, problems: list[str]) -> dict[str, Any]:
    """Pixels, thumbnails, digest and catalog rows of a patch set (``patches``: dicts with image_id, x, y,
    label, lesion_id, split, in array order); the set replaces any earlier one of that name atomically."""
    from PIL import Image

    from workspace.data.ingest import load_model_pixels, resolve_path, stored_path

    # pixels, thumbnails and digest in one pass over the images, in array order; the rows of an image
    # that cannot be read are left out and the rows after it move up, so array_index stays the row number
    folder = ws.patches_dir / name
    tmp = ws.patches_dir / f".{name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "thumbs").mkdir(parents=True)
    arr = np.memmap(tmp / "pixels.u16", dtype=np.uint16, mode="w+", shape=(max(len(patches), 1), size, size))
    by_image: dict[str, list[dict]] = {}
    for p in patches:
        by_image.setdefault(p["image_id"], []).append(p)
    digest = hashlib.sha1(digest_key.encode())
    written: list[dict] = []
    for image_id, group in progress(list(by_image.items()), desc="patch pixels", unit="image"):
        row = images[image_id]
        try:
            model = load_model_pixels(ws, row)
            display = np.asarray(Image.open(resolve_path(ws, row["display_path"])))
        except (MammoError, OSError) as error:
            problems.append(f"{image_id}: {error}")
            continue
        for p in group:
            x, y = p["x"], p["y"]
            tile = np.rint(np.clip(model[y:y + size, x:x + size], 0, 1) * 65535).astype(np.uint16)
            p["array_index"] = len(written)
            arr[p["array_index"]] = tile
            digest.update(f"{image_id},{x},{y},{p['label']},{p['split']},{p['lesion_id']};".encode())
            digest.update(tile.tobytes())
            # written now (named by patch_id once it is known): no image stays in memory for its thumbs
            Image.fromarray(display[y:y + size, x:x + size]).save(tmp / "thumbs" / f".{p['array_index']}.png",
                                                                  compress_level=1)
            written.append(p)
    arr.flush()
    del arr
    if len(written) < len(patches):
        os.truncate(tmp / "pixels.u16", max(len(written), 1) * size * size * 2)
    patches = written

    # catalog rows (patch ids known only after insert: thumbs are named by patch_id)
    now = utc_now()
    thumbs = stored_path(ws, folder / "thumbs")
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("DELETE FROM patches WHERE patch_set = ?", [name])
        for p in patches:
            cur = db.execute(
                "INSERT INTO patches (patch_set, image_id, x, y, size, label, split, lesion_id, array_index,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [name, p["image_id"], p["x"], p["y"], size, p["label"], p["split"], p["lesion_id"],
                 p["array_index"], now])
            p["patch_id"] = cur.lastrowid
            os.replace(tmp / "thumbs" / f".{p['array_index']}.png", tmp / "thumbs" / f"{p['patch_id']}.png")
        db.execute("UPDATE patches SET thumb_path = ? || '/' || patch_id || '.png' WHERE patch_set = ?",
                   [thumbs, name])
        db.execute("DELETE FROM patch_sets WHERE patch_set = ?", [name])
        db.execute("INSERT INTO patch_sets (patch_set, size, step, n_patches, pixels_path, digest, params,"
                   " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   [name, size, step, len(patches), stored_path(ws, folder / "pixels.u16"), digest.hexdigest()[:16],
                    json.dumps(params), now])
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return {"patch_set": name, "n_patches": len(patches), "digest": digest.hexdigest()[:16], "params": params,
            "problems": problems, "pixels_path": str(folder / "pixels.u16"), "patches": patches}


# -- reading a set ---------------------------------------------------------------------------------

@dataclass
class PatchSet:
    """A built patch set: catalog rows (ordered by ``array_index``) and the pixel memmap."""

    name: str
    size: int
    step: int
    digest: str
    params: dict
    rows: list[dict]
    pixels: np.memmap          # uint16 (N, size, size), read-only

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r["label"] for r in self.rows], dtype=np.int64)

    def indices(self, split: str | None = None, label: int | None = None) -> np.ndarray:
        """Array indices of the patches in ``split`` (and with ``label``), ascending."""
        return np.array([r["array_index"] for r in self.rows
                         if (split is None or r["split"] == split) and (label is None or r["label"] == label)],
                        dtype=np.int64)

    def batch(self, indices) -> Any:
        """float32 tensor (B, 1, size, size) in [0, 1] for the given array indices."""
        import torch

        idx = np.asarray(indices, dtype=np.int64).ravel()
        order = np.argsort(idx)  # memmap reads in file order, then back to the asked order
        data = np.empty((len(idx), self.size, self.size), np.float32)
        data[order] = self.pixels[idx[order]]
        data *= np.float32(1 / 65535)
        return torch.from_numpy(data).unsqueeze(1)


def open_patch_set(ws: Workspace, name: str = "default") -> PatchSet:
    """The patch set ``name``; :class:`PatchError` when it has not been built."""
    from workspace.base.catalog import open_catalog
    from workspace.data.ingest import resolve_path

    db = open_catalog(ws)
    meta = db.execute("SELECT size, step, n_patches, pixels_path, digest, params FROM patch_sets WHERE patch_set = ?",
                      [name]).fetchone()
    if meta is None:
        known = [r[0] for r in db.execute("SELECT patch_set FROM patch_sets ORDER BY patch_set").fetchall()]
        raise PatchError(f"no patch set {name!r} (built: {', '.join(known) or 'none'}; run `mammo patches`)")
    size, step, n, pixels_path, digest, params = meta
    rows = [dict(r) for r in db.query("SELECT * FROM patches WHERE patch_set = ? ORDER BY array_index", [name])]
    path = resolve_path(ws, pixels_path)
    if not path.exists():
        raise PatchError(f"patch set {name!r}: pixel file {path} is missing (rebuild with `mammo patches`)")
    pixels = np.memmap(path, dtype=np.uint16, mode="r", shape=(max(n, 1), size, size))
    return PatchSet(name=name, size=size, step=step, digest=digest, params=json.loads(params), rows=rows,
                    pixels=pixels)
