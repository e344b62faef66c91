"""The FiftyOne datasets, operators and Neuron map panel on a real database (own mongod), driven
through ``fiftyone.operators.execute_operator`` exactly as the App and Python users call them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fiftyone_plugins import PLUGIN_DIR, PLUGIN_NAME, operator_uri
from workspace.dissect.concepts import ConceptStore

pytestmark = pytest.mark.fiftyone

PANEL = operator_uri("neuron_map")


def _execute(operator, dataset, **params):
    import fiftyone.operators as foo

    return foo.execute_operator(operator_uri(operator), dataset=dataset, params=params)


def _panel(dataset, method, state=None, **event):
    """Call a panel callback the way the App does; returns (result, rendered panel, state patches)."""
    import fiftyone.operators as foo

    params = {"__method__": method, "panel_id": "test-panel", "panel_state": dict(state or {}), **event}
    result = foo.execute_operator(PANEL, dataset=dataset, params=params)
    requests = result.executor.to_json()["requests"]
    rendered = [r["params"]["output"] for r in requests if r["operator_uri"].endswith("show_panel_output")]
    patches = {}
    for r in requests:
        if r["operator_uri"].endswith("patch_panel_state"):
            patches.update(r["params"]["state"])
    return result, (rendered[-1] if rendered else None), patches, requests


def _find(schema, name):
    """The property called ``name`` anywhere in a rendered panel schema."""
    if isinstance(schema, dict):
        props = schema.get("properties") or {}
        if name in props:
            return props[name]
        for value in schema.values():
            found = _find(value, name)
            if found is not None:
                return found
    elif isinstance(schema, list):
        for value in schema:
            found = _find(value, name)
            if found is not None:
                return found
    return None


def test_mongod_fixture_is_ours_and_fast(fo_db):
    import fiftyone as fo

    assert fo_db.uri.startswith("mongodb://127.0.0.1:")
    assert fo.config.database_uri == fo_db.uri
    assert fo_db.service.alive()
    t0 = time.monotonic()
    fo.Dataset()  # a first write goes to our server, not to a managed one
    assert time.monotonic() - t0 < 20
    assert (fo_db.ws.fiftyone_dir / "db").is_dir()


def test_sync_builds_both_datasets(fo_synced):
    from fiftyone import ViewField as F

    run, patches, neurons = fo_synced.run, fo_synced.patches, fo_synced.neurons
    acts = np.asarray(run.max_activations)
    assert len(patches) == acts.shape[1] and len(neurons) == acts.shape[0]
    assert patches.info["mammo"]["run_id"] == run.run_id
    sample = patches.match(F("patch_id") == 1000).first()
    assert sample.ground_truth.label == "lesion" and sample.prediction.confidence == pytest.approx(0.9)
    assert sample.max_activations == pytest.approx(acts[:, 0].tolist())
    assert sample.activation.map.shape == (8, 8)
    # every (unit, top-k patch) pair carries that unit's mask on that patch
    n_masks = sum(len(s.unit_masks.detections) for s in patches.select_fields("unit_masks"))
    assert n_masks == np.asarray(run.top_k).size
    unit3 = neurons.match(F("unit") == 3).first()
    assert unit3.top_patch_ids == [int(p) for p in np.asarray(run.top_k)[3]]
    assert unit3.pca == pytest.approx(np.asarray(run.pca)[3].tolist(), abs=1e-5)
    with open(unit3.filepath, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sync_twice_changes_nothing(fo_synced):
    from fiftyone_plugins.sync import sync_with_summary

    before = {s.id: s.last_modified_at for s in fo_synced.neurons}
    before_p = {s.id: s.last_modified_at for s in fo_synced.patches}
    _p, _n, summary = sync_with_summary(fo_synced.ws, fo_synced.run, prefix=fo_synced.prefix,
                                        reader=fo_synced.reader)
    assert (summary.patches_written, summary.neurons_written, summary.concepts_changed) == (0, 0, 0)
    assert {s.id: s.last_modified_at for s in fo_synced.neurons} == before
    assert {s.id: s.last_modified_at for s in fo_synced.patches} == before_p


def test_plugin_is_discovered_with_its_operators(fo_db):
    import fiftyone.operators as foo

    uris = {op.uri for op in foo.list_operators()}
    for name in ("label_units", "create_concept", "show_unit_patches", "refresh_from_store", "neuron_map"):
        assert f"{PLUGIN_NAME}/{name}" in uris


# What FiftyOne finds in a plugins folder holding only a copy of ours, run in the App server's own folder
# (``fiftyone/server/`` is ``sys.path[0]`` there, whose ``workspace.py`` shadows our package).
PLAIN_INSTALL_PROBE = """
import json
import fiftyone.operators as foo
import fiftyone.plugins as fop
found = [p.name for p in fop.list_plugins()]
plugin = fop.get_plugin("@mammo/dissect")
info = dict(plugin.to_dict(), directory=plugin.directory)
registered = sorted(o.uri for o in foo.list_operators() if o.plugin_name == "@mammo/dissect")
print(json.dumps({"found": found, "info": info, "registered": registered}))
"""


def test_plugin_installs_the_fiftyone_way_from_a_plain_plugins_dir(fo_db, tmp_path):
    """A copy of the plugin folder in a bare ``FIFTYONE_PLUGINS_DIR`` (no launcher, no link, no
    ``PYTHONPATH``) is found by FiftyOne with its operators and panel, the project's licence and version,
    and ``fiftyone plugins requirements`` names the package that holds its code."""
    import fiftyone.server

    plugins_dir = tmp_path / "plugins"
    shutil.copytree(PLUGIN_DIR, plugins_dir / "mammo_dissect", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "home").mkdir()
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path / "home"),
           "FIFTYONE_PLUGINS_DIR": str(plugins_dir), "FIFTYONE_DATABASE_URI": fo_db.uri,
           "FIFTYONE_DATABASE_VALIDATION": "false", "FIFTYONE_DO_NOT_TRACK": "true"}
    server_dir = Path(fiftyone.server.__file__).parent
    probe = subprocess.run([sys.executable, "-c", PLAIN_INSTALL_PROBE], cwd=server_dir, env=env,
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    info = seen["info"]
    assert PLUGIN_NAME in seen["found"]
    assert info["directory"] == str(plugins_dir / "mammo_dissect")
    assert info["license"] == project["license"] == "Apache-2.0"
    assert info["version"] == project["version"]
    assert info["author"] and info["url"] is None
    operators = ["label_units", "create_concept", "show_unit_patches", "refresh_from_store"]
    assert info["operators"] == operators and info["panels"] == ["neuron_map"] and info["has_py"]
    # the plugin's code was imported and registered, not only its fiftyone.yml read
    assert seen["registered"] == sorted(operator_uri(n) for n in [*operators, "neuron_map"])

    cli = subprocess.run([str(Path(sys.executable).with_name("fiftyone")), "plugins", "requirements", PLUGIN_NAME,
                          "--print", "--ensure", "--error-level", "0"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr[-3000:]
    printed = cli.stdout.splitlines()
    assert f"{project['name']}=={project['version']}" in printed      # what --install would install
    assert any(line.startswith("fiftyone>=") for line in printed)
    # --ensure: that requirement is the distribution this environment has installed
    assert f"Requirement satisfied: {project['name']}=={project['version']}" in cli.stdout + cli.stderr


def test_label_units_operator_writes_the_store_and_the_dataset(fo_synced):
    from fiftyone import ViewField as F

    result = _execute("label_units", fo_synced.patches, units="1,2", concept="  Spiculated margin ")
    assert result.result == {"changed": 2}
    with ConceptStore(fo_synced.ws) as store:
        labels = store.labels(fo_synced.run.model_digest, fo_synced.run.layer)
        events = store.history(fo_synced.run.model_digest, fo_synced.run.layer, unit=1)
    assert labels[1].name == "Spiculated margin" and labels[2].name == "Spiculated margin"
    assert events[-1].source == "fiftyone"
    labelled = fo_synced.neurons.match(F("unit").is_in([1, 2]))
    assert labelled.values("concept.label") == ["Spiculated margin"] * 2
    # the same label again: a no-op
    assert _execute("label_units", fo_synced.patches, units=[1, 2], concept="spiculated MARGIN").result == \
        {"changed": 0}


def test_bad_operator_input_gives_one_clear_error(fo_synced):
    import fiftyone.operators as foo

    with pytest.raises(foo.executor.ExecutionError, match="out of range"):
        _execute("show_unit_patches", fo_synced.patches, unit=999)
    with pytest.raises(foo.executor.ExecutionError, match="cannot read unit 'ten'"):
        _execute("label_units", fo_synced.patches, units="3,ten", concept="x")
    with pytest.raises(foo.executor.ExecutionError, match="Required property"):
        _execute("label_units", fo_synced.patches, units="", concept="x")


def test_show_unit_patches_sets_the_view_best_first_with_masks(fo_synced):
    result = _execute("show_unit_patches", fo_synced.patches, unit=5)
    top = [int(p) for p in np.asarray(fo_synced.run.top_k)[5]]
    assert result.result["patch_ids"] == top
    requests = result.executor.to_json()["requests"]
    set_view = [r for r in requests if r["operator_uri"].endswith("set_view")]
    assert set_view, requests
    stages = str(set_view[0]["params"]["view"])
    assert "Select" in stages and "FilterLabels" in stages


def test_create_concept_and_refresh_operators(fo_synced):
    from fiftyone import ViewField as F

    made = _execute("create_concept", fo_synced.patches, name="Architectural distortion", colour="#123456")
    assert made.result["name"] == "Architectural distortion" and made.result["colour"] == "#123456"
    # another process (the Label Studio backend) labels unit 7; refresh copies it over
    with ConceptStore(fo_synced.ws) as store:
        store.label_units(fo_synced.run.model_digest, fo_synced.run.layer, [7], "Architectural distortion",
                          by="reader-1", source="labelstudio", n_units=16)
    assert _execute("refresh_from_store", fo_synced.patches).result == {"changed": 1}
    assert fo_synced.neurons.match(F("unit") == 7).first().concept.label == "Architectural distortion"
    assert _execute("refresh_from_store", fo_synced.patches).result == {"changed": 0}


def test_panel_renders_the_map_coloured_by_concept(fo_synced):
    with ConceptStore(fo_synced.ws) as store:
        store.label_units(fo_synced.run.model_digest, fo_synced.run.layer, [0], "Calcification cluster",
                          by="t", source="api", n_units=16)
        store.record_query(fo_synced.run.model_digest, fo_synced.run.layer, roi=np.ones((4, 4), bool),
                           ranking=[(9, 0.5), (10, 0.3), (0, 0.1)], aligned=[9, 10], iou_threshold=0.2,
                           asked_by="reader-1", source="labelstudio", image_id="I-standin")
    _result, rendered, _patches, _requests = _panel(fo_synced.patches, "on_load")
    plot = _find(rendered, "map")["view"]
    traces = {t["name"]: t for t in plot["data"]}
    assert traces["unlabelled"]["marker"]["color"] == "#b0b0b0"
    assert "0" in traces["Calcification cluster"]["ids"]
    all_ids = sorted(int(i) for t in plot["data"] for i in t["ids"])
    assert all_ids == list(range(16))
    unl = traces["unlabelled"]
    sizes = dict(zip(unl["ids"], unl["marker"]["size"], strict=True))
    assert sizes["9"] > sizes["11"] and sizes["10"] > sizes["11"]      # aligned units drawn larger
    hover = unl["text"][unl["ids"].index("9")]
    assert "unit 9" in hover and "IoU: 0.50" in hover
    assert plot["height"] == "420px"


def test_panel_click_shows_the_units_top_patches(fo_synced):
    _result, _rendered, patches, requests = _panel(fo_synced.patches, "on_click_unit", id="4", idx=0)
    assert patches.get("unit") == 4
    assert any(r["operator_uri"].endswith("set_view") for r in requests)
    _result, rendered, patches, requests = _panel(fo_synced.patches, "on_show_all", state={"unit": 4})
    assert patches["unit"] is None and any(r["operator_uri"].endswith("clear_view") for r in requests)
    assert _find(rendered, "all_btn") is None


def test_mask_overlay_outlines_and_tints_only_the_mask():
    from fiftyone_plugins.media import MASK_COLOUR, mask_outline, overlay_mask

    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    outline = mask_outline(mask, width=2)
    assert outline.sum() == 100 - 36 and not outline[7:13, 7:13].any()
    rgb = overlay_mask(np.full((20, 20), 100, np.uint8), mask)
    assert (rgb[5, 5] == MASK_COLOUR).all() and (rgb[0, 0] == 100).all()
    assert rgb[10, 10, 0] > 100 > rgb[10, 10, 2]          # tinted towards yellow inside


def test_panel_lasso_then_label_in_one_action(fo_synced):
    from fiftyone import ViewField as F

    selection = [{"id": "12", "idx": 0, "trace": "unlabelled"}, {"id": "13", "idx": 1, "trace": "unlabelled"}]
    _r, rendered, patches, _q = _panel(fo_synced.patches, "on_select_units", data=selection)
    assert patches["selected_units"] == [12, 13]
    state = {"selected_units": [12, 13]}
    # the empty selection event after the re-render does not wipe the selection
    _r, rendered, patches, _q = _panel(fo_synced.patches, "on_select_units", state=state, data=[])
    assert "selected_units" not in patches
    label_btn = _find(rendered, "label_btn")
    assert label_btn["view"]["label"] == "Label 2 unit(s)" and not label_btn["view"]["disabled"]
    # a new concept typed in wins over the dropdown; inputs and selection are cleared after use
    state["labelling"] = {"new_concept": "Dense tissue", "concept_choice": "Calcification cluster"}
    _r, rendered, patches, _q = _panel(fo_synced.patches, "on_label", state=state)
    assert patches["selected_units"] == []
    assert patches["labelling.new_concept"] == "" and patches["labelling.concept_choice"] is None
    with ConceptStore(fo_synced.ws) as store:
        labels = store.labels(fo_synced.run.model_digest, fo_synced.run.layer)
    assert labels[12].name == labels[13].name == "Dense tissue"
    assert fo_synced.neurons.match(F("unit") == 12).first().concept.label == "Dense tissue"
    # no input: a clear message, nothing written
    _r, _rendered, patches, requests = _panel(fo_synced.patches, "on_label", state={"selected_units": [14]})
    notes = [r for r in requests if r["operator_uri"].endswith("notify")]
    assert notes and "choose a concept" in notes[0]["params"]["message"]
    with ConceptStore(fo_synced.ws) as store:
        assert 14 not in store.labels(fo_synced.run.model_digest, fo_synced.run.layer)


def test_panel_on_a_foreign_dataset_says_what_to_do(fo_db):
    import fiftyone as fo

    other = fo.Dataset()
    _r, rendered, _p, _q = _panel(other, "on_load")
    assert "mammo fiftyone sync" in str(rendered)


def test_panel_report_view_for_the_selected_patch(fo_synced):
    import fiftyone.operators as foo
    from fiftyone import ViewField as F

    with ConceptStore(fo_synced.ws) as store:
        store.label_units(fo_synced.run.model_digest, fo_synced.run.layer, [3, 4], "Report concept",
                          by="t", source="api", n_units=16)
        store.record_query(fo_synced.run.model_digest, fo_synced.run.layer, roi=np.ones((4, 4), bool),
                           ranking=[(3, 0.6), (4, 0.2)], aligned=[3, 4], iou_threshold=0.2,
                           asked_by="reader-1", source="labelstudio", image_id="I-standin")
    sample = fo_synced.patches.match(F("patch_id") == 1003).first()
    params = {"__method__": "on_change_selected", "panel_id": "p", "panel_state": {}}
    result = foo.execute_operator(PANEL, dataset=fo_synced.patches, selected=[sample.id], params=params)
    rendered = [r["params"]["output"] for r in result.executor.to_json()["requests"]
                if r["operator_uri"].endswith("show_panel_output")][-1]
    assert "patch 1003" in str(_find(rendered, "report_title"))
    bars = _find(rendered, "report_0")["view"]["data"][0]
    row = bars["y"].index("Report concept (2)")
    acts = np.asarray(fo_synced.run.max_activations)[[3, 4], 3]
    thr = np.asarray(fo_synced.run.thresholds)[[3, 4]]
    assert bars["x"][row] == pytest.approx(float(np.mean(acts / thr)), rel=1e-5)
    iou_bars = _find(rendered, "report_1")["view"]["data"][0]
    assert iou_bars["x"][iou_bars["y"].index("Report concept (2)")] == pytest.approx(0.4)


def test_disputed_units_on_the_map_and_in_the_dataset(fo_synced, monkeypatch):
    """Two readers (their labels as the Label Studio backend writes them) and a curator labelling through the
    operator: units whose voters named different concepts get a red ring on the map, say who said what on
    hover, and carry ``disputed`` in the neurons dataset; the team's majority rule then decides the map's
    colours."""
    from fiftyone import ViewField as F

    from fiftyone_plugins.actions import DISPUTED_LINE

    model, layer = fo_synced.run.model_digest, fo_synced.run.layer
    with ConceptStore(fo_synced.ws) as store:   # three units nobody has said anything about yet
        first, second, third = [u for u in range(16) if u not in store.votes(model, layer)][:3]
        store.label_units(model, layer, [first, second], "Dispute mass", by="labelstudio:ana", source="labelstudio",
                          n_units=16)
        store.label_units(model, layer, [first], "Dispute calcification", by="labelstudio:ben", source="labelstudio",
                          n_units=16)
    monkeypatch.setenv("MAMMO_USER", "fiftyone:curator")
    # the curator agrees with Ana on both: a relabel back, and a confirm
    assert _execute("label_units", fo_synced.patches, units=f"{first},{second}", concept="Dispute mass").result == {"changed": 1}
    with ConceptStore(fo_synced.ws) as store:
        votes = store.votes(model, layer)
        assert votes[first] == {"labelstudio:ana": "Dispute mass", "labelstudio:ben": "Dispute calcification",
                             "fiftyone:curator": "Dispute mass"}
        assert votes[second] == {"labelstudio:ana": "Dispute mass", "fiftyone:curator": "Dispute mass"}
    _result, rendered, _patches, _requests = _panel(fo_synced.patches, "on_load")
    plot = _find(rendered, "map")["view"]
    ring = {}
    for trace in plot["data"]:
        for unit, width, colour, text in zip(trace["ids"], trace["marker"]["line"]["width"],
                                             trace["marker"]["line"]["color"], trace["text"], strict=True):
            ring[int(unit)] = (width, colour, text)
    assert ring[first][0] > 0 and ring[first][1] == DISPUTED_LINE and "labelstudio:ben: Dispute calcification" in ring[first][2]
    assert ring[second][0] == 0 and "disputed" not in ring[second][2]
    assert "Red ring: 1 disputed unit(s)" in json.dumps(_find(rendered, "header"))
    assert fo_synced.neurons.match(F("unit") == first).first().disputed is True
    assert fo_synced.neurons.match(F("unit") == second).first().disputed is False
    with ConceptStore(fo_synced.ws) as store:   # Ben disagrees on the second too; a third: Ana and Ben, one each
        store.label_units(model, layer, [second, third], "Dispute calcification", by="labelstudio:ben",
                          source="labelstudio", n_units=16)
        store.label_units(model, layer, [third], "Dispute mass", by="labelstudio:ana", source="labelstudio",
                          n_units=16)
    try:
        _execute("refresh_from_store", fo_synced.patches)
        concept = {u: (c.label if c else None) for u, c in zip(*fo_synced.neurons.values(["unit", "concept"]),
                                                                strict=True)}
        assert (concept[first], concept[second], concept[third]) == ("Dispute mass", "Dispute calcification", "Dispute mass")
        with ConceptStore(fo_synced.ws) as store:
            store.set_rule("majority", by="lead")
        _execute("refresh_from_store", fo_synced.patches)
        # majority: the first two mass (2 of 3 each), the third a tie, so no label on the map
        concept = {u: (c.label if c else None) for u, c in zip(*fo_synced.neurons.values(["unit", "concept"]),
                                                                strict=True)}
        assert (concept[first], concept[second], concept[third]) == ("Dispute mass", "Dispute mass", None)
        assert fo_synced.neurons.match(F("unit").is_in([first, second, third])).values("disputed") == [True] * 3
    finally:
        with ConceptStore(fo_synced.ws) as store:
            store.set_rule("latest", by="lead")
            store.remove_labels(model, layer, [first, second, third], by="test-cleanup", source="api")
        _execute("refresh_from_store", fo_synced.patches)


def test_proposals_on_the_map_accepted_and_rejected_in_one_action(fo_synced):
    """Units with a pending proposal are diamonds saying what is proposed; selecting units and pressing Accept
    labels them with their proposed concepts (Reject keeps them unlabelled), through the store."""
    from fiftyone import ViewField as F

    from fiftyone_plugins.actions import PROPOSED_SYMBOL
    from workspace.dissect.proposals import Proposal

    model, layer, run_id = fo_synced.run.model_digest, fo_synced.run.layer, fo_synced.run.run_id
    with ConceptStore(fo_synced.ws) as store:
        free = [u for u in range(16) if u not in store.votes(model, layer)][:2]
        store.save_proposals(run_id, model, layer, [
            Proposal(unit=free[0], concept="Proposed spiculation", attribute="finding", value="spiculated", iou=0.3,
                     n_lesions=12),
            Proposal(unit=free[1], concept="Proposed cluster", attribute="finding", value="cluster", iou=0.2,
                     n_lesions=5)])
    try:
        _result, rendered, _patches, _requests = _panel(fo_synced.patches, "on_load")
        plot = _find(rendered, "map")["view"]
        marks = {int(u): (symbol, text) for t in plot["data"]
                 for u, symbol, text in zip(t["ids"], t["marker"]["symbol"], t["text"], strict=True)}
        assert marks[free[0]][0] == PROPOSED_SYMBOL and "proposed: " in marks[free[0]][1]
        assert "Proposed spiculation (IoU 0.30 over 12 lesions)" in marks[free[0]][1]
        assert all(symbol == "circle" for u, (symbol, _t) in marks.items() if u not in free)
        _result, rendered, _patches, _requests = _panel(fo_synced.patches, "on_load",
                                                        state={"selected_units": free})
        assert _find(rendered, "accept_btn") is not None and _find(rendered, "reject_btn") is not None
        _panel(fo_synced.patches, "on_accept", state={"selected_units": [free[0]]})
        _panel(fo_synced.patches, "on_reject", state={"selected_units": [free[1]]})
        with ConceptStore(fo_synced.ws) as store:
            decided = {p.unit: p for p in store.proposals(model, layer, status=None) if p.unit in free}
            labels = store.current_labels(model, layer)
        assert decided[free[0]].status == "accepted" and decided[free[0]].decided_source == "fiftyone"
        assert decided[free[1]].status == "rejected" and free[1] not in labels
        assert labels[free[0]].name == "Proposed spiculation"
        assert fo_synced.neurons.match(F("unit") == free[0]).first().concept.label == "Proposed spiculation"
        _result, rendered, _patches, _requests = _panel(fo_synced.patches, "on_load")
        assert "Diamonds" not in json.dumps(_find(rendered, "header"))
    finally:
        with ConceptStore(fo_synced.ws) as store:
            store.remove_labels(model, layer, free, by="test-cleanup", source="api")
            store.db.execute("DELETE FROM concept_proposals WHERE run_id = ?", [run_id])
        _execute("refresh_from_store", fo_synced.patches)
