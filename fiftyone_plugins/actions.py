"""What the plugin's operators and the "Neuron map" panel do, as plain functions of a dataset.

Each function reads the source of truth (the concept store in the workspace's SQLite, the datasets
written by :mod:`fiftyone_plugins.sync`) when called, so the App shows what another process (Label
Studio's backend, the CLI) wrote a moment ago.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from workspace.base.config import Workspace
from workspace.base.errors import MammoError

UNLABELLED_COLOUR = "#b0b0b0"
BASE_SIZE = 10
ALIGNED_SIZE = 18
SELECTED_SIZE = 16
SELECTED_LINE = "#ffffff"
DISPUTED_LINE = "#ff2a2a"   # a ring around units whose readers named different concepts
PROPOSED_SYMBOL = "diamond"  # units with a pending concept proposal


class PluginError(MammoError):
    """A plugin action that cannot run on this dataset or with these inputs."""


@dataclass(frozen=True)
class MapContext:
    """Which workspace, run and datasets a dataset of ``mammo fiftyone sync`` belongs to."""

    ws: Workspace
    meta: dict

    @property
    def patches_name(self) -> str:
        return self.meta["patches_dataset"]

    @property
    def neurons_name(self) -> str:
        return self.meta["neurons_dataset"]

    @property
    def model_digest(self) -> str:
        return self.meta["model_digest"]

    @property
    def layer(self) -> str:
        return self.meta["layer"]

    @property
    def n_units(self) -> int:
        return int(self.meta["n_units"])

    def patches(self):
        import fiftyone as fo

        return fo.load_dataset(self.patches_name)

    def neurons(self):
        import fiftyone as fo

        return fo.load_dataset(self.neurons_name)


def context_of(dataset: Any) -> MapContext:
    """The :class:`MapContext` of a synced dataset, or a :class:`PluginError` saying what to do."""
    if dataset is None:
        raise PluginError("open the patches dataset of `mammo fiftyone sync` first")
    meta = dict((dataset.info or {}).get("mammo") or {})
    if not meta:
        raise PluginError(f"dataset {dataset.name!r} was not made by `mammo fiftyone sync`; "
                          "open the mammo patches dataset")
    root = meta.get("workspace") or os.environ.get("MAMMO_WORKSPACE")
    return MapContext(Workspace.open(root, create=False), meta)


def actor(ctx: Any = None) -> str:
    """Who acts in the App: the App user when FiftyOne knows one, else this process's user."""
    user = getattr(ctx, "user", None) if ctx is not None else None
    for attr in ("email", "name", "id"):
        value = getattr(user, attr, None) if user is not None else None
        if value:
            return str(value)
    from workspace.dissect.concepts import default_actor

    return os.environ.get("MAMMO_USER") or default_actor()


# -------------------------------------------------------------------------------------- reading
@dataclass
class MapPoints:
    units: list[int]
    x: list[float]
    y: list[float]
    concept: list[str | None]
    colour: list[str]
    iou: list[float | None]
    aligned: set[int]
    query_label: str
    explained_variance: list[float]
    disputed: dict[int, dict[str, str]] = field(default_factory=dict)   # unit -> {reader: concept}
    proposed: dict[int, str] = field(default_factory=dict)   # unit -> its pending proposal, as text


def map_points(mc: MapContext) -> MapPoints:
    """The units' PCA coordinates (neurons dataset), concepts and the latest ROI query (store)."""
    from workspace.dissect.concepts import ConceptStore

    units, xs, ys = mc.neurons().values(["unit", "pca_x", "pca_y"])
    with ConceptStore(mc.ws) as store:
        labels = store.labels(mc.model_digest, mc.layer)
        query = store.latest_query(mc.model_digest, mc.layer)
        disputed = {u.unit: u.votes for u in store.agreement(mc.model_digest, mc.layer).disputed}
        proposed = {p.unit: f"#{p.proposal_id} {p.concept} ({p.evidence_text()})"
                    for p in reversed(store.proposals(mc.model_digest, mc.layer))}   # a unit's best proposal
    iou = dict(query.ranking) if query is not None else {}
    aligned = {int(u) for u in query.aligned} if query is not None else set()
    query_label = ""
    if query is not None:
        where = f" on {query.image_id}" if query.image_id else ""
        query_label = f"latest ROI query #{query.query_id}{where} ({query.source}, {query.asked_at[:16]})"
    concept = [labels[u].name if u in labels else None for u in units]
    colour = [labels[u].colour if u in labels else UNLABELLED_COLOUR for u in units]
    return MapPoints(units=[int(u) for u in units], x=list(xs), y=list(ys), concept=concept, colour=colour,
                     iou=[iou.get(int(u)) if query is not None else None for u in units], aligned=aligned,
                     query_label=query_label,
                     explained_variance=list(mc.meta.get("explained_variance") or []), disputed=disputed,
                     proposed=proposed)


