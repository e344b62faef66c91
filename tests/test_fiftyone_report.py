"""The Neuron map panel's patch report with each concept's effect on the score (issue 16, section 2): the third
chart on the real pipeline (the shipped model) against a hook-zeroed forward pass of the patch's pixels, and the
stand-in run (no model to silence with) saying why the chart is missing."""

from __future__ import annotations

import numpy as np
import pytest

from workspace.dissect.concepts import ConceptStore


def _effect_plot(charts: dict) -> tuple[list, dict] | None:
    for data, layout in charts["plots"]:
        if layout["xaxis"]["title"]["text"].startswith("effect on the score"):
            return data, layout
    return None


def test_patch_report_has_the_effect_on_the_score(fo_pipeline, pipeline):
    from fiftyone_plugins import report_view
    from fiftyone_plugins.actions import context_of
    from tests.test_ablation import zeroed_by_hook
    from workspace.base.catalog import open_catalog
    from workspace.data.patches import open_patch_set

    ws, run = fo_pipeline.ws, fo_pipeline.run
    ids, scores = fo_pipeline.patches.values(["id", "score"])
    sample = fo_pipeline.patches[ids[int(np.argmin(np.abs(np.asarray(scores) - 0.5)))]]   # not saturated
    units = [int(u) for u in np.argsort(-np.asarray(sample["max_activations"]))[:16]]    # its strongest units
    with ConceptStore(ws) as store:
        store.label_units(run.model_digest, run.layer, units, "fo-silence", by="t", source="api",
                          n_units=run.n_units)
    try:
        charts = report_view.charts_for_sample(context_of(fo_pipeline.patches), sample.id)
        plot = _effect_plot(charts)
        assert plot is not None, charts["title"]
        data = plot[0][0]
        row = data["y"].index("fo-silence (16)")
        # the reference: the patch's pixels through the model with the units' maps zeroed by a hook
        name, index = open_catalog(ws).execute("SELECT patch_set, array_index FROM patches WHERE patch_id = ?",
                                               [sample["patch_id"]]).fetchone()
        x01 = open_patch_set(ws, name).batch([index])
        loaded = pipeline.loaded

        silenced = float(zeroed_by_hook(loaded, x01, units)[0])
        as_read = float(loaded.predict_proba(x01)[0])
        assert abs(silenced - as_read) > 1e-3                 # these units matter to this patch's score
        assert data["x"][row] == pytest.approx(silenced - as_read, abs=1e-5)
        assert "silenced" in data["hovertext"][row] and "silenced: " in charts["plots"][0][0][0]["hovertext"][row]
        assert charts["report"]["silenced"]["of"] == "patch"
    finally:
        with ConceptStore(ws) as store:
            store.remove_labels(run.model_digest, run.layer, units, by="t", source="api")


def test_stand_in_run_says_why_there_is_no_effect_chart(fo_synced):
    from fiftyone import ViewField as F

    from fiftyone_plugins import report_view
    from fiftyone_plugins.actions import context_of

    with ConceptStore(fo_synced.ws) as store:
        store.label_units(fo_synced.run.model_digest, fo_synced.run.layer, [5, 6], "fo-silence-standin", by="t",
                          source="api", n_units=16)
    try:
        sample = fo_synced.patches.match(F("patch_id") == 1003).first()
        charts = report_view.charts_for_sample(context_of(fo_synced.patches), sample.id)
        assert _effect_plot(charts) is None and charts["plots"]
        assert "Effect on the score not computed" in charts["title"]
        assert all(c["score_change"] is None for c in charts["report"]["concepts"])
    finally:
        with ConceptStore(fo_synced.ws) as store:
            store.remove_labels(fo_synced.run.model_digest, fo_synced.run.layer, [5, 6], by="t", source="api")
