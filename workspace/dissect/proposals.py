"""Concept proposals from the annotations a site already has: units that align with lesions of one kind.

For every unit of a run's layer and every attribute value of the catalog's lesions (the lesion's ``kind``, and
the descriptive attributes importers keep: synthetic ``finding``, CBIS-DDSM mass shape and margins, calcification
type and distribution, VinDr-Mammo categories, INbreast ROI names, MIAS classes), the **dataset-level IoU**
of Network Dissection: summed intersections over summed unions of the unit's thresholded masks (the run's
``T``, the query engine's masks) and the attribute value's lesion masks, over the run's patches:

    IoU(u, a) = sum_p |M_u,p & L_a,p| / sum_p |M_u,p | L_a,p|,   |M | L| = |M| + |L| - |M & L|

Every patch counts in the union (a unit that fires everywhere scores low). An ``annotated_copy`` lesion (the
outline of another lesion, found on a circled copy) is left out, so no lesion counts twice. The sums are kept per image, so
any set of images gives its own IoU (a held-out check needs no second pass). The **proposals** are the best
matches: for every attribute value seen on at least two lesions, the three units that align with it most
specifically, by the margin of their IoU with it over their best IoU with another value of the same attribute
(:func:`propose`): "unit 17: probably spiculated (IoU 0.03 over 42 lesions)". The plain highest IoU favours large
findings: every unit overlaps a mass more than a calcification, so the calcification units it picks align with
held-out masses instead (``bench/check_proposals.py``). Lesions are small against a unit's top-1 % masks summed
over every patch, so these IoUs are far below Network Dissection's 0.04 detector threshold for scene concepts;
``min_iou`` sets a floor. Proposals are
never applied on their own: a reader or curator accepts or rejects them (``ConceptStore.decide_proposals``);
an accepted one labels the unit, with its evidence in the label's note.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from workspace.base.errors import MammoError

DEFAULT_PER_VALUE = 3      # units proposed per attribute value
DEFAULT_MIN_IOU = 0.0      # any overlap; Network Dissection's 0.04 suits large scene concepts, not small lesions
DEFAULT_MIN_LESIONS = 2    # a value seen on one lesion only proposes nothing
# lesion attributes that describe what a lesion looks like (numbers, ids and scores left out)
DESCRIPTIVE_ATTRIBUTES = ("finding", "mass_shape", "mass_margins", "calc_type", "calc_distribution", "categories",
                          "roi_name", "mias_class")


class ProposalError(MammoError):
    """Proposals cannot be computed (no lesions in the run's patches, a run without its model...)."""


def attribute_values(lesion: dict) -> list[tuple[str, str]]:
    """``(key, value)`` pairs a lesion shows: its kind and its descriptive attributes (list values one each)."""
    out = [("kind", str(lesion["kind"]).strip().lower())]
    attributes = lesion.get("attributes") or {}
    if isinstance(attributes, str):
        attributes = json.loads(attributes) if attributes.strip() else {}
    for key in DESCRIPTIVE_ATTRIBUTES:
        value = attributes.get(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item.strip() and item.strip().upper() not in ("N/A", "NA", "NONE"):
                out.append((key, item.strip()))
    return list(dict.fromkeys(out))


def concept_name(key: str, value: str) -> str:
    """The concept a value proposes: ``spiculated``, ``calcification cluster``, ``round (mass shape)``."""
    words = value.replace("_", " ").replace("-", " / ").lower().strip()
    return words if key in ("kind", "finding", "categories", "roi_name") else f"{words} ({key.replace('_', ' ')})"


@dataclass
class IoUTable:
    """Per image sums: ``inter[image]`` (units, values) intersections, ``area[image]`` (units,) mask pixels,
    ``lesion_area[image]`` (values,) lesion pixels, ``lesions[image]`` per value the lesion ids seen."""

    values: list[tuple[str, str]]
    n_units: int
    inter: dict[str, np.ndarray] = field(default_factory=dict)
    area: dict[str, np.ndarray] = field(default_factory=dict)
    lesion_area: dict[str, np.ndarray] = field(default_factory=dict)
    lesions: dict[str, list[set[int]]] = field(default_factory=dict)
    n_patches: dict[str, int] = field(default_factory=dict)

    def iou(self, images: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(units, values) dataset-level IoU over ``images`` (default all), and (values,) lesion counts."""
        chosen = [i for i in (self.area if images is None else images) if i in self.area]
        inter = np.zeros((self.n_units, len(self.values)), np.int64)
        area = np.zeros(self.n_units, np.int64)
        lesion_area = np.zeros(len(self.values), np.int64)
        counts = np.zeros(len(self.values), np.int64)
        for image in chosen:
            inter += self.inter[image]
            area += self.area[image]
            lesion_area += self.lesion_area[image]
            counts += [len(s) for s in self.lesions[image]]
        union = area[:, None] + lesion_area[None, :] - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        return iou, counts


def evidence_text(iou: float, n_lesions: int) -> str:
    """A proposal's evidence as readers see it, e.g. "IoU 0.012 over 31 lesions" (two significant digits: a
    dataset-level IoU is often below 0.01)."""
    return f"IoU {iou:#.2g} over {n_lesions} lesion{'s' if n_lesions != 1 else ''}"


@dataclass
class Proposal:
    unit: int
    concept: str                  # the name it proposes
    attribute: str                # the lesion attribute it comes from ("kind", "finding", "mass_margins"...)
    value: str
    iou: float                    # dataset-level IoU over the run's patches
    n_lesions: int                # lesions with that value in the run's patches
    runner_up: str | None = None  # the next best value, for the reader's judgement
    runner_up_iou: float | None = None

    def evidence(self) -> str:
        return evidence_text(self.iou, self.n_lesions)

    def to_text(self) -> str:
        return f"unit {self.unit}: probably {self.concept} ({self.evidence()})"

    def to_dict(self) -> dict:
        return asdict(self)


def iou_table(ws: Any, run: Any, loaded: Any, *, batch_size: int | None = None) -> IoUTable:
    """One pass of the run's model over the run's patches: the per-image sums of :class:`IoUTable`."""
    from workspace.base.catalog import get_image, lesions_of, open_catalog
    from workspace.base.progress import progress
    from workspace.data.patches import lesion_region, open_patch_set
    from workspace.dissect.dissect_run import DEFAULT_BATCH_SIZE, model_source
    from workspace.dissect.query import PatchMasks

    manifest = run.manifest
    split = manifest.get("split")
    source = model_source(ws, loaded, patch_set=manifest["patch_set"], split=None if split in (None, "all") else split,
                          layer=run.layer, batch_size=batch_size or DEFAULT_BATCH_SIZE)
    if not np.array_equal(source.patch_ids, run.patch_ids):
        raise ProposalError(f"the patches of {manifest['patch_set']!r} changed since run {run.run_id}")
    pset = open_patch_set(ws, manifest["patch_set"])
    by_id = {int(r["patch_id"]): r for r in pset.rows}
    db = open_catalog(ws)
    images = sorted({by_id[int(p)]["image_id"] for p in source.patch_ids})
    regions: dict[str, list[tuple[Any, list[int]]]] = {}
    values: dict[tuple[str, str], int] = {}
    for image_id in images:
        row = get_image(db, image_id)
        found = []
        for lesion in lesions_of(db, image_id):
            if lesion["source"] == "annotated_copy":   # a copy of another lesion's outline: counted once
                continue
            try:
                region = lesion_region(ws, row, lesion)
            except MammoError:   # a lesion without pixels (a point, an empty mask): nothing to align with
                continue
            found.append((region, [values.setdefault(v, len(values)) for v in attribute_values(lesion)]))
        regions[image_id] = found
    if not values:
        raise ProposalError("the run's images have no lesion with a shape to align with: nothing to propose from")
    thresholds = np.asarray(run.thresholds, np.float32)
    n_units = int(thresholds.size)
    table = IoUTable(values=list(values), n_units=n_units)
    for image_id in images:
        table.inter[image_id] = np.zeros((n_units, len(values)), np.int64)
        table.area[image_id] = np.zeros(n_units, np.int64)
        table.lesion_area[image_id] = np.zeros(len(values), np.int64)
        table.lesions[image_id] = [set() for _ in values]
        table.n_patches[image_id] = 0
    n = len(source.patch_ids)
    bar = progress(total=n, desc=f"proposals: {run.layer} masks against lesions", unit="patch")
    try:
        for start in range(0, n, source.batch_size):
            stop = min(n, start + source.batch_size)
            maps = source.activations(start, stop).float().cpu().numpy()
            for k, patch_id in enumerate(source.patch_ids[start:stop]):
                row = by_id[int(patch_id)]
                image_id, x, y, size = row["image_id"], int(row["x"]), int(row["y"]), int(row["size"])
                masks = PatchMasks.from_maps(maps[k], thresholds, size)
                table.area[image_id] += masks.areas
                table.n_patches[image_id] += 1
                local: dict[int, np.ndarray] = {}
                for region, value_ids in regions[image_id]:
                    window = _inside(region, x, y, size)
                    if window is None:
                        continue
                    for v in value_ids:
                        local[v] = local[v] | window if v in local else window
                        table.lesions[image_id][v].add(int(region.lesion_id))
                for v, lesion_mask in local.items():
                    table.lesion_area[image_id][v] += int(lesion_mask.sum())
                    table.inter[image_id][:, v] += masks.intersections(lesion_mask)
            bar.update(stop - start)
    finally:
        bar.close()
    return table


def _inside(region: Any, x: int, y: int, size: int) -> np.ndarray | None:
    """A lesion region's pixels inside the patch at (x, y), as a (size, size) mask; None when none are."""
    h, w = region.mask.shape
    x0, y0 = max(x, region.x0), max(y, region.y0)
    x1, y1 = min(x + size, region.x0 + w), min(y + size, region.y0 + h)
    if x0 >= x1 or y0 >= y1:
        return None
    part = region.mask[y0 - region.y0:y1 - region.y0, x0 - region.x0:x1 - region.x0]
    if not part.any():
        return None
    out = np.zeros((size, size), bool)
    out[y0 - y:y1 - y, x0 - x:x1 - x] = part
    return out


def propose(table: IoUTable, *, images: Iterable[str] | None = None, per_value: int = DEFAULT_PER_VALUE,
            min_iou: float = DEFAULT_MIN_IOU, min_lesions: int = DEFAULT_MIN_LESIONS) -> list[Proposal]:
    """The best matches: for every attribute value shown by at least ``min_lesions`` lesions (over ``images``),
    the ``per_value`` units that align with it most specifically, by the **margin** of their IoU with it over
    their best IoU with another value of the same attribute (a mass unit must align with masses more than
    with calcifications), margin and IoU above 0 and ``min_iou``. A unit named by several values keeps its
    largest margin. Best IoU first."""
    iou, counts = table.iou(images)
    margin = np.full(iou.shape, -np.inf)
    for v, (key, _value) in enumerate(table.values):
        if counts[v] < min_lesions:
            continue
        others = [w for w, (k, _) in enumerate(table.values) if k == key and w != v and counts[w] > 0]
        margin[:, v] = iou[:, v] - (iou[:, others].max(axis=1) if others else 0.0)
    best: dict[int, int] = {}
    for v in range(len(table.values)):
        for unit in np.argsort(-margin[:, v], kind="stable")[:per_value]:
            unit = int(unit)
            if margin[unit, v] > 0 and iou[unit, v] > min_iou and (unit not in best
                                                                    or margin[unit, v] > margin[unit, best[unit]]):
                best[unit] = v
    out = []
    for unit, v in best.items():
        key, value = table.values[v]
        others = [w for w in np.argsort(-iou[unit], kind="stable") if w != v and counts[w] > 0]
        second = int(others[0]) if others else None
        out.append(Proposal(unit=unit, concept=concept_name(key, value), attribute=key, value=value,
                            iou=round(float(iou[unit, v]), 4), n_lesions=int(counts[v]),
                            runner_up=concept_name(*table.values[second]) if second is not None else None,
                            runner_up_iou=round(float(iou[unit, second]), 4) if second is not None else None))
    out.sort(key=lambda p: (-p.iou, p.unit))
    return out


__all__ = ["evidence_text", "DEFAULT_PER_VALUE", "DEFAULT_MIN_IOU", "DEFAULT_MIN_LESIONS", "DESCRIPTIVE_ATTRIBUTES", "ProposalError", "attribute_values", "concept_name",
           "IoUTable", "Proposal", "iou_table", "propose"]