def scatter(points: MapPoints, selected: set[int] | None = None) -> tuple[list[dict], dict]:
    """Plotly traces (one per concept, unlabelled first and grey; ``ids`` = unit) and layout."""
    selected = selected or set()
    groups: dict[str | None, list[int]] = {}
    for i, name in enumerate(points.concept):
        groups.setdefault(name, []).append(i)
    order = sorted(groups, key=lambda n: (n is not None, (n or "").casefold()))
    traces = []
    for name in order:
        idx = groups[name]
        units = [points.units[i] for i in idx]
        text = []
        for i in idx:
            iou = points.iou[i]
            said = points.disputed.get(points.units[i])
            text.append(f"unit {points.units[i]}<br>concept: {points.concept[i] or 'unlabelled'}"
                        f"<br>IoU: {'-' if iou is None else f'{iou:.2f}'}"
                        + ("<br>disputed: " + "; ".join(f"{r}: {n}" for r, n in sorted(said.items())) if said else "")
                        + (f"<br>proposed: {points.proposed[points.units[i]]}"
                           if points.units[i] in points.proposed else ""))
        traces.append({
            "type": "scattergl" if len(points.units) > 2000 else "scatter",
            "mode": "markers", "name": name or "unlabelled",
            "x": [points.x[i] for i in idx], "y": [points.y[i] for i in idx],
            "ids": [str(u) for u in units], "text": text, "hovertemplate": "%{text}<extra></extra>",
            "marker": {
                "color": points.colour[idx[0]],
                "size": [SELECTED_SIZE + (4 if u in points.aligned else 0) if u in selected
                         else ALIGNED_SIZE if u in points.aligned else BASE_SIZE for u in units],
                "opacity": 0.9,
                "symbol": [PROPOSED_SYMBOL if u in points.proposed else "circle" for u in units],
                "line": {"width": [2.5 if u in selected else 2.0 if u in points.disputed else 0 for u in units],
                         "color": [SELECTED_LINE if u in selected else DISPUTED_LINE for u in units]},
            },
        })
    ev = points.explained_variance
    axis = [f"PC{i + 1}" + (f" ({ev[i] * 100:.0f}% of variance)" if len(ev) > i else "") for i in range(2)]
    layout = {"dragmode": "lasso", "hovermode": "closest", "showlegend": True,
              "legend": {"orientation": "h", "x": 0, "xanchor": "left", "y": -0.18, "yanchor": "top"},
              "margin": {"l": 50, "r": 10, "t": 10, "b": 10},
              "xaxis": {"title": {"text": axis[0]}}, "yaxis": {"title": {"text": axis[1]}}}
    return traces, layout


# ------------------------------------------------------------------------------------- actions
def unit_view(mc: MapContext, unit: int):
    """The unit's top-k patches, best first, with only that unit's mask shown."""
    from fiftyone import ViewField as F

    unit = check_unit(mc, unit)
    neurons = mc.neurons()
    match = neurons.match(F("unit") == unit)
    if len(match) == 0:
        raise PluginError(f"unit {unit} is not in dataset {mc.neurons_name}; run `mammo fiftyone sync`")
    top_ids = match.first()["top_patch_ids"]
    patches = mc.patches()
    by_patch = dict(zip(*patches.values(["patch_id", "id"]), strict=True))
    ids = [by_patch[p] for p in top_ids if p in by_patch]
    return (patches.select(ids, ordered=True)
            .filter_labels("unit_masks", F("unit") == unit, only_matches=False))


def check_unit(mc: MapContext, unit: Any) -> int:
    try:
        value = int(str(unit).strip())
    except (TypeError, ValueError) as error:
        raise PluginError(f"a unit is a number from 0 to {mc.n_units - 1}, not {unit!r}") from error
    if not 0 <= value < mc.n_units:
        raise PluginError(f"unit {value} is out of range: layer {mc.layer} has units 0 to {mc.n_units - 1}")
    return value


def _selected(units: Any) -> list[int]:
    """The units a panel action was given (a list or "3,5-7"), at least one; a :class:`PluginError` otherwise."""
    from workspace.dissect.concepts import parse_units

    try:
        unit_list = parse_units(units)
    except MammoError as error:
        raise PluginError(str(error)) from error
    if not unit_list:
        raise PluginError("select units on the map first (lasso or box select)")
    return unit_list


def label_units(mc: MapContext, units: Any, concept: str, *, by: str, description: str | None = None) -> int:
    """Label ``units`` with ``concept`` (created when new) in the store, then copy labels to the dataset."""
    from fiftyone_plugins.sync import refresh_concepts
    from workspace.dissect.concepts import ConceptStore

    unit_list = _selected(units)
    name = (concept or "").strip()
    if not name:
        raise PluginError("choose a concept or type a new one")
    with ConceptStore(mc.ws) as store:
        changed = store.label_units(mc.model_digest, mc.layer, unit_list, name, by=by, source="fiftyone",
                                    run_id=mc.meta.get("run_id"), n_units=mc.n_units, description=description)
    refresh_concepts(mc.ws, mc.neurons())
    return changed


def decide_proposals(mc: MapContext, units: Any, *, accept: bool, by: str) -> list:
    """Accept (label each unit with its proposed concept) or reject the pending proposals of ``units``, in one
    action; returns the proposals decided."""
    from fiftyone_plugins.sync import refresh_concepts
    from workspace.dissect.concepts import ConceptStore

    unit_list = _selected(units)
    with ConceptStore(mc.ws) as store:
        pending = store.proposals(mc.model_digest, mc.layer, units=unit_list)
        if not pending:
            raise PluginError("none of the selected units has a pending proposal (◆ on the map)")
        decided = store.decide_proposals([p.proposal_id for p in pending], accept=accept, by=by, source="fiftyone")
    refresh_concepts(mc.ws, mc.neurons())
    return decided


def create_concept(mc: MapContext, name: str, *, by: str, description: str | None = None,
                   colour: str | None = None):
    from workspace.dissect.concepts import ConceptStore

    with ConceptStore(mc.ws) as store:
        return store.create_concept(name, by, description=description, colour=colour or None)


def concept_choices(mc: MapContext) -> list[tuple[str, int]]:
    """Existing concepts with their unit counts in this model/layer, by name."""
    from workspace.dissect.concepts import ConceptStore

    with ConceptStore(mc.ws) as store:
        return [(c.name, c.n_units) for c in store.list_concepts(mc.model_digest, mc.layer)]


def refresh(mc: MapContext) -> int:
    from fiftyone_plugins.sync import refresh_concepts

    return refresh_concepts(mc.ws, mc.neurons())
