"""The report of one patch for the Neuron map panel: the two bar charts of :mod:`workspace.dissect.reports`.

Chart 1, activation value: per concept, the mean over its units of their max activation on the
patch divided by the unit's threshold (1.0 = as active as the unit's top 1 % on the dissection
patches); the raw mean is in the hover. Chart 2, activation area: per concept, the mean IoU of its
units' masks with the latest ROI query on the patch's image (none: the chart says so).
"""

from __future__ import annotations

from typing import Any

from fiftyone_plugins.actions import PluginError


def _bars(names: list[str], values: list[float | None], colours: list[str], hover: list[str],
          axis: str, reference: float | None = None) -> tuple[list[dict], dict]:
    data = [{"type": "bar", "orientation": "h", "y": names, "x": [v or 0.0 for v in values],
             "marker": {"color": colours}, "text": [f"{v:.2f}" if v is not None else "-" for v in values],
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
    from workspace.dissect.reports import build_report

    patches = mc.patches()
    try:
        sample = patches[sample_id]
    except KeyError as error:
        raise PluginError(f"sample {sample_id} is not in {mc.patches_name}") from error
    units, thresholds = mc.neurons().values(["unit", "threshold"])
    by_unit = dict(zip(units, thresholds, strict=True))
    thr = [by_unit[u] for u in range(mc.n_units)]
    with ConceptStore(mc.ws) as store:
        labels = store.labels(mc.model_digest, mc.layer)
        labelled_by = store.labellers(mc.model_digest, mc.layer)
        query = store.latest_query(mc.model_digest, mc.layer, image_id=sample["image_id"])
    report = build_report(
        sample["max_activations"], thr, labels,
        iou=query.iou_array(mc.n_units) if query is not None else None,
        aligned=query.aligned if query is not None else None,
        iou_threshold=query.iou_threshold if query is not None else DEFAULT_IOU_THRESHOLD,
        image_id=sample["image_id"], patch_box=[sample["x"], sample["y"], sample["size"], sample["size"]],
        model_digest=mc.model_digest, layer=mc.layer, run_id=mc.meta.get("run_id"),
        query_id=query.query_id if query is not None else None, labelled_by=labelled_by)
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
    return {"title": title, "plots": plots, "report": d}
