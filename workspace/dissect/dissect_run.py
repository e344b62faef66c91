"""Dissection runs: one streaming pass over a patch set, written as an immutable folder.

The statistics (:class:`DissectionStats`) take any iterator of activation batches
``(acts (B, units, h, w), patch_ids (B,))``: where the activations come from (a checkpoint and a
patch set, a test network, a remote worker) does not matter. :func:`execute_run` drives one pass
from an :class:`ActivationSource` and writes the run; :func:`run_dissection` is the usual entry
point (a loaded checkpoint and a patch set of the workspace).

A run folder ``ws.runs_dir/<run_id>/`` holds ``manifest.json`` and ``.npy`` arrays:
``max_activations`` (units, patches) float32, ``patch_ids`` (patches,) int64 ascending, ``top_k`` and
``top_k_values`` (units, k) best first, ``thresholds`` (units,) float32, ``pca`` (units, 2),
``explained_variance`` and ``explained_variance_ratio`` (2,).

Atomicity: everything is written in ``runs/.partial-<run_id>/`` (with periodic checkpoints of the
statistics, ``state.pt``), each file fsynced, then the folder is renamed to ``runs/<run_id>``. A run
killed half way leaves only the partial folder (never a folder with a manifest) and a catalog row with
status ``running``; calling again with the same configuration resumes from the last checkpoint. The
run id is a digest of the configuration, so the same request finds the finished run instead of
recomputing it (runs are immutable).

The mask rule (:data:`workspace.dissect.dissection.MASK_RULE`) is NOT part of the run id: no array of a run
depends on it (masks are made at query time from ``thresholds``), so a run written under an earlier
rule (``>=`` before the change to strictly above) holds the same numbers, and every query on it
applies the current rule. The manifest's ``mask_rule`` says which rule the code applied when the run
was written, for the record only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workspace import __version__
from workspace.base.catalog import json_default
from workspace.base.config import Workspace
from workspace.base.errors import CatalogError, MammoError
from workspace.base.progress import progress
from workspace.base.schema import utc_now
from workspace.data.ingest import stored_path
from workspace.data.patches import DEFAULT_BATCH_SIZE
from workspace.dissect.dissection import (
    ALIGN_CORNERS,
    DEFAULT_QUANTILE,
    DEFAULT_TOP_K,
    MASK_RULE,
    max_activations,
    pca_embedding,
)
from workspace.dissect.runningstats import (
    RunningMaxActivation,
    RunningQuantileSketch,
    RunningTailQuantile,
    RunningTopK,
    StatisticsError,
    tail_size,
)

DEFAULT_MEMORY_BUDGET_MB = 1024
CHECKPOINT_EVERY_S = 60.0
MANIFEST = "manifest.json"
ARRAYS = ("max_activations", "patch_ids", "top_k", "top_k_values", "thresholds", "pca",
          "explained_variance", "explained_variance_ratio")


class DissectionError(MammoError):
    """A dissection that cannot run (empty split, unknown patch set, budget too small...)."""


# ---------------------------------------------------------------------------------------------
# statistics of one pass (mergeable)
# ---------------------------------------------------------------------------------------------
def plan_quantile(n_units: int, n_total: int, q: float, memory_budget_mb: float,
                  batch_values: int, sketch_capacity: int | None = None) -> dict[str, Any]:
    """Exact tail buffer when its peak fits the budget, else a sketch sized to the budget
    (``sketch_capacity`` forces the sketch with that capacity, e.g. to match other shards)."""
    budget = int(memory_budget_mb * 2**20)
    exact_bytes = RunningTailQuantile.estimate_bytes(n_units, n_total, q, batch_values)
    plan = {"n_values_per_unit": int(n_total), "tail_size": tail_size(n_total, q),
            "exact_peak_bytes": exact_bytes, "memory_budget_bytes": budget}
    if sketch_capacity is not None:
        plan["method"] = "sketch"
        plan["sketch_capacity"] = int(sketch_capacity)
    elif exact_bytes <= budget:
        plan["method"] = "exact"
    else:
        plan["method"] = "sketch"
        plan["sketch_capacity"] = RunningQuantileSketch.capacity_for_budget(n_units, n_total, budget)
    return plan


class DissectionStats:
    """Everything a dissection keeps while streaming: max activations per patch, top-k per unit and
    the per-unit quantile state (exact tail buffer or sketch, per ``plan``). ``add`` a batch,
    ``merge`` a shard, ``state_dict`` / ``load_state_dict`` to checkpoint, ``to_`` a device."""

    def __init__(self, n_units: int, map_shape: tuple[int, int], plan: dict[str, Any], quantile: float,
                 top_k: int, device: torch.device | str = "cpu", n_patches: int = 0):
        self.n_units, self.map_shape = int(n_units), (int(map_shape[0]), int(map_shape[1]))
        self.plan, self.quantile, self.k = dict(plan), float(quantile), int(top_k)
        self.device = torch.device(device)
        self.maxima = RunningMaxActivation(self.device, capacity=n_patches)
        self.topk = RunningTopK(self.k, self.device)
        n_total = int(plan["n_values_per_unit"])
        if plan["method"] == "exact":
            self.quantiles: RunningTailQuantile | RunningQuantileSketch = RunningTailQuantile(
                self.n_units, n_total, self.quantile, self.device)
        else:
            self.quantiles = RunningQuantileSketch(self.n_units, self.quantile, int(plan["sketch_capacity"]),
                                                   self.device)

    @classmethod
    def for_batch(cls, acts: torch.Tensor, n_patches: int, *, quantile: float, top_k: int,
                  memory_budget_mb: float, device: torch.device | str | None = None,
                  sketch_capacity: int | None = None) -> DissectionStats:
        """Statistics sized from the first batch's shape for a pass over ``n_patches`` patches."""
        if acts.dim() != 4:
            raise DissectionError(f"a layer to dissect must output (B, units, h, w) maps, got {tuple(acts.shape)}")
        _b, units, h, w = acts.shape
        plan = plan_quantile(units, n_patches * h * w, quantile, memory_budget_mb, acts.shape[0] * h * w,
                             sketch_capacity)
        return cls(units, (h, w), plan, quantile, top_k, device or acts.device, n_patches=n_patches)

    def add(self, acts: torch.Tensor, patch_ids: torch.Tensor | np.ndarray) -> None:
        """acts: (B, units, h, w) activations of B patches; patch_ids: (B,) their ids."""
        acts = acts.to(self.device)
        if acts.shape[1:] != (self.n_units, *self.map_shape):
            raise DissectionError(f"activation maps of shape {tuple(acts.shape[1:])}, expected "
                                  f"{(self.n_units, *self.map_shape)}")
        ids = torch.as_tensor(np.asarray(patch_ids), dtype=torch.int64)
        maxima = max_activations(acts).float().T                      # (units, B)
        if not bool(torch.isfinite(maxima).all()):     # NaN and +inf show in the maxima
            raise StatisticsError("activations contain NaN or infinite values")
        self.maxima.add(maxima, ids)
        self.topk.add(maxima, ids)
        if isinstance(self.quantiles, RunningTailQuantile):
            self.quantiles.add_patches(acts, maxima.amax(dim=1), checked=True)
        else:
            self.quantiles.add(acts.float().transpose(0, 1).reshape(self.n_units, -1))

    @property
    def n_patches(self) -> int:
        return self.maxima.count

    def merge(self, other: DissectionStats) -> DissectionStats:
        if (other.n_units, other.map_shape, other.plan, other.quantile, other.k) != (
                self.n_units, self.map_shape, self.plan, self.quantile, self.k):
            raise StatisticsError("cannot merge dissection statistics of different configurations")
        self.maxima.merge(other.maxima)
        self.topk.merge(other.topk)
        self.quantiles.merge(other.quantiles)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"n_units": self.n_units, "map_shape": list(self.map_shape), "plan": self.plan,
                "quantile": self.quantile, "k": self.k, "maxima": self.maxima.state_dict(),
                "topk": self.topk.state_dict(), "quantiles": self.quantiles.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> DissectionStats:
        stats = cls(state["n_units"], tuple(state["map_shape"]), state["plan"], state["quantile"],
                    state["k"], device)
        stats.maxima.load_state_dict(state["maxima"])
        stats.topk.load_state_dict(state["topk"])
        stats.quantiles.load_state_dict(state["quantiles"])
        return stats

    def to_(self, device: torch.device | str) -> DissectionStats:
        self.device = torch.device(device)
        self.maxima.to_(device)
        self.topk.to_(device)
        self.quantiles.to_(device)
        return self

    def results(self) -> dict[str, np.ndarray]:
        """The run's arrays (see the module docstring), as numpy."""
        a, ids = self.maxima.result()
        top_values, top_ids = self.topk.result()
        thresholds = self.quantiles.result()
        a_np = a.cpu().numpy()
        coords, variance, ratio = pca_embedding(a_np)
        return {"max_activations": a_np, "patch_ids": ids.cpu().numpy(),
                "top_k": top_ids.cpu().numpy(), "top_k_values": top_values.cpu().numpy(),
                "thresholds": thresholds.cpu().numpy().astype(np.float32),
                "pca": coords.astype(np.float32), "explained_variance": variance,
                "explained_variance_ratio": ratio}

    def quantile_report(self) -> dict[str, Any]:
        """What the manifest says about the thresholds: method, sizes, and the sketch's error bound."""
        report = dict(self.plan)
        if isinstance(self.quantiles, RunningQuantileSketch):
            n = max(self.quantiles.count, 1)
            report["sketch_rank_error"] = int(self.quantiles.rank_error)
            report["sketch_rank_error_fraction"] = self.quantiles.rank_error / n
        else:
            report["sketch_rank_error"] = 0
        return report


