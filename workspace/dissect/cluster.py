"""Dissection and reads on a Ray cluster: ``mammo dissect --ray [ADDRESS]``, ``mammo read --all --ray``.

**Dissection.** The patch list (ordered by patch id, as in the single pass) is cut into shards on batch
boundaries, so every forward pass sees the same patches as in the single pass. Each shard is a call on a
Ray actor that loaded the model once (one actor per GPU when the cluster has GPUs, else one per CPU
share) and returns mergeable statistics (:class:`workspace.dissect.dissect_run.DissectionStats`) sized
by the plan the driver made from the first batch: every worker keeps the single pass's memory bound.
The driver stores each finished shard's statistics in the run's partial folder (a driver started again
skips them) and merges them in shard order into the same immutable run folder a single pass writes
(:func:`workspace.dissect.dissect_run.finish_run`). The merges are exact (maxima ordered by patch id,
top-k ties broken by patch id, the exact tail buffer keeps the exact order statistics), so the run
equals the single pass bit for bit for any shard count; under the quantile sketch (a budget too small
for the exact buffer) the thresholds are within the sketch's stated rank error instead.

A worker that dies is restarted by Ray and its shard is computed again from the start (actors are
created with ``max_restarts`` and ``max_task_retries``); a shard's statistics reach the driver only
when the shard is complete, so nothing half-finished is merged, and the run folder appears only at the
end (the single pass's atomic rename).

**Reads.** ``read_many_on_ray`` shards the image list the same way: workers read (writing the read
caches into the workspace) and return what the catalog records; the driver alone writes the catalog.

**Storage.** Workers open the workspace by path: the workspace (patch sets, models inside it, read
caches) must be on storage every node mounts. ``worker_root`` names the path the workers see when it
differs from the driver's; the catalog stores paths relative to the workspace, so a workspace moved or
mounted elsewhere keeps working. Shard progress files (``shards/<k>.progress``: pid, host, patches
done) let the driver show progress and let an operator see which process holds which shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workspace.base.config import Workspace
from workspace.base.errors import MammoError
from workspace.base.progress import progress

RAY_MISSING = "Ray is not installed: pip install 'mammo-dissect[ray]'"
MAX_RESTARTS = 3          # per actor: Ray restarts a dead worker and retries its call this many times
POLL_S = 0.25


class ClusterError(MammoError):
    """No Ray, no cluster at the address, or a shard that failed after Ray's retries."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ClusterError(RAY_MISSING) from None
    return ray


