"""One session on a workspace: the model, its dissection run and the concept store, opened one way, and
the use cases every surface shares (read, ask, report).

The Label Studio backend, the FiftyOne sync, ``mammo query``, ``mammo report`` and the demo check open a
:class:`Session`; nothing else decides which model answers for a run or loads it.

**Which model and which run** (:meth:`Session.open`, the one rule):

- ``run`` named (a run id or a :class:`~workspace.dissect.dissect_run.DissectionRun`): that run. Its model is
  ``model`` when given (it must have the run's digest), else the catalog's model of that digest
  (:func:`load_run_model`), loaded the way ``mammo dissect`` loaded it (architecture, trust), at the
  run's layer.
- else ``model`` named (a file, a workspace model name, or ``demo``; with ``arch``/``layer``/``trust``):
  that model, and its newest complete run at its layer (None when it was never dissected: reads work,
  queries and reports say to dissect first).
- else the newest complete run of the workspace and its model; with no run at all, the shipped demo
  model and no run.

**ROI masks** from files: :func:`roi_mask_from_png` (non-zero pixels are the ROI), the one rule of
``mammo query --roi-mask`` and ``mammo report --roi-mask``.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workspace.base.config import Workspace
from workspace.base.errors import CatalogError, QueryError
from workspace.dissect.dissection import DEFAULT_IOU_THRESHOLD


def load_run_model(ws: Workspace, run: Any, *, model_path: str | os.PathLike | None = None,
                   device: str | None = None) -> Any:
    """The model ``run`` dissected: its file and load options from the catalog's ``models`` table
    (``model_path`` overrides the file), at the run's layer, checked against the run's model digest."""
    from models.checkpoint import load_checkpoint
    from workspace.base.catalog import open_catalog
    from workspace.data.ingest import resolve_path

    db = open_catalog(ws)
    try:
        row = db.execute("SELECT path, load_options FROM models WHERE model_digest = ?",
                         [run.model_digest]).fetchone()
    finally:
        db.conn.close()
    if row is None and model_path is None:
        raise CatalogError(f"the model {run.model_digest} of run {run.run_id} is not in the catalog")
    options = json.loads(row[1]) if row is not None and row[1] else {}
    path = model_path if model_path is not None else resolve_path(ws, row[0])
    classes = {k: options[k] for k in ("class_names", "positive_class") if k in options}
    loaded = load_checkpoint(path, device=device, arch=options.get("arch"), layer=run.layer,
                             trust=bool(options.get("trust")), meta=classes or None)
    if loaded.digest != run.model_digest:
        raise CatalogError(f"run {run.run_id} dissected model {run.model_digest}, not {loaded.digest}")
    return loaded


def roi_mask(roi: np.ndarray | Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """An ROI as a bool mask of an image of ``shape`` (rows, cols): a mask of that size, or an [x, y, w, h] box."""
    from workspace.dissect.query import roi_from_box

    if np.ndim(roi) == 2:
        mask = np.asarray(roi, dtype=bool)
        if mask.shape != tuple(shape):
            raise QueryError(f"the ROI mask is {mask.shape[1]} x {mask.shape[0]} pixels, the image "
                             f"{shape[1]} x {shape[0]}")
        return mask
    return roi_from_box(tuple(float(v) for v in roi), tuple(shape))


def roi_mask_from_png(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """An ROI mask image of the image's size (rows, cols): every non-zero pixel is in the ROI (a 0/1 or a
    0/255 mask reads the same); one clear error for an unreadable file or another size."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise QueryError(f"no ROI mask file {path}")
    try:
        with Image.open(path) as image:
            mask = np.asarray(image.convert("L")) > 0
    except (OSError, ValueError) as error:
        raise QueryError(f"cannot read the ROI mask {path}: {error}") from None
    if mask.shape != tuple(shape):
        raise QueryError(f"the ROI mask {path} is {mask.shape[1]}x{mask.shape[0]}, the image is "
                         f"{shape[1]}x{shape[0]} (columns x rows)")
    return mask


class Lru:
    """A small thread-safe LRU memo (``get(key, make)``): ``make`` runs outside the lock."""

    def __init__(self, size: int):
        self.size = size
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        value = make()
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)
        return value


READS_IN_MEMORY = 16  # reads (maps memory-mapped from the disk cache) a session keeps at hand
PATCHES_IN_MEMORY = 64  # patch-set patches (pixels, maps, silenced scores) kept for FiftyOne's patch reports


