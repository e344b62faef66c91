"""The report of one patch for the Neuron map panel: the bar charts of :mod:`workspace.dissect.reports`.

Chart 1, activation value: per concept, the mean over its units of their max activation on the
patch divided by the unit's threshold (1.0 = as active as the unit's top 1 % on the dissection
patches); the raw mean and the effect on the score are in the hover. Chart 2, activation area: per
concept, the mean IoU of its units' masks with the latest ROI query on the patch's image (none: the
chart says so). Chart 3, effect on the score: per concept, the patch's score with the concept's units
silenced minus its score (``Session.patch_score_changes``: the run's model, loaded once per process).
"""

from __future__ import annotations

from typing import Any

from fiftyone_plugins.actions import PluginError
from workspace.base.errors import MammoError
from workspace.dissect.session import Lru

_SESSIONS = Lru(4)   # (workspace, run) -> Session: the run's model loaded once, its patch passes kept


def _score_changes(mc: Any, patch_id: int, groups: dict[int, list[int]]) -> tuple[Any, str | None]:
    """``(ScoreChanges, None)``, or ``(None, why not)`` (a stand-in run without its model, a layer that
    runs twice...): the panel shows the other charts either way."""
    from workspace.dissect.session import Session

    run_id = mc.meta.get("run_id")
    if not groups or not run_id:
        return None, None
    try:
        session = _SESSIONS.get((str(mc.ws.root), run_id), lambda: Session.open(mc.ws, run=run_id))
        return session.patch_score_changes(int(patch_id), groups), None
    except (MammoError, OSError) as error:
        return None, str(error)


def _bars(names: list[str], values: list[float | None], colours: list[str], hover: list[str],
          axis: str, reference: float | None = None, signed: bool = False) -> tuple[list[dict], dict]:
    form = "{:+.3f}" if signed else "{:.2f}"
    data = [{"type": "bar", "orientation": "h", "y": names, "x": [v or 0.0 for v in values],
             "marker": {"color": colours}, "text": [form.format(v) if v is not None else "-" for v in values],
             "textposition": "auto", "hovertext": hover, "hoverinfo": "text"}]
    layout = {"margin": {"l": 150, "r": 10, "t": 10, "b": 40}, "xaxis": {"title": {"text": axis}},
              "yaxis": {"autorange": "reversed"}, "showlegend": False}
    if reference is not None:
        layout["shapes"] = [{"type": "line", "x0": reference, "x1": reference, "yref": "paper", "y0": 0, "y1": 1,
                             "line": {"dash": "dot", "color": "#999999"}}]
    return data, layout


def charts_for_sample(mc: Any, sample_id: str) -> dict | None:
    """``{"title": markdown, "plots": [(data, layout), ...], "report": dict}`` for a patches sample."""
    from workspace.dissect.concepts import ConceptStore
    from workspace.dissect.dissection import DEFAULT_IOU_THRESHOLD
    from workspace.dissect.reports import build_report, concept_groups, proposal_texts

    patches = mc.patches()
    try:
        sample = patches[sample_id]
    except KeyError as error:
        raise PluginError(f"sample {sample_id} is not in {mc.patches_name}") from error
    units, thresholds = mc.neurons().values(["unit", "threshold"])
    by_unit = dict(zip(units, thresholds, strict=True))
    thr = [by_unit[u] for u in range(mc.n_units)]
    with ConceptStore(mc.ws) as store:
        labels, labelled_by = store.labels_and_labellers(mc.model_digest, mc.layer)
        proposals = proposal_texts(store, mc.model_digest, mc.layer)
        query = store.latest_query(mc.model_digest, mc.layer, image_id=sample["image_id"])
    changes, no_changes = _score_changes(mc, sample["patch_id"], concept_groups(labels))
    report = build_report(
        sample["max_activations"], thr, labels,
        iou=query.iou_array(mc.n_units) if query is not None else None,
        aligned=query.aligned if query is not None else None,
        iou_threshold=query.iou_threshold if query is not None else DEFAULT_IOU_THRESHOLD,
        image_id=sample["image_id"], patch_box=[sample["x"], sample["y"], sample["size"], sample["size"]],
        model_digest=mc.model_digest, layer=mc.layer, run_id=mc.meta.get("run_id"),
        query_id=query.query_id if query is not None else None, labelled_by=labelled_by, score_changes=changes,
        proposals=proposals)
    d = report.to_dict()
    title = (f"**Report: patch {sample['patch_id']}** of `{sample['image_id']}` at ({sample['x']}, {sample['y']}), "
             f"model score {sample['score']:.2f}")
    warning = sample["domain_warning"] if sample.has_field("domain_warning") else None
    if warning:
        title += f"  \n**Warning:** {warning}"
    card = mc.meta.get("model_card")
    if card:
        title += f"  \n_{card['summary']}_"
    if not d["concepts"]:
        return {"title": title + "  \nNo unit is labelled yet: label units on the map to see concept bars.",
                "plots": [], "report": d}
    names = [f"{c['name']} ({c['n_units']})" for c in d["concepts"]]
    colours = [c["colour"] for c in d["concepts"]]
    hover = [f"{c['name']}: mean activation {c['mean_activation']:.3g} over {c['n_units']} unit(s)"
             + (f", silenced: {c['score_change']:+.3f}" if c["score_change"] is not None else "")
             + (f", labelled by {', '.join(c['labelled_by'])}" if c["labelled_by"] else "") for c in d["concepts"]]
    plots = [_bars(names, [c["mean_normalised"] for c in d["concepts"]], colours, hover,
                   "activation value (mean max activation / threshold)", reference=1.0)]
    if d["has_roi"]:
        iou_hover = [f"{c['name']}: mean IoU {c['mean_iou']:.2f}, {c['n_aligned']} aligned" for c in d["concepts"]]
        plots.append(_bars(names, [c["mean_iou"] for c in d["concepts"]], colours, iou_hover,
                           f"activation area (mean IoU with ROI of query #{d['query_id']})",
                           reference=d["iou_threshold"]))
    else:
        title += "  \nNo ROI query on this image yet: the activation-area chart needs one."
    if d["silenced"] is not None:
        base = d["silenced"]["score"]
        change_hover = [f"{c['name']}: {base:.3f} -> {base + c['score_change']:.3f} with its {c['n_units']} unit(s) "
                        "silenced" if c["score_change"] is not None else f"{c['name']}: not computed"
                        for c in d["concepts"]]
        plots.append(_bars(names, [c["score_change"] for c in d["concepts"]], colours, change_hover,
                           f"effect on the score: {d['silenced']['label']} silenced - as read ({base:.2f})",
                           reference=0.0, signed=True))
    elif no_changes:
        title += f"  \nEffect on the score not computed: {no_changes}"
    return {"title": title, "plots": plots, "report": d}