@contextlib.contextmanager
def cluster(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, connected: to the cluster at ``address`` ("auto", "HOST:PORT", "ray://HOST:PORT"), to the one
    this process already joined, or to a local cluster started here (``num_cpus``) and stopped after."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=num_cpus, **options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ClusterError(f"cannot join the Ray cluster at {address or 'a new local cluster'}: {error}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class WorkerPlan:
    """How many actors, and what each asks of the cluster."""

    workers: int
    num_cpus: float
    num_gpus: float

    @classmethod
    def for_cluster(cls, ray: Any, wanted: int | None, tasks: int) -> WorkerPlan:
        """At most one actor per task."""
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        if gpus:   # one actor per GPU
            workers = min(wanted or gpus, gpus, max(tasks, 1))
            return cls(workers, 1, 1)
        workers = min(wanted or cpus, max(tasks, 1))
        return cls(workers, max(1, cpus // workers) if workers <= cpus else 1, 0)

    def threads(self) -> int:
        return max(1, int(self.num_cpus))


def shard_bounds(n: int, shards: int, batch_size: int) -> list[tuple[int, int]]:
    """``shards`` contiguous [start, stop) ranges of ``n`` items, cut on multiples of ``batch_size`` (at
    most one shard per batch), as even as the batches allow."""
    batches = math.ceil(n / batch_size)
    shards = max(1, min(shards, batches))
    cuts = [min(n, (k * batches // shards) * batch_size) for k in range(shards + 1)]
    return [(cuts[k], cuts[k + 1]) for k in range(shards)]


def default_shards(n: int, n_units: int, workers: int, memory_budget_mb: float) -> int:
    """At least one shard per worker, more when a shard's max-activation columns (units x patches x 4 bytes)
    would take more than a quarter of the memory budget."""
    per_shard = max(1, int(memory_budget_mb * 2**20 / 4 / (4 * max(n_units, 1))))
    return max(workers, math.ceil(n / per_shard))


def ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the driver's model: the file (relative to the workspace when inside it),
    the options it was loaded with, the layer, and the digest to check."""

    path: str
    options: dict[str, Any]
    layer: str
    digest: str

    @classmethod
    def of(cls, ws: Workspace, loaded: Any, layer: str | None = None) -> ModelSpec:
        from workspace.data.ingest import stored_path

        return cls(stored_path(ws, Path(loaded.path)), dict(loaded.load_options),
                   layer or loaded.dissected_layer, loaded.digest)

    def load(self, ws: Workspace, device: Any = None) -> Any:
        from models.checkpoint import load_checkpoint
        from workspace.data.ingest import resolve_path

        classes = {k: self.options[k] for k in ("class_names", "positive_class") if k in self.options}
        loaded = load_checkpoint(resolve_path(ws, self.path), device=device, arch=self.options.get("arch"),
                                 layer=self.layer, trust=bool(self.options.get("trust")), meta=classes or None)
        if loaded.digest != self.digest:
            raise ClusterError(f"a worker found model {loaded.digest} at {self.path}, not the driver's {self.digest}: "
                               "is the workspace on storage every node mounts?")
        return loaded


def _write_progress(path: Path, **fields: Any) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(fields))
    os.replace(tmp, path)


def read_progress(folder: Path) -> dict[int, dict]:
    """Shard number -> its last progress record (``pid``, ``host``, ``done``, ``total``)."""
    found = {}
    for path in folder.glob("*.progress"):
        with contextlib.suppress(OSError, ValueError):
            found[int(path.stem)] = json.loads(path.read_text())
    return found


class _Worker:
    """One Ray actor's process. Started before the driver has loaded its model (its start-up, imports
    included, overlaps the driver's), it gets the model's :class:`ModelSpec` with each call, loads the
    model on the first call that names it and keeps it for the next."""

    def __init__(self, root: str, threads: int):
        import torch

        import models.checkpoint  # noqa: F401  (the first call's imports, done while the driver starts)
        import models.device  # noqa: F401

        torch.set_num_threads(threads)
        self.ws = Workspace.open(root, create=False)
        self.spec: ModelSpec | None = None
        self.loaded: Any = None

    def model(self, spec: ModelSpec) -> Any:
        """The model ``spec`` names, on this actor's GPU when Ray gave it one."""
        from models.device import pick_device

        if spec != self.spec:
            self.loaded, self.spec = spec.load(self.ws, pick_device()), spec
        return self.loaded


class _DissectWorker(_Worker):
    """``dissect`` computes one shard; the patch set is opened once per model and request."""

    def __init__(self, root: str, threads: int):
        import workspace.dissect.dissect_run  # noqa: F401

        super().__init__(root, threads)
        self.source: Any = None
        self.source_key: tuple | None = None

    def dissect(self, spec: ModelSpec, source: dict, shard: int, start: int, stop: int, expected_ids: str,
                plan: dict, quantile: float, top_k: int, n_units: int, map_shape: list[int],
                progress_dir: str) -> dict:
        """Statistics of patches [start, stop) of the patch set ``source`` names (``patch_set``, ``split``,
        ``batch_size``); ``progress_dir``: relative to the workspace."""
        from workspace.dissect.dissect_run import DissectionStats, model_source

        loaded = self.model(spec)
        key = (spec, sorted(source.items()))
        if key != self.source_key:
            self.source = model_source(self.ws, loaded, layer=spec.layer, **source)
            self.source_key = key
        ids = self.source.patch_ids
        if ids_digest(ids) != expected_ids:
            raise ClusterError("a worker sees other patches than the driver (the patch set changed, or the "
                               "workers' workspace is another one)")
        stats = DissectionStats(n_units, tuple(map_shape), plan, quantile, top_k, loaded.device,
                                n_patches=stop - start)
        record = self.ws.root / progress_dir / f"{shard}.progress"
        who = {"pid": os.getpid(), "host": socket.gethostname(), "total": stop - start}
        _write_progress(record, done=0, **who)
        forward_s = stats_s = 0.0
        bs = max(1, int(self.source.batch_size))
        for position in range(start, stop, bs):
            end = min(position + bs, stop)
            t = time.perf_counter()
            acts = self.source.activations(position, end)
            forward_s += time.perf_counter() - t
            t = time.perf_counter()
            stats.add(acts, ids[position:end])
            stats_s += time.perf_counter() - t
            _write_progress(record, done=end - start, **who)
        return {"state": stats.to_("cpu").state_dict(), "forward_s": forward_s, "statistics_s": stats_s, **who}


class _ReadWorker(_Worker):
    """``read`` reads whole images: it writes the read caches, the driver writes the catalog."""

    def __init__(self, root: str, threads: int):
        import models.inference  # noqa: F401

        super().__init__(root, threads)

    def read(self, spec: ModelSpec, shard: int, image_ids: list[str], options: dict, progress_dir: str) -> dict:
        from dataclasses import replace

        from models.inference import read_mammogram
        from workspace.base.catalog import open_catalog
        from workspace.base.schema import utc_now
        from workspace.data.ingest import stored_path

        loaded = self.model(spec)
        record = self.ws.root / progress_dir / f"{shard}.progress"
        who = {"pid": os.getpid(), "host": socket.gethostname(), "total": len(image_ids)}
        out: list[dict] = []
        db = open_catalog(self.ws)
        try:
            for done, image_id in enumerate(image_ids, 1):
                try:
                    read = read_mammogram(self.ws, image_id, loaded, db=db, record=False, **options)
                    # the maps stay in the cache on shared storage; the path travels relative to the workspace
                    out.append({"read": replace(read, maps=None, cache_path=Path(stored_path(self.ws, read.cache_path))),
                                "created_at": utc_now()})
                except MammoError as error:
                    out.append({"error": (image_id, str(error))})
                _write_progress(record, done=done, **who)
        finally:
            db.conn.close()
        return {"results": out, **who}


def _batches(ws: Workspace, patch_set: str, split: str | None, batch_size: int | None) -> int:
    """The run's batches, counted from the patch set alone (before the model is loaded, so without torch)."""
    from workspace.data.patches import DEFAULT_BATCH_SIZE, open_patch_set

    n = sum(1 for r in open_patch_set(ws, patch_set).rows if split is None or r["split"] == split)
    return math.ceil(n / (batch_size or DEFAULT_BATCH_SIZE))


def _finished(prepared: Any) -> bool:
    from workspace.dissect.dissect_run import DissectionRun

    return isinstance(prepared, DissectionRun)


def _stop(ray: Any, actors: list) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)


def _actor_class(ray: Any, worker: type, plan: WorkerPlan) -> Any:
    return ray.remote(worker).options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=MAX_RESTARTS,
                                      max_task_retries=MAX_RESTARTS)


def _drive(ray: Any, actors: list, calls: list[tuple[int, tuple]], method: str, on_done: Any,
           bar: Any, progress_dir: Path | None) -> None:
    """Run ``calls`` ((key, args)) over ``actors``, one in flight per actor, handing each result to
    ``on_done(key, result)`` as it arrives; the progress bar follows the shards' progress files."""
    queue = list(calls)
    pending: dict[Any, tuple[int, Any]] = {}

    def submit(actor: Any) -> None:
        if queue:
            key, args = queue.pop(0)
            pending[getattr(actor, method).remote(*args)] = (key, actor)

    for actor in actors:
        submit(actor)
    finished: dict[int, int] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
        for ref in ready:
            key, actor = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as error:  # the call's own error (RayTaskError), or RayActorError once Ray's
                cause = getattr(error, "cause", None) or error   # restarts of a dead worker are spent
                raise ClusterError(f"shard {key} failed on the cluster: {str(cause).splitlines()[0]}") from None
            finished[key] = int(result.get("total", 1))
            on_done(key, result)
            submit(actor)
        if progress_dir is not None:
            running = read_progress(progress_dir)
            done = sum(finished.values()) + sum(int(r.get("done", 0)) for k, r in running.items()
                                                 if k not in finished)
            bar.update(max(0, done - bar.n))
        else:
            bar.update(max(0, sum(finished.values()) - bar.n))


def dissect_on_ray(ws: Workspace, loaded: Any, *, patch_set: str = "default", split: str | None = "test",
                   layer: str | None = None, quantile: float | None = None, top_k: int | None = None,
                   memory_budget_mb: float | None = None, batch_size: int | None = None,
                   address: str | None = None, workers: int | None = None, shards: int | None = None,
                   worker_root: str | os.PathLike | None = None, num_cpus: int | None = None) -> Any:
    """``mammo dissect --ray``: the run :func:`workspace.dissect.dissect_run.run_dissection` writes, computed
    by shards on a Ray cluster (see the module docstring). ``loaded``: the model, or a function that loads
    it. ``address``: None starts a local cluster (``num_cpus``), "auto" or an address joins one; ``workers``:
    actors (default one per GPU, else one per CPU); ``shards``: default :func:`default_shards`;
    ``worker_root``: the workspace as workers see it."""
    root = str(worker_root or ws.root)

    def prepare() -> tuple[Any, Any, Any]:
        """The model, the patch set, and the run's statistics sized from its first batch with the run's id
        (or the finished run). Here torch is imported: a driver joining a cluster has started its workers."""
        nonlocal quantile, top_k, memory_budget_mb, batch_size
        from models.checkpoint import register_model
        from workspace.base.catalog import open_catalog
        from workspace.dissect import dissect_run as dr
        from workspace.dissect.dissection import DEFAULT_QUANTILE, DEFAULT_TOP_K

        quantile = DEFAULT_QUANTILE if quantile is None else quantile
        top_k = DEFAULT_TOP_K if top_k is None else top_k
        memory_budget_mb = dr.DEFAULT_MEMORY_BUDGET_MB if memory_budget_mb is None else memory_budget_mb
        batch_size = dr.DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        model = loaded() if callable(loaded) else loaded
        db = open_catalog(ws)
        try:
            register_model(db, model)
        finally:
            db.conn.close()
        source = dr.model_source(ws, model, patch_set=patch_set, split=split, layer=layer, batch_size=batch_size)
        return model, source, dr.prepare_run(ws, source, quantile=quantile, top_k=top_k,
                                             memory_budget_mb=memory_budget_mb, device="cpu")

    # joining a running cluster is quick, so its actors start (a process, torch) while this process loads the
    # model and sizes the run; before starting a local cluster, the run is sized first (a finished run needs
    # no cluster)
    joining = address is not None or _ray().is_initialized()
    model, source, prepared = (None, None, None) if joining else prepare()
    if prepared is not None and _finished(prepared):
        return prepared
    with cluster(address, num_cpus=num_cpus) as ray:
        plan = WorkerPlan.for_cluster(ray, workers, shards or _batches(ws, patch_set, split, batch_size))
        actors = [_actor_class(ray, _DissectWorker, plan).remote(root, plan.threads()) for _ in range(plan.workers)]
        if prepared is None:
            try:
                model, source, prepared = prepare()
            except BaseException:
                with contextlib.suppress(Exception):   # the error to report is prepare's
                    _stop(ray, actors)
                raise
        if _finished(prepared):   # no actor is needed
            _stop(ray, actors)
            return prepared
        n = len(source.patch_ids)
        spec = ModelSpec.of(ws, model, source.identity["layer"])
        stats = prepared.stats
        shard_dir = prepared.partial / "shards"
        shard_dir.mkdir(exist_ok=True)
        count = shards or default_shards(n, stats.n_units, plan.workers, memory_budget_mb)
        bounds = shard_bounds(n, count, batch_size)
        key = {"config": prepared.config, "bounds": bounds}
        saved = {k for k in range(len(bounds)) if _saved_shard(shard_dir, k, key) is not None}
        todo = [k for k in range(len(bounds)) if k not in saved]
        if len(todo) < len(actors):
            _stop(ray, actors[len(todo):])
            actors = actors[:len(todo)]
            plan = dataclasses.replace(plan, workers=len(actors))
        bar = progress(total=n, desc=f"dissect {source.identity['layer']} on Ray ({plan.workers} workers, "
                                     f"{len(bounds)} shards)", unit="patch")
        bar.update(sum(bounds[k][1] - bounds[k][0] for k in saved))
        timing = {"forward_s": prepared.forward_s, "statistics_s": 0.0}   # the driver's sizing batch too
        hosts: set[str] = set()
        pids: dict[int, int] = {}

        def keep(k: int, result: dict) -> None:
            _save_shard(shard_dir, k, key, result["state"])
            timing["forward_s"] += result["forward_s"]
            timing["statistics_s"] += result["statistics_s"]
            hosts.add(result["host"])
            pids[k] = result["pid"]

        try:
            if todo:
                ids = ids_digest(source.patch_ids)
                where = {"patch_set": patch_set, "split": split, "batch_size": batch_size}
                calls = [(k, (spec, where, k, *bounds[k], ids, stats.plan, quantile, top_k, stats.n_units,
                              list(stats.map_shape), os.path.relpath(shard_dir, ws.root))) for k in todo]
                _drive(ray, actors, calls, "dissect", keep, bar, shard_dir)
        finally:
            bar.close()
    from workspace.dissect import dissect_run as dr

    t = time.perf_counter()
    for k in range(len(bounds)):   # in shard order, one shard in memory at a time
        stats.merge(dr.DissectionStats.from_state_dict(_saved_shard(shard_dir, k, key), "cpu"))
    timing["statistics_s"] += time.perf_counter() - t
    execution = {"mode": "ray", "address": address or "local", "workers": plan.workers if todo else 0,
                 "gpus_per_worker": plan.num_gpus, "shards": len(bounds), "shards_resumed": len(saved),
                 "hosts": sorted(hosts), "shard_pids": {str(k): pid for k, pid in sorted(pids.items())}}
    return dr.finish_run(ws, source, prepared, stats, timing={**timing,
                                                              "resumed_from_patch": sum(bounds[k][1] - bounds[k][0]
                                                                                        for k in saved)},
                         execution=execution)


def read_many_on_ray(ws: Workspace, image_ids: list[str], loaded: Any, *, address: str | None = None,
                     workers: int | None = None, shards: int | None = None,
                     worker_root: str | os.PathLike | None = None, num_cpus: int | None = None,
                     **options: Any) -> Any:
    """``mammo read --all --ray``: :func:`models.inference.read_many` on a Ray cluster. Workers read shards of
    the image list (``shards``, default four per worker) into the workspace's read caches; the driver
    records them in the catalog in image order. A bad image is reported and the rest go on."""
    import shutil
    import uuid

    from models.inference import ReadSummary, record_read
    from workspace.base.catalog import open_catalog
    from workspace.data.ingest import resolve_path

    ids = list(dict.fromkeys(image_ids))
    if not ids:
        return ReadSummary(reads=[], errors=[])
    spec = ModelSpec.of(ws, loaded)
    progress_dir = ws.root / "cache" / "ray" / f"reads-{uuid.uuid4().hex[:12]}"
    progress_dir.mkdir(parents=True)
    results: dict[int, list[dict]] = {}
    try:
        with cluster(address, num_cpus=num_cpus) as ray:
            plan = WorkerPlan.for_cluster(ray, workers, len(ids))
            bounds = shard_bounds(len(ids), shards or 4 * plan.workers, 1)
            bar = progress(total=len(ids), desc=f"reading on Ray ({plan.workers} workers)", unit="image")
            try:
                actor = _actor_class(ray, _ReadWorker, plan)
                actors = [actor.remote(str(worker_root or ws.root), plan.threads()) for _ in range(plan.workers)]
                calls = [(k, (spec, k, ids[a:b], options, os.path.relpath(progress_dir, ws.root)))
                         for k, (a, b) in enumerate(bounds)]
                _drive(ray, actors, calls, "read", lambda k, r: results.__setitem__(k, r["results"]), bar,
                       progress_dir)
            finally:
                bar.close()
    finally:
        shutil.rmtree(progress_dir, ignore_errors=True)
    reads, errors = [], []
    db = open_catalog(ws)
    try:
        for k in sorted(results):
            for item in results[k]:
                if "error" in item:
                    errors.append(item["error"])
                    continue
                read = item["read"]
                read.cache_path = resolve_path(ws, str(read.cache_path))
                if not read.cached:
                    record_read(ws, db, read, loaded, item["created_at"])
                reads.append(read)
    finally:
        db.conn.close()
    return ReadSummary(reads=reads, errors=errors)


def _save_shard(folder: Path, k: int, key: dict, state: dict) -> None:
    import torch

    tmp = folder / f"{k}.pt.tmp"
    torch.save({"key": json.dumps(key, sort_keys=True, default=str), "state": state}, tmp)
    os.replace(tmp, folder / f"{k}.pt")


def _saved_shard(folder: Path, k: int, key: dict) -> dict | None:
    import torch

    path = folder / f"{k}.pt"
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved["state"] if saved.get("key") == json.dumps(key, sort_keys=True, default=str) else None


__all__ = ["ClusterError", "RAY_MISSING", "cluster", "WorkerPlan", "shard_bounds", "default_shards", "ModelSpec",
           "read_progress", "dissect_on_ray", "read_many_on_ray"]