@dataclass
class _PatchPass:
    """One patch-set patch through the model: its score, its maps at the layer, the silenced scores so far."""

    x01: Any
    score: float
    maps: Any
    silenced: dict = field(default_factory=dict)   # sorted units -> score


@dataclass
class Session:
    """A workspace's model, dissection run (or None) and concept store; see the module docstring.

    The caches of a session, for a long-lived one (the backend): the disk cache of reads
    (``models.inference``), the last :data:`READS_IN_MEMORY` reads in memory (each with the scores of its
    patches with concepts silenced, ``models.ablation``), and the query engine's per-patch masks of the images
    being asked about (``workspace.dissect.query.image_masks_for``, guarded here).
    One forward pass runs at a time: the CPU is shared with the server."""

    ws: Workspace
    loaded: Any
    run: Any | None
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    _store: Any = field(default=None, repr=False)
    _reads: Lru = field(default_factory=lambda: Lru(READS_IN_MEMORY), repr=False)
    _forward_lock: Any = field(default_factory=threading.Lock, repr=False)
    _masks_lock: Any = field(default_factory=threading.Lock, repr=False)
    _patches: Lru = field(default_factory=lambda: Lru(PATCHES_IN_MEMORY), repr=False)

    @classmethod
    def open(cls, ws: Workspace | str | os.PathLike | None, *, run: Any = None, model: Any = None,
             arch: str | None = None, layer: str | None = None, trust: bool = False, device: str | None = None,
             classes: dict | None = None, loaded: Any = None, iou_threshold: float | None = None) -> Session:
        """Open by the one rule of the module docstring. ``loaded`` passes an already loaded model (it
        stands for ``model``); ``classes``: ``models.checkpoint.class_options`` of a named model."""
        from models.checkpoint import load_checkpoint, resolve_model_path
        from workspace.dissect.dissect_run import latest_run, load_run

        ws = ws if isinstance(ws, Workspace) else Workspace.open(ws)
        if isinstance(run, str):
            run = load_run(ws, run)
        if loaded is None and model is not None:
            if run is not None:  # another copy of the run's model: loaded the way the run's model is
                loaded = load_run_model(ws, run, model_path=resolve_model_path(ws, model), device=device)
            else:
                loaded = load_checkpoint(resolve_model_path(ws, model), device, arch=arch, layer=layer, trust=trust,
                                         meta=classes or None)
        if run is None and loaded is not None:
            run = latest_run(ws, loaded.digest, loaded.dissected_layer)
        elif run is None:
            run = latest_run(ws)
            if run is None:
                loaded = load_checkpoint(resolve_model_path(ws, None), device)
        if run is not None:
            if loaded is None:
                loaded = load_run_model(ws, run, device=device)
            elif loaded.digest != run.model_digest:
                raise CatalogError(f"run {run.run_id} dissected model {run.model_digest}, not {loaded.digest}")
            elif loaded.dissected_layer != run.layer:
                raise CatalogError(f"run {run.run_id} dissected layer {run.layer}; the model was loaded at "
                                   f"{loaded.dissected_layer} (--layer {run.layer})")
        threshold = DEFAULT_IOU_THRESHOLD if iou_threshold is None else float(iou_threshold)
        return cls(ws=ws, loaded=loaded, run=run, iou_threshold=threshold)

    # -- pieces ------------------------------------------------------------------------------
    @property
    def card(self) -> Any:
        return self.loaded.card

    @property
    def store(self) -> Any:
        """The concept store (opened on first use; :meth:`close` closes it)."""
        if self._store is None:
            from workspace.dissect.concepts import ConceptStore

            self._store = ConceptStore(self.ws)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def require_run(self) -> Any:
        if self.run is None:
            raise CatalogError(f"no dissection run of model {self.loaded.digest} layer {self.loaded.dissected_layer}: "
                               "run `mammo dissect` first")
        return self.run

    def image(self, image_id: str) -> dict:
        from workspace.base.catalog import get_image, open_catalog

        db = open_catalog(self.ws)
        try:  # closed here: a long-lived caller (a server) must not collect one connection per call
            return dict(get_image(db, image_id))
        finally:
            db.conn.close()

    def labels(self) -> dict:
        run = self.require_run()
        return self.store.labels(run.model_digest, run.layer)

    # -- use cases ---------------------------------------------------------------------------
    def read(self, image_id: str, **options: Any) -> Any:
        """The model's read of an image, maps kept (``models.inference.read_mammogram``: cached on disk per
        image, model and layer; the last reads also in memory). ``options`` (stride, keep_maps=False...)
        read past the memory memo."""
        from models.inference import read_mammogram

        if options and options != {"keep_maps": True}:
            return read_mammogram(self.ws, image_id, self.loaded, **options)

        def forward() -> Any:
            with self._forward_lock:
                return read_mammogram(self.ws, image_id, self.loaded, keep_maps=True)

        return self._reads.get(image_id, forward)

    def image_masks(self, image_id: str) -> Any:
        """The query engine's per-patch masks of an image's read under the run's thresholds (built lazily,
        shared by every query on that image)."""
        from workspace.dissect.query import image_masks_for

        read = self.read(image_id)
        with self._masks_lock:  # the engine's cache is a plain OrderedDict
            return image_masks_for(self.ws, image_id, self.loaded, self.require_run(), read=read)

    def query(self, image_id: str, roi: np.ndarray | Sequence[float]) -> Any:
        """Every unit ranked by the IoU of its mask with the ROI (a bool mask of the image, or an [x, y, w, h]
        box), summed over the patches the ROI covers: ``ImageMasks.query``."""
        masks = self.image_masks(image_id)
        return masks.query(roi_mask(roi, tuple(masks.shape)), self.iou_threshold)

    def query_patch(self, image_id: str, index: int, roi: np.ndarray) -> Any:
        """An ROI (bool, the patch's size) on patch ``index`` of the image's read: ``workspace.dissect.query.query_patch``."""
        from workspace.dissect.query import query_patch

        return query_patch(self.image_masks(image_id).patch(int(index)), roi, iou_threshold=self.iou_threshold)

    def score_changes(self, image_id: str, groups: Mapping[Any, Iterable[int]], *,
                      patch_box: Sequence[int] | None = None) -> Any:
        """What silencing each group of units does to the image score (or, with ``patch_box``, to that patch's
        score): ``models.ablation.ScoreChanges`` keyed like ``groups``. A partial forward pass per group and
        patch from the read's kept maps, cached on the read: the same groups again cost nothing."""
        from models.ablation import read_score_changes
        from workspace.dissect.reports import ReportError

        read = self.read(image_id)
        index = None
        if patch_box is not None:
            index = read.index_of(patch_box)
            if index is None:
                raise ReportError(f"no patch of the read of {image_id} has the box {list(patch_box)}")
        with self._forward_lock:
            return read_score_changes(self.ws, self.loaded, read, groups, index=index)

    def patch_score_changes(self, patch_id: int, groups: Mapping[Any, Iterable[int]]) -> Any:
        """The same for one patch of a patch set (a sample of FiftyOne's patches dataset): one forward pass to
        the layer per patch (kept for the last :data:`PATCHES_IN_MEMORY` patches), then the rest per group."""
        from models.ablation import ScoreChanges, silenced_scores, tap_layer
        from workspace.base.catalog import open_catalog
        from workspace.data.patches import open_patch_set

        def forward() -> _PatchPass:
            db = open_catalog(self.ws)
            try:
                row = db.execute("SELECT patch_set, array_index FROM patches WHERE patch_id = ?",
                                 [int(patch_id)]).fetchone()
            finally:
                db.conn.close()
            if row is None:
                raise CatalogError(f"no patch {patch_id} in the catalog")
            x01 = open_patch_set(self.ws, row[0]).batch([int(row[1])])
            with self._forward_lock:
                scores, maps = tap_layer(self.loaded, x01)
            return _PatchPass(x01=x01, score=float(scores[0]), maps=maps)

        done = self._patches.get(int(patch_id), forward)
        keys = {key: tuple(sorted({int(u) for u in units})) for key, units in groups.items()}
        missing = [k for k in dict.fromkeys(keys.values()) if k not in done.silenced]
        if missing:
            with self._forward_lock:
                rows = silenced_scores(self.loaded, done.maps, [(), *missing], patches=done.x01)
            done.silenced[()] = float(rows[0, 0])
            done.silenced.update({k: float(r[0]) for k, r in zip(missing, rows[1:], strict=True)})
        base = done.silenced.get((), done.score)
        return ScoreChanges(of="patch", score=base, silenced={key: done.silenced[k] for key, k in keys.items()})

    def ask(self, image_id: str, roi: np.ndarray | Sequence[float], *, asked_by: str, source: str,
            patch_box: Sequence[int] | None = None) -> Any:
        """An ROI query answered and recorded in the concept store: the report, with its ``query_id``."""
        return self.report(image_id, roi, patch_box=patch_box, record=True, asked_by=asked_by, source=source)

    def report(self, image_id: str, roi: np.ndarray | Sequence[float] | None = None, *,
               patch_box: Sequence[int] | None = None, record: bool = False, asked_by: str = "api",
               source: str = "api", thumbnail: bool = True, silence: bool = True) -> Any:
        """The concept report of an image (or one patch of its read), with the score, the model card and
        the domain warning; with ``record`` the ROI query is stored (``report.query_id``); with ``silence``
        each concept's change of the score when its units are silenced (:meth:`score_changes`)."""
        from workspace.base.errors import ModelError
        from workspace.dissect.concepts import encode_roi
        from workspace.dissect.reports import (
            ReportError,
            build_report,
            concept_groups,
            make_thumbnail,
            proposal_texts,
        )

        run = self.require_run()
        row = self.image(image_id)
        read = self.read(image_id, keep_maps=True)
        if read.maps is None or len(read.maps) == 0:
            raise ReportError(f"the read of {image_id} kept no activation maps (no tissue patches?)")
        if read.layer != run.layer:
            raise ReportError(f"the read of {image_id} tapped layer {read.layer}, run {run.run_id} layer {run.layer}")
        maps = read.maps
        if patch_box is not None:
            index = read.index_of(patch_box)
            if index is None:
                raise ReportError(f"no patch of the read of {image_id} has the box {list(patch_box)}")
            maps = maps[[index]]
        # max over patches and positions; float16 max is exact, and a memory-mapped cache streams
        max_acts = np.asarray(np.max(maps, axis=(0, 2, 3)), dtype=np.float64)
        iou = aligned = roi_geometry = roi_pixels = None
        if roi is not None:
            roi_pixels = roi_mask(roi, (int(row["rows"]), int(row["cols"])))
            result = self.query(image_id, roi_pixels)
            iou = np.asarray(result.iou, dtype=np.float64)
            aligned = [int(u) for u in result.aligned]
            roi_geometry = encode_roi(roi_pixels)
        labels, labelled_by = self.store.labels_and_labellers(run.model_digest, run.layer)
        changes, silence_notes = None, []
        if silence and labels:
            try:
                changes = self.score_changes(image_id, concept_groups(labels), patch_box=patch_box)
            except ModelError as error:  # e.g. a layer that runs twice: the report goes out without those bars
                silence_notes.append(f"Silencing concepts was not possible: {error}")
        query_id = None
        if record and roi_geometry is not None:
            query_id = self.store.record_query(run.model_digest, run.layer, roi=roi_geometry, ranking=iou,
                                               aligned=aligned, iou_threshold=self.iou_threshold,
                                               asked_by=asked_by, source=source, image_id=image_id,
                                               patch_box=patch_box, run_id=run.run_id)
        thumb = None
        if thumbnail and row.get("display_path"):
            from PIL import Image

            from workspace.data.ingest import resolve_path

            display = resolve_path(self.ws, row["display_path"])
            if display.exists():
                pixels = np.asarray(Image.open(display).convert("L"))
                thumb = make_thumbnail(pixels, roi_mask=roi_pixels if roi_pixels is not None
                                       and roi_pixels.shape == pixels.shape else None)
        report = build_report(max_acts, run.thresholds, labels, iou=iou, aligned=aligned,
                              iou_threshold=self.iou_threshold, image_id=image_id, patch_box=patch_box,
                              model_digest=run.model_digest, layer=run.layer, run_id=run.run_id, query_id=query_id,
                              roi=roi_geometry, thumbnail=thumb, read=read, card=self.card,
                              labelled_by=labelled_by, score_changes=changes,
                              proposals=proposal_texts(self.store, run.model_digest, run.layer))
        report.notes.extend(silence_notes)
        return report


__all__ = ["Session", "Lru", "load_run_model", "roi_mask", "roi_mask_from_png", "READS_IN_MEMORY",
           "PATCHES_IN_MEMORY"]
