"""Build and refresh the two FiftyOne datasets of a dissection run (``mammo fiftyone sync``).

* **patches** (``<prefix>-patches``): one sample per patch of the run. ``filepath`` is the patch
  thumbnail; fields ``patch_id``, ``image_id``, ``x``, ``y``, ``size`` (normalised orientation),
  ``split``, ``ground_truth`` (Classification lesion | normal | unlabelled), ``prediction`` (Classification with
  the model's P(possibly malignant) as confidence) and ``score``, ``max_activations`` (one float per
  unit: ``view.sort_by(F("max_activations")[u], reverse=True)``), ``top_units`` (the 5 units most
  active relative to their threshold), ``activation`` (Heatmap of the most active unit's map) and
  ``unit_masks`` (Detections: one per unit that has this patch among its top-k, its thresholded
  mask, attributes ``unit``, ``rank``, ``activation``), ``outside_domain`` and ``domain_warning`` (the
  patch's image against the model's training domain, :mod:`workspace.data.domain`).
* **neurons** (``<prefix>-neurons``): one sample per unit. ``filepath`` is a montage of the unit's
  top-k patches (best first) with its mask outlined on each; fields ``unit``, ``pca`` ([x, y]),
  ``pca_x``, ``pca_y``, ``threshold``, ``top_patch_ids``, ``top_activations``, ``lesion_share``
  (lesion patches among the top-k) and ``concept`` (Classification copied from the concept store).
* **reads** (``<prefix>-reads``): one sample per mammogram the run's model has read (``mammo read``, the
  backend); ``filepath`` is the display image; fields ``image_id``, ``dataset``, ``laterality``, ``view``,
  ``score`` and ``prediction`` (the image's P(possibly malignant)), ``suspicious`` (Detections: the
  patches at or above the operating point, with their scores), ``n_patches``, ``n_suspicious``,
  ``outside_domain`` and ``domain_warning``. Rebuilt whenever the set of reads changes.

The concept store stays the source of truth: :func:`refresh_concepts` copies its labels into the
neurons dataset, writing only samples whose concept changed. Both datasets record the workspace,
run and dataset names and the model card in ``info["mammo"]`` (the card's summary is also the datasets'
description); a second :func:`sync` of the same run writes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fiftyone_plugins import DEFAULT_PREFIX, dataset_names, media, reads_dataset_name
from workspace.base.config import Workspace
from workspace.base.errors import MammoError
from workspace.base.progress import progress

SYNC_VERSION = 2
N_TOP_UNITS = 5
MASK_SIZE = 64          # resolution of the stored per-unit masks (the App scales them to the patch)
DEFAULT_OPERATING_POINT = 0.5
GROUND_TRUTH = {1: "lesion", 0: "normal"}  # patches.label; an unlabelled tissue-grid patch is "unlabelled"
FRAME_COLOURS = {1: media.LESION_COLOUR, 0: media.NORMAL_COLOUR}

# reader(patch_ids) yields (patch_ids_of_batch, scores (B,), maps (B, units, h, w)) batches; it may carry
# an ``operating_point`` attribute (P(possibly malignant) from which a patch is called suspicious).
Reader = Callable[[Sequence[int]], Iterable[tuple[Sequence[int], np.ndarray, np.ndarray]]]


class SyncError(MammoError):
    """The run, its patches or the FiftyOne datasets cannot be synced (the message says why)."""


@dataclass
class SyncSummary:
    patches_dataset: str
    neurons_dataset: str
    patches_written: int
    neurons_written: int
    concepts_changed: int
    reads_dataset: str | None = None
    reads_written: int = 0


# ------------------------------------------------------------------------------ the model's outputs
def model_reader(ws: Workspace, run: Any, loaded: Any = None, batch_size: int = 8) -> Reader:
    """Scores and feature maps of the run's patches from the run's model (via ``models.features.capture``)."""
    import torch

    from models.features import capture
    from workspace.base.catalog import open_catalog
    from workspace.data.patches import open_patch_set

    if loaded is None:
        from workspace.dissect.session import load_run_model

        loaded = load_run_model(ws, run)

    def read(patch_ids: Sequence[int]):
        db = open_catalog(ws)
        try:
            index = {r["patch_id"]: r for r in db.query(
                f"SELECT patch_id, patch_set, array_index FROM patches WHERE patch_id IN "
                f"({','.join('?' * len(patch_ids))})", [int(p) for p in patch_ids])}
        finally:
            db.conn.close()
        sets: dict[str, Any] = {}
        model = loaded.model
        device = next(model.parameters()).device
        for start in range(0, len(patch_ids), batch_size):
            chunk = [int(p) for p in patch_ids[start:start + batch_size]]
            name = index[chunk[0]]["patch_set"]
            patch_set = sets.setdefault(name, open_patch_set(ws, name))
            x = patch_set.batch([index[p]["array_index"] for p in chunk]).to(device)
            with torch.inference_mode(), capture(model, run.layer) as tap:
                logits = model(loaded.preprocess(x))
            scores = loaded.positive_probability(logits).cpu().numpy()
            yield chunk, scores, tap.output.float().cpu().numpy()

    read.operating_point = loaded.operating_point  # type: ignore[attr-defined]
    read.positive_name = loaded.positive_name  # type: ignore[attr-defined]
    read.model_card = loaded.card.to_dict()  # type: ignore[attr-defined]
    read.training_domain = loaded.meta.get("training_domain")  # type: ignore[attr-defined]
    return read


# ------------------------------------------------------------------------------------------- sync
def sync(ws: Workspace, run: Any, *, prefix: str = DEFAULT_PREFIX, loaded: Any = None,
         reader: Reader | None = None) -> tuple[Any, Any]:
    """Build (or refresh) the patches and neurons datasets of ``run``; returns ``(patches, neurons)``.

    ``run`` is a :class:`workspace.dissect.dissect_run.DissectionRun`; ``reader`` gives the model's scores
    and feature maps of patches (default: :func:`model_reader` with ``loaded`` or the run's model).
    """
    patches, neurons, _summary = sync_with_summary(ws, run, prefix=prefix, loaded=loaded, reader=reader)
    return patches, neurons


def sync_with_summary(ws: Workspace, run: Any, *, prefix: str = DEFAULT_PREFIX, loaded: Any = None,
                      reader: Reader | None = None) -> tuple[Any, Any, SyncSummary]:
    import fiftyone as fo

    patches_name, neurons_name = dataset_names(prefix)
    rows = _patch_rows(ws, run)
    signature = _signature(ws, run, rows)
    meta = {"workspace": str(ws.root), "run_id": run.run_id, "model_digest": run.model_digest,
            "layer": run.layer, "n_units": int(np.asarray(run.max_activations).shape[0]),
            "top_k": int(np.asarray(run.top_k).shape[1]), "patches_dataset": patches_name,
            "neurons_dataset": neurons_name, "signature": signature, "version": SYNC_VERSION,
            "explained_variance": _variance_ratio(run)}
    patches_ds = _open(fo, patches_name)
    neurons_ds = _open(fo, neurons_name)
    fresh = (_meta(patches_ds).get("signature") == signature and _meta(neurons_ds).get("signature") == signature
             and len(patches_ds) == len(rows) and len(neurons_ds) == meta["n_units"])
    written_p = written_n = 0
    if not fresh:
        reader = reader or model_reader(ws, run, loaded)
        operating_point = float(getattr(reader, "operating_point", DEFAULT_OPERATING_POINT))
        card = getattr(reader, "model_card", None)
        domains = _image_domains(ws, rows, getattr(reader, "training_domain", None))
        patch_samples, unit_media = _build_patch_samples(fo, ws, run, rows, reader, operating_point, domains)
        neuron_samples = _build_neuron_samples(fo, ws, run, rows, unit_media)
        for ds, samples, kind in ((patches_ds, patch_samples, "patches"), (neurons_ds, neuron_samples, "neurons")):
            ds.clear()
            ds.add_samples(samples, progress=False)
            ds.info["mammo"] = dict(meta, kind=kind, model_card=card)
            if card:
                ds.description = card["summary"]  # the App shows it on the dataset
            ds.save()
        patches_ds.add_dynamic_sample_fields()   # unit/rank of the masks: filterable in the sidebar
        _patches_look(fo, patches_ds)
        _neurons_look(fo, neurons_ds)
        written_p, written_n = len(patch_samples), len(neuron_samples)
    changed = refresh_concepts(ws, neurons_ds)
    reads_name, written_r = sync_reads(ws, run, prefix=prefix, loaded=loaded)
    summary = SyncSummary(patches_name, neurons_name, written_p, written_n, changed, reads_name, written_r)
    return patches_ds, neurons_ds, summary


def sync_reads(ws: Workspace, run: Any, *, prefix: str = DEFAULT_PREFIX, loaded: Any = None) -> tuple[str | None, int]:
    """Build (or leave as it is) the reads dataset of the run's model; ``(name or None, samples written)``.
    Nothing is made while the model has read no image."""
    import fiftyone as fo

    from workspace.base.catalog import open_catalog

    db = open_catalog(ws)
    try:
        reads = [dict(r) for r in db.query(
            "SELECT images.*, image_reads.created_at AS read_at FROM image_reads JOIN images "
            "USING (image_id) WHERE image_reads.model_digest = ? ORDER BY image_reads.image_id", [run.model_digest])]
    finally:
        db.conn.close()
    if not reads:
        return None, 0
    name = reads_dataset_name(prefix)
    signature = hashlib.sha1(json.dumps([[r["image_id"], r["read_at"]] for r in reads]).encode()).hexdigest()[:16]
    ds = _open(fo, name)
    if _meta(ds).get("signature") == signature and len(ds) == len(reads):
        return name, 0
    from models.inference import read_mammogram
    from workspace.base.modality import modality_of
    from workspace.data.domain import domain_of
    from workspace.data.ingest import resolve_path

    if loaded is None:
        from workspace.dissect.session import load_run_model

        loaded = load_run_model(ws, run)
    card, profile = loaded.card, loaded.meta.get("training_domain")
    samples = []
    for row in progress(reads, desc="fiftyone: reads", unit="image"):
        read = read_mammogram(ws, row["image_id"], loaded, keep_maps=False)
        width, height = int(row["cols"]), int(row["rows"])
        domain = domain_of(ws, row, profile)
        detections = [fo.Detection(label="suspicious", confidence=float(read.scores[i]),
                                   bounding_box=[x / width, y / height, w / width, h / height])
                      for i in read.suspicious for x, y, w, h in [[int(v) for v in read.boxes[i]]]]
        score = read.image_score
        samples.append(fo.Sample(
            filepath=str(resolve_path(ws, row["display_path"])), image_id=row["image_id"], dataset=row["dataset"],
            laterality=row.get("laterality"), view=row.get("view"), score=score,
            prediction=fo.Classification(
                label=loaded.positive_name if score >= read.operating_point else loaded.negative_name, confidence=score),
            modality=modality_of(row.get("modality")).code,
            suspicious=fo.Detections(detections=detections), n_patches=int(len(read.scores)),
            n_suspicious=int(len(read.suspicious)), outside_domain=domain.outside, domain_warning=domain.warning()))
    ds.clear()
    ds.add_samples(samples, progress=False)
    ds.info["mammo"] = {"workspace": str(ws.root), "run_id": run.run_id, "model_digest": run.model_digest,
                        "kind": "reads", "signature": signature, "model_card": card.to_dict()}
    ds.description = card.summary()
    ds.save()
    return name, len(samples)


def _patches_look(fo: Any, ds: Any) -> None:
    """Grid defaults: lesion/normal and the unit masks on, in colours that read on grey tissue."""
    ds.app_config.active_fields = fo.ActiveFields(paths=["ground_truth", "unit_masks"])
    ds.app_config.color_scheme = fo.ColorScheme(
        color_by="field", opacity=0.45,
        fields=[{"path": "unit_masks", "fieldColor": "#ffd000"},
                {"path": "ground_truth", "colorByAttribute": "label", "fieldColor": "#0072b2",
                 "valueColors": [{"value": "lesion", "color": "#d55e00"}, {"value": "normal", "color": "#0072b2"}]},
                {"path": "prediction", "fieldColor": "#cc79a7"}])
    ds.save()


NEURON_MAP_KEY = "neuron_pca"   # the brain run the App's Embeddings panel shows
WORKSPACE_NAME = "mammo-dissect"


def _neurons_look(fo: Any, ds: Any) -> None:
    """The run's PCA of the units registered as a FiftyOne visualization (so the App's own Embeddings panel
    lists it and draws the neuron map too, with lasso selection: the curator picks ``neuron_pca`` there and may
    colour it by ``concept.label``; FiftyOne 1.22's panel keeps no saved choice of run or colour), and the layout
    saved with the dataset (``save_workspace``), so a curator's own App on a shared database opens the same view."""
    import fiftyone.brain as fob

    if NEURON_MAP_KEY in ds.list_brain_runs():
        ds.delete_brain_run(NEURON_MAP_KEY)
    points = np.asarray(ds.values("pca"), dtype=np.float32)   # in the dataset's sample order
    fob.compute_visualization(ds, points=points, brain_key=NEURON_MAP_KEY, method="manual", progress=False)
    layout = fo.Space(children=[fo.Panel(type="Samples", pinned=True), fo.Panel(type="Embeddings")],
                      orientation="horizontal")
    ds.save_workspace(WORKSPACE_NAME, layout, description="the neurons' grid beside the Embeddings panel (neuron_pca)",
                      overwrite=True)


def _variance_ratio(run: Any) -> list[float]:
    """The share of variance along each PCA axis (empty when the run does not say)."""
    ratio = getattr(run, "explained_variance_ratio", None)
    return [float(v) for v in np.asarray(ratio).ravel()] if ratio is not None else []


def _open(fo: Any, name: str):
    if fo.dataset_exists(name):
        return fo.load_dataset(name)
    ds = fo.Dataset(name)
    ds.persistent = True
    return ds


def _meta(ds: Any) -> dict:
    return dict(ds.info.get("mammo") or {})


def _patch_rows(ws: Workspace, run: Any) -> list[dict]:
    from workspace.base.catalog import open_catalog
    from workspace.data.ingest import resolve_path

    ids = [int(p) for p in np.asarray(run.patch_ids)]
    db = open_catalog(ws)
    found: dict[int, dict] = {}
    try:
        for start in range(0, len(ids), 900):
            chunk = ids[start:start + 900]
            for row in db.query(f"SELECT * FROM patches WHERE patch_id IN ({','.join('?' * len(chunk))})", chunk):
                found[row["patch_id"]] = dict(row)
    finally:
        db.conn.close()
    missing = [p for p in ids if p not in found]
    if missing:
        raise SyncError(f"run {run.run_id} refers to {len(missing)} patches not in the catalog "
                        f"(first: {missing[:5]}); was the patch set rebuilt? dissect again")
    rows = []
    for p in ids:
        row = found[p]
        thumb = row.get("thumb_path")
        if not thumb:
            raise SyncError(f"patch {p} has no thumbnail; rebuild the patch set (`mammo patches`)")
        path = resolve_path(ws, thumb)
        if not path.exists():
            raise SyncError(f"thumbnail of patch {p} is missing: {path}")
        rows.append(dict(row, thumb_abs=str(path)))
    return rows


def _signature(ws: Workspace, run: Any, rows: list[dict]) -> str:
    blob = json.dumps([SYNC_VERSION, str(ws.root), run.run_id, run.model_digest, run.layer,
                       [(r["patch_id"], r["thumb_abs"], r["label"], r["split"]) for r in rows]])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _relative(run: Any) -> np.ndarray:
    """``relative_activation`` of the run's (units, patches) matrix, a unit without a scale (NaN) ranked last."""
    from workspace.dissect.dissection import relative_activation

    return np.nan_to_num(relative_activation(run.max_activations, run.thresholds), nan=-np.inf)


def _unit_masks(maps: np.ndarray, thresholds: np.ndarray, size: int) -> np.ndarray:
    from workspace.dissect.dissection import unit_masks

    masks = unit_masks(maps, thresholds, size)
    return masks.numpy() if hasattr(masks, "numpy") else np.asarray(masks)


def _image_domains(ws: Workspace, rows: list[dict], profile: dict | None) -> dict[str, Any]:
    """image_id -> the domain verdict of the run's images against the model's training domain."""
    from workspace.base.catalog import open_catalog
    from workspace.data.domain import domain_of

    db = open_catalog(ws)
    try:
        ids = sorted({r["image_id"] for r in rows})
        return {i: domain_of(ws, dict(db["images"].get(i)), profile, db=db) for i in ids}
    finally:
        db.conn.close()


def _build_patch_samples(fo: Any, ws: Workspace, run: Any, rows: list[dict], reader: Reader,
                         operating_point: float, domains: dict[str, Any]):
    from models.card import DEFAULT_POSITIVE

    acts = np.asarray(run.max_activations, dtype=np.float32)
    positive = str(getattr(reader, "positive_name", DEFAULT_POSITIVE))  # the model's scored class
    relative = _relative(run)
    thresholds = np.asarray(run.thresholds, dtype=np.float32)
    top_k = np.asarray(run.top_k).astype(np.int64)
    column = {int(p): i for i, p in enumerate(np.asarray(run.patch_ids))}
    in_top: dict[int, list[tuple[int, int]]] = {}            # patch -> [(unit, rank)]
    for unit in range(top_k.shape[0]):
        for rank, p in enumerate(top_k[unit]):
            in_top.setdefault(int(p), []).append((unit, rank))
    unit_media: dict[int, dict[int, np.ndarray]] = {}         # unit -> {patch: mask at MASK_SIZE}
    by_id = {r["patch_id"]: r for r in rows}
    samples = []
    ids = [r["patch_id"] for r in rows]
    bar = progress(total=len(ids), desc="fiftyone: patches", unit="patch")
    for batch_ids, scores, maps in reader(ids):
        maps = np.asarray(maps, dtype=np.float32)
        for b, p in enumerate(batch_ids):
            row, col = by_id[int(p)], column[int(p)]
            detections = []
            pairs = in_top.get(int(p), [])
            if pairs:
                units = [u for u, _ in pairs]
                masks = _unit_masks(maps[b, units], thresholds[units], MASK_SIZE)
                for (unit, rank), mask in zip(pairs, masks, strict=True):
                    unit_media.setdefault(unit, {})[int(p)] = mask
                    detection = _mask_detection(fo, unit, rank, float(acts[unit, col]), mask)
                    if detection is not None:
                        detections.append(detection)
            best = int(np.argmax(relative[:, col]))
            heat = maps[b, best]
            top = np.argsort(-relative[:, col], kind="stable")[:N_TOP_UNITS]
            score = float(scores[b])
            domain = domains.get(row["image_id"])
            sample = fo.Sample(
                filepath=row["thumb_abs"], patch_id=int(p), image_id=row["image_id"], x=int(row["x"]),
                y=int(row["y"]), size=int(row["size"]), split=row["split"], array_index=int(row["array_index"]),
                ground_truth=fo.Classification(label=GROUND_TRUTH.get(row["label"], "unlabelled")),
                prediction=fo.Classification(label=positive if score >= operating_point else "normal",
                                             confidence=score),
                score=score, max_activations=[float(v) for v in acts[:, col]],
                top_units=[int(u) for u in top],
                activation=fo.Heatmap(map=_heat_u8(heat, thresholds[best]), range=[0, 255], unit=best),
                unit_masks=fo.Detections(detections=detections),
                outside_domain=bool(domain and domain.outside), domain_warning=domain.warning() if domain else None)
            samples.append(sample)
            bar.update(1)
    bar.close()
    if len(samples) != len(rows):
        raise SyncError(f"the model gave outputs for {len(samples)} of {len(rows)} patches")
    order = {p: i for i, p in enumerate(ids)}
    samples.sort(key=lambda s: order[s["patch_id"]])
    return samples, unit_media


def _heat_u8(heat: np.ndarray, threshold: float) -> np.ndarray:
    """A unit's map as uint8, 255 at twice its threshold (so "above threshold" is the top half)."""
    scale = 2.0 * float(threshold) if threshold > 0 else float(heat.max() or 1.0)
    return np.clip(np.asarray(heat, dtype=np.float32) / scale * 255.0, 0, 255).astype(np.uint8)


def _mask_detection(fo: Any, unit: int, rank: int, activation: float, mask: np.ndarray):
    """A Detection holding a unit's mask on a patch, boxed tightly (None when the mask is empty)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    size = mask.shape[0]
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    return fo.Detection(label=f"unit {unit}", bounding_box=[x0 / size, y0 / size, (x1 - x0) / size,
                                                            (y1 - y0) / size],
                        mask=mask[y0:y1, x0:x1].copy(), unit=int(unit), rank=int(rank) + 1,
                        activation=round(activation, 5))


def montage_path(ws: Workspace, run_id: str, unit: int) -> Path:
    return ws.fiftyone_dir / "media" / run_id / f"unit_{unit:04d}.png"


def _build_neuron_samples(fo: Any, ws: Workspace, run: Any, rows: list[dict], unit_media: dict):
    acts = np.asarray(run.max_activations, dtype=np.float32)
    thresholds = np.asarray(run.thresholds, dtype=np.float32)
    top_k = np.asarray(run.top_k).astype(np.int64)
    pca = np.asarray(run.pca, dtype=np.float32)
    column = {int(p): i for i, p in enumerate(np.asarray(run.patch_ids))}
    by_id = {r["patch_id"]: r for r in rows}
    samples = []
    greys: dict[int, np.ndarray] = {}
    for unit in progress(range(acts.shape[0]), desc="fiftyone: units", unit="unit"):
        ids = [int(p) for p in top_k[unit]]
        values = [float(acts[unit, column[p]]) if p in column else float("nan") for p in ids]
        labels = [by_id[p]["label"] if p in by_id else -1 for p in ids]
        path = montage_path(ws, run.run_id, unit)
        if not path.exists():
            tiles, captions, frames = [], [], []
            for rank, (p, value, label) in enumerate(zip(ids, values, labels, strict=True), start=1):
                if p not in greys:
                    greys[p] = media.load_grey(by_id[p]["thumb_abs"]) if p in by_id else \
                        np.zeros((media.TILE, media.TILE), np.uint8)
                mask = unit_media.get(unit, {}).get(p)
                tile = media.overlay_mask(greys[p], mask) if mask is not None else \
                    np.repeat(greys[p][..., None], 3, axis=2)
                tiles.append(tile)
                captions.append(f"#{rank} {value:.2f} {GROUND_TRUTH.get(label, 'unlabelled')}")
                frames.append(FRAME_COLOURS.get(label, media.UNLABELLED_COLOUR))
            title = f"unit {unit}  threshold {thresholds[unit]:.2f}  run {run.run_id}"
            media.save_png(media.montage(tiles, captions, frames, title), path)
        lesion_share = float(np.mean([lab == 1 for lab in labels])) if labels else 0.0
        samples.append(fo.Sample(
            filepath=str(path), unit=unit, pca=[float(pca[unit, 0]), float(pca[unit, 1])],
            pca_x=float(pca[unit, 0]), pca_y=float(pca[unit, 1]), threshold=float(thresholds[unit]),
            top_patch_ids=ids, top_activations=[round(v, 5) for v in values], lesion_share=lesion_share,
            run_id=run.run_id))
    return samples


# ------------------------------------------------------------------------------ concept labels
def refresh_concepts(ws: Workspace, neurons_ds: Any) -> int:
    """Copy the store's labels (by the team's label rule) and which units are disputed (readers named different
    concepts: ``disputed``, a field to filter on) into the neurons dataset; returns how many units changed.

    Only changed samples are written (a refresh with nothing new writes nothing). The App's colour
    scheme gives each concept its store colour.
    """
    import fiftyone as fo

    from workspace.dissect.concepts import ConceptStore

    meta = _meta(neurons_ds)
    if not meta:
        raise SyncError(f"dataset {neurons_ds.name} was not made by `mammo fiftyone sync`")
    with ConceptStore(ws) as store:
        labels = store.labels(meta["model_digest"], meta["layer"])
        disputed = {u.unit for u in store.agreement(meta["model_digest"], meta["layer"]).disputed}
    if not neurons_ds.has_sample_field("concept"):
        neurons_ds.add_sample_field("concept", fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
    if not neurons_ds.has_sample_field("disputed"):
        neurons_ds.add_sample_field("disputed", fo.BooleanField)
    ids, units, current, was_disputed = neurons_ds.values(["id", "unit", "concept.label", "disputed"])
    changed_ids, new_values, flags = [], [], []
    for sample_id, unit, label, flag in zip(ids, units, current, was_disputed, strict=True):
        concept = labels.get(int(unit))
        wanted = concept.name if concept else None
        if wanted != label or bool(flag) != (int(unit) in disputed):
            changed_ids.append(sample_id)
            new_values.append(fo.Classification(label=wanted) if wanted else None)
            flags.append(int(unit) in disputed)
    if changed_ids:
        view = neurons_ds.select(changed_ids, ordered=True)
        view.set_values("concept", new_values)
        view.set_values("disputed", flags)
    _apply_colours(fo, neurons_ds, {c.name: c.colour for c in labels.values()})
    return len(changed_ids)


def _apply_colours(fo: Any, ds: Any, colours: dict[str, str]) -> None:
    wanted = sorted(colours.items())
    scheme = ds.app_config.color_scheme
    current = []
    if scheme is not None and scheme.fields:
        for entry in scheme.fields:
            if entry.get("path") == "concept":
                current = sorted((v["value"], v["color"]) for v in entry.get("valueColors", []))
    if current == wanted and scheme is not None:
        return
    ds.app_config.color_scheme = fo.ColorScheme(
        color_by="value",
        fields=[{"path": "concept", "colorByAttribute": "label", "fieldColor": "#999999",
                 "valueColors": [{"value": name, "color": colour} for name, colour in wanted]}])
    ds.save()