def dissect_batches(batches: Iterable[tuple[torch.Tensor, Any]], n_patches: int, *,
                    quantile: float = DEFAULT_QUANTILE, top_k: int = DEFAULT_TOP_K,
                    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
                    device: torch.device | str | None = None) -> DissectionStats:
    """One streaming pass: statistics of ``n_patches`` patches given as (acts, patch_ids) batches."""
    stats: DissectionStats | None = None
    for acts, ids in batches:
        if stats is None:
            stats = DissectionStats.for_batch(acts, n_patches, quantile=quantile, top_k=top_k,
                                              memory_budget_mb=memory_budget_mb, device=device)
        stats.add(acts, ids)
    if stats is None:
        raise DissectionError("no activation batches to dissect")
    return stats


# ---------------------------------------------------------------------------------------------
# where activations come from
# ---------------------------------------------------------------------------------------------
@dataclass
class ActivationSource:
    """Patches to dissect, in order, and how to get their activations.

    ``activations(start, stop)`` returns (stop - start, units, h, w) for ``patch_ids[start:stop]``.
    ``identity`` names what is dissected: model_digest, layer, patch_set, patch_set_digest, split.
    """

    patch_ids: np.ndarray
    activations: Callable[[int, int], torch.Tensor]
    identity: dict[str, Any]
    batch_size: int = DEFAULT_BATCH_SIZE
    extra: dict[str, Any] = field(default_factory=dict)


def model_source(ws: Workspace, loaded: Any, *, patch_set: str = "default", split: str | None = "test",
                 layer: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> ActivationSource:
    """Activations of ``layer`` (default: the checkpoint's dissected layer) of a loaded checkpoint
    over the patches of ``split`` (None: all) of a workspace patch set, ordered by patch id."""
    from models.features import capture, get_layer
    from workspace.data.patches import open_patch_set

    layer = layer or loaded.dissected_layer
    get_layer(loaded.model, layer)    # a clear ModelError for an unknown layer, before any work
    pset = open_patch_set(ws, patch_set)    # a clear PatchError for an unknown patch set
    rows = [r for r in pset.rows if split is None or r["split"] == split]
    if not rows:
        raise DissectionError(f"patch set {patch_set!r} has no patches in split {split!r}")
    rows.sort(key=lambda r: r["patch_id"])
    patch_ids = np.array([r["patch_id"] for r in rows], dtype=np.int64)
    indices = [int(r["array_index"]) for r in rows]
    model = loaded.model

    def activations(start: int, stop: int) -> torch.Tensor:
        x = pset.batch(indices[start:stop])
        with torch.inference_mode(), capture(model, layer) as tap:
            model(loaded.preprocess(x))
        return tap.output

    identity = {"model_digest": loaded.digest, "layer": layer, "patch_set": patch_set,
                "patch_set_digest": pset.digest, "split": split or "all"}
    extra = {"model_path": str(loaded.path), "architecture": loaded.meta.get("architecture"),
             "patch_size": int(pset.size), "device": str(getattr(loaded, "device", "cpu")),
             # what the patches are: the paper's labelled lesion/normal set, or an unlabelled tissue grid
             "patch_source": pset.params.get("source", "lesion and normal patches (the paper's recipe)")}
    return ActivationSource(patch_ids, activations, identity, batch_size, extra)


# ---------------------------------------------------------------------------------------------
# the run folder
# ---------------------------------------------------------------------------------------------
@dataclass
class DissectionRun:
    """A finished run (read-only). Arrays load lazily from the folder."""

    run_id: str
    path: Path
    manifest: dict[str, Any]
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def _array(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = np.load(self.path / f"{name}.npy")
        return self._cache[name]

    @property
    def max_activations(self) -> np.ndarray:
        return self._array("max_activations")

    @property
    def patch_ids(self) -> np.ndarray:
        return self._array("patch_ids")

    @property
    def top_k(self) -> np.ndarray:
        return self._array("top_k")

    @property
    def top_k_values(self) -> np.ndarray:
        return self._array("top_k_values")

    @property
    def thresholds(self) -> np.ndarray:
        return self._array("thresholds")

    @property
    def pca(self) -> np.ndarray:
        return self._array("pca")

    @property
    def explained_variance(self) -> np.ndarray:
        """sklearn's ``explained_variance_`` of the 2 components (variance along each)."""
        return self._array("explained_variance")

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        return self._array("explained_variance_ratio")

    @property
    def model_digest(self) -> str:
        return self.manifest["model_digest"]

    @property
    def layer(self) -> str:
        return self.manifest["layer"]

    @property
    def n_units(self) -> int:
        return int(self.manifest["n_units"])


def run_config(identity: dict[str, Any], quantile: float, top_k: int, plan_key: dict[str, Any]) -> dict[str, Any]:
    return {**identity, "quantile": float(quantile), "top_k": int(top_k), **plan_key}


def make_run_id(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha1(blob.encode()).hexdigest()[:10]
    layer = "".join(c if c.isalnum() or c in "._-" else "_" for c in str(config["layer"]))
    return f"{str(config['model_digest'])[:8]}-{layer}-{config['split']}-{digest}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems do not allow fsync on a folder; the rename is still atomic
        pass


def _record(ws: Workspace, row: dict[str, Any]) -> None:
    from workspace.base.catalog import open_catalog

    db = open_catalog(ws)
    db["dissection_runs"].upsert(row, pk="run_id")


def load_run(ws: Workspace, run_id: str) -> DissectionRun:
    """A finished run by id, or a :class:`CatalogError`."""
    path = ws.runs_dir / run_id
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CatalogError(f"no finished dissection run {run_id!r} under {ws.runs_dir}")
    return DissectionRun(run_id, path, json.loads(manifest_path.read_text()))


def latest_run(ws: Workspace, model_digest: str | None = None, layer: str | None = None) -> DissectionRun | None:
    """The most recently finished run (of this model and layer when given), or None
    (:func:`workspace.base.catalog.complete_runs` orders them)."""
    from workspace.base.catalog import complete_runs, open_catalog

    db = open_catalog(ws)
    try:  # closed here: the backend and the App call this from long-lived processes
        rows = complete_runs(db, model_digest, layer)
    finally:
        db.conn.close()
    for row in rows:
        if (ws.runs_dir / row["run_id"] / MANIFEST).is_file():
            return load_run(ws, row["run_id"])
    return None


def run_or_newest(ws: Workspace, run_id: str | None = None) -> DissectionRun:
    """The run ``run_id``, else the newest finished run of any model: the run the Label Studio backend,
    the FiftyOne datasets and the reports all answer with when none is named."""
    if run_id:
        return load_run(ws, run_id)
    run = latest_run(ws)
    if run is None:
        raise CatalogError("no complete dissection run in this workspace: run `mammo dissect` first")
    return run


def list_runs(ws: Workspace) -> list[dict[str, Any]]:
    from workspace.base.catalog import open_catalog

    return [dict(r) for r in open_catalog(ws).query("SELECT * FROM dissection_runs ORDER BY created_at")]


@dataclass
class PreparedRun:
    """A run about to be computed: its configuration and id, its catalog row and folders, the statistics
    sized from the first batch (resumed from the last checkpoint when there is one)."""

    run_id: str
    config: dict[str, Any]
    row: dict[str, Any]
    partial: Path
    final: Path
    stats: DissectionStats
    first: torch.Tensor | None    # the first batch's activations (the single pass uses them)
    position: int                 # patches the statistics already hold (a resumed run)
    created_at: str
    started: float
    forward_s: float


def prepare_run(ws: Workspace, source: ActivationSource, *, quantile: float = DEFAULT_QUANTILE,
                top_k: int = DEFAULT_TOP_K, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
                device: torch.device | str | None = None,
                sketch_capacity: int | None = None) -> PreparedRun | DissectionRun:
    """Check the request, size the statistics from the first batch and name the run: the finished
    :class:`DissectionRun` when it exists, else a :class:`PreparedRun` (recorded as ``running``)."""
    if not 0.0 < quantile < 1.0:
        raise DissectionError(f"--quantile must be strictly between 0 and 1, got {quantile}")
    if top_k < 1:
        raise DissectionError(f"--top-k must be at least 1, got {top_k}")
    if memory_budget_mb <= 0:
        raise DissectionError(f"--memory-budget-mb must be positive, got {memory_budget_mb}")
    ids = np.asarray(source.patch_ids, dtype=np.int64)
    n = int(ids.size)
    if n == 0:
        raise DissectionError("no patches to dissect")
    if np.unique(ids).size != n:
        raise DissectionError("the patch list repeats a patch id")
    bs = max(1, int(source.batch_size))

    started = time.perf_counter()
    first = source.activations(0, min(bs, n))
    forward_s = time.perf_counter() - started
    stats = DissectionStats.for_batch(first, n, quantile=quantile, top_k=top_k,
                                      memory_budget_mb=memory_budget_mb, device=device,
                                      sketch_capacity=sketch_capacity)
    plan_key = {"quantile_method": stats.plan["method"], "sketch_capacity": stats.plan.get("sketch_capacity")}
    config = run_config(source.identity, quantile, top_k, plan_key)
    run_id = make_run_id(config)
    final = ws.runs_dir / run_id
    partial = ws.runs_dir / f".partial-{run_id}"
    row = {"run_id": run_id, "model_digest": source.identity["model_digest"], "layer": source.identity["layer"],
           "patch_set": source.identity["patch_set"], "patch_set_digest": source.identity["patch_set_digest"],
           "quantile": float(quantile), "top_k": int(top_k), "n_units": stats.n_units, "n_patches": n,
           "path": stored_path(ws, final)}

    if (final / MANIFEST).is_file():   # immutable: the same request finds the finished run
        run = load_run(ws, run_id)
        _record(ws, {**row, "status": "complete", "manifest": json.dumps(run.manifest),
                     "created_at": run.manifest.get("created_at", utc_now()),
                     "finished_at": run.manifest.get("finished_at", utc_now())})
        return run

    partial.mkdir(parents=True, exist_ok=True)
    state_path = partial / "state.pt"
    position = 0
    created_at = utc_now()
    if state_path.is_file():
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        if saved.get("config") == config:
            stats = DissectionStats.from_state_dict(saved["stats"], stats.device)
            position = int(saved["position"])
            created_at = saved.get("created_at", created_at)
    _record(ws, {**row, "status": "running", "manifest": None, "created_at": created_at, "finished_at": None})
    return PreparedRun(run_id, config, row, partial, final, stats, first, position, created_at, started, forward_s)


def execute_run(ws: Workspace, source: ActivationSource, *, quantile: float = DEFAULT_QUANTILE,
                top_k: int = DEFAULT_TOP_K, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
                checkpoint_every_s: float = CHECKPOINT_EVERY_S, device: torch.device | str | None = None,
                sketch_capacity: int | None = None) -> DissectionRun:
    """Run (or resume, or find) the dissection of ``source`` in one pass here and return the finished run.
    ``sketch_capacity`` forces the quantile sketch (else: exact when it fits ``memory_budget_mb``)."""
    prepared = prepare_run(ws, source, quantile=quantile, top_k=top_k, memory_budget_mb=memory_budget_mb,
                           device=device, sketch_capacity=sketch_capacity)
    if isinstance(prepared, DissectionRun):
        return prepared
    ids = np.asarray(source.patch_ids, dtype=np.int64)
    n, bs = int(ids.size), max(1, int(source.batch_size))
    stats, position, first = prepared.stats, prepared.position, prepared.first
    resumed_from, forward_s, stats_s = position, prepared.forward_s, 0.0
    state_path = prepared.partial / "state.pt"

    def checkpoint(pos: int) -> None:
        tmp = prepared.partial / "state.pt.tmp"
        torch.save({"config": prepared.config, "position": pos, "created_at": prepared.created_at,
                    "stats": stats.state_dict()}, tmp)
        _fsync_file(tmp)
        os.replace(tmp, state_path)

    last_checkpoint = time.perf_counter()
    bar = progress(total=n, desc=f"dissect {source.identity['layer']}", unit="patch")
    bar.update(position)
    try:
        while position < n:
            stop = min(position + bs, n)
            if position == 0 and first is not None:
                acts = first
            else:
                t = time.perf_counter()
                acts = source.activations(position, stop)
                forward_s += time.perf_counter() - t
            first = None
            t = time.perf_counter()
            stats.add(acts, ids[position:stop])
            stats_s += time.perf_counter() - t
            bar.update(stop - position)
            position = stop
            if position < n and time.perf_counter() - last_checkpoint >= checkpoint_every_s:
                checkpoint(position)
                last_checkpoint = time.perf_counter()
    finally:
        bar.close()
    return finish_run(ws, source, prepared, stats, timing={"forward_s": forward_s, "statistics_s": stats_s,
                                                           "resumed_from_patch": resumed_from})


def finish_run(ws: Workspace, source: ActivationSource, prepared: PreparedRun, stats: DissectionStats, *,
               timing: dict[str, Any], execution: dict[str, Any] | None = None) -> DissectionRun:
    """Write the statistics of all of ``source``'s patches as the finished run folder (the atomic rename
    of the module docstring) and record it; ``execution`` says how it was computed (default: one pass)."""
    ids = np.asarray(source.patch_ids, dtype=np.int64)
    n, partial, final = int(ids.size), prepared.partial, prepared.final
    t = time.perf_counter()
    results = stats.results()
    finish_s = time.perf_counter() - t
    if results["patch_ids"].size != n or not np.array_equal(results["patch_ids"], np.sort(ids)):
        raise DissectionError("the statistics do not cover exactly the requested patches")
    for name in ARRAYS:
        np.save(partial / f"{name}.npy", results[name])
    finished_at = utc_now()
    manifest = {
        "run_id": prepared.run_id, **source.identity,
        "quantile": stats.quantile, "top_k": stats.k,
        "n_units": stats.n_units, "n_patches": n, "map_shape": list(stats.map_shape),
        "thresholds": stats.quantile_report(),
        "align_corners": ALIGN_CORNERS, "mask_rule": f"upsampled map {MASK_RULE} threshold",
        "pca": {"components": 2, "explained_variance": results["explained_variance"].tolist(),
                "explained_variance_ratio": results["explained_variance_ratio"].tolist()},
        "timing": {"elapsed_s": round(time.perf_counter() - prepared.started, 3),
                   "forward_s": round(float(timing.get("forward_s", 0.0)), 3),
                   "statistics_s": round(float(timing.get("statistics_s", 0.0)), 3), "finish_s": round(finish_s, 3),
                   "resumed_from_patch": int(timing.get("resumed_from_patch", 0))},
        "execution": execution or {"mode": "single pass"},
        "arrays": {name: f"{name}.npy" for name in ARRAYS},
        "source": source.extra,
        "versions": {"mammo_dissect": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "created_at": prepared.created_at, "finished_at": finished_at,
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, default=json_default))
    (partial / "state.pt").unlink(missing_ok=True)
    for item in list(partial.iterdir()):
        if item.is_dir():      # working folders of a sharded run (its shards' statistics, merged above)
            shutil.rmtree(item)
        else:
            _fsync_file(item)
    _fsync_dir(partial)
    if final.exists():        # a stale folder without a manifest (cannot happen through this code)
        shutil.rmtree(final)
    os.rename(partial, final)
    _fsync_dir(ws.runs_dir)
    _record(ws, {**prepared.row, "status": "complete", "manifest": json.dumps(manifest, default=json_default),
                 "created_at": prepared.created_at, "finished_at": finished_at})
    return load_run(ws, prepared.run_id)


def run_dissection(ws: Workspace, loaded: Any, *, patch_set: str = "default", split: str | None = "test",
                   layer: str | None = None, quantile: float = DEFAULT_QUANTILE, top_k: int = DEFAULT_TOP_K,
                   memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, batch_size: int = DEFAULT_BATCH_SIZE,
                   checkpoint_every_s: float = CHECKPOINT_EVERY_S) -> DissectionRun:
    """Dissect ``layer`` of a loaded checkpoint over a patch set split (the ``mammo dissect`` command). The
    model is registered in the catalog with its load options, so every surface can open the run's model."""
    from models.checkpoint import register_model
    from workspace.base.catalog import open_catalog

    db = open_catalog(ws)
    try:
        register_model(db, loaded)
    finally:
        db.conn.close()
    source = model_source(ws, loaded, patch_set=patch_set, split=split, layer=layer, batch_size=batch_size)
    return execute_run(ws, source, quantile=quantile, top_k=top_k, memory_budget_mb=memory_budget_mb,
                       checkpoint_every_s=checkpoint_every_s, device=getattr(loaded, "device", None))


__all__ = ["DEFAULT_MEMORY_BUDGET_MB", "DissectionError", "DissectionStats", "DissectionRun", "ActivationSource",
           "PreparedRun", "plan_quantile", "dissect_batches", "model_source", "prepare_run", "execute_run",
           "finish_run", "run_dissection", "load_run",
           "latest_run", "run_or_newest", "list_runs", "make_run_id"]
