"""`mammo concepts ...` end to end through the real CLI entry point."""

from __future__ import annotations

import json

from tests.test_concepts_store import LAYER, MODEL, add_run
from workspace.app.cli import main
from workspace.dissect.concepts import ConceptStore


def mammo(ws, capsys, *argv):
    code = main(["--workspace", str(ws.root), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_label_list_remove_history_with_default_run(ws, capsys, monkeypatch):
    monkeypatch.setenv("MAMMO_USER", "dr-a")
    code, _, err = mammo(ws, capsys, "concepts", "label", "--unit", "1", "--concept", "mass")
    assert code == 1 and "no dissection run in this workspace yet" in err and "Traceback" not in err
    add_run(ws, n_units=16)                                      # the newest run is the default scope

    code, out, _ = mammo(ws, capsys, "concepts", "create", " Mass ", "--description", "dense lesion",
                         "--colour", "#cc79a7")
    assert code == 0 and "'Mass' (#cc79a7)" in out
    code, out, _ = mammo(ws, capsys, "concepts", "label", "--unit", "1-3,7", "--concept", "mass")
    assert code == 0 and out.startswith("4 of 4 unit(s) now labelled 'Mass'")
    code, out, _ = mammo(ws, capsys, "concepts", "label", "--unit", "3,4", "--concept", "calcification")
    assert code == 0 and "2 of 2" in out

    code, out, _ = mammo(ws, capsys, "concepts", "list", "--json")
    assert {c["name"]: c["n_units"] for c in json.loads(out)} == {"Mass": 3, "calcification": 2}
    code, out, _ = mammo(ws, capsys, "concepts", "list", "--concept", "MASS")
    assert "Mass: 3 unit(s)" in out and out.rstrip().endswith("1, 2, 7")

    code, out, _ = mammo(ws, capsys, "concepts", "remove", "--concept", "calcification")
    assert code == 0 and out.startswith("2 label(s) removed")
    code, out, _ = mammo(ws, capsys, "concepts", "history", "--json")
    events = json.loads(out)
    assert [e["action"] for e in events] == ["add"] * 4 + ["relabel", "add", "remove", "remove"]
    assert {e["actor"] for e in events} == {"dr-a"} and {e["source"] for e in events} == {"cli"}
    code, out, _ = mammo(ws, capsys, "concepts", "history", "--at", events[5]["at"], "--json")
    assert json.loads(out) == {"1": "Mass", "2": "Mass", "3": "calcification", "4": "calcification",
                               "7": "Mass"}
    code, out, _ = mammo(ws, capsys, "concepts", "history")
    assert "relabel" in out and "dr-a" in out

    rows = ConceptStore(ws).label_rows(MODEL, LAYER)
    assert [(r.unit, r.concept.name, r.labelled_by, r.run_id) for r in rows] == [
        (1, "Mass", "dr-a", "run-1"), (2, "Mass", "dr-a", "run-1"), (7, "Mass", "dr-a", "run-1")]


def test_cli_bad_input_is_one_clear_error(ws, capsys):
    add_run(ws, n_units=16)
    for argv, message in [
        (["concepts", "label", "--unit", "3,99", "--concept", "mass"], "unknown unit 99"),
        (["concepts", "label", "--unit", "3", "--concept", "  "], "cannot be empty"),
        (["concepts", "label", "--unit", "3", "--concept", "mass", "--run", "nope"], "no dissection run 'nope'"),
        (["concepts", "label", "--unit", "x", "--concept", "mass"], "cannot read unit 'x'"),
        (["concepts", "create", "vessel", "--colour", "blue"], "#rrggbb"),
        (["concepts", "list", "--concept", "nothing"], "no concept 'nothing'"),
        (["report", "I-x", "--roi", "1,2"], "--roi is x,y,w,h"),
    ]:
        code, _, err = mammo(ws, capsys, *argv)
        assert code == 1 and message in err and "Traceback" not in err, (argv, err)
    assert ConceptStore(ws).history() == [] and ConceptStore(ws).list_concepts() == []


def test_label_without_run_needs_model_layer_and_count(ws, capsys):
    code, out, _ = mammo(ws, capsys, "concepts", "label", "--model", "m1", "--layer", "conv5", "--n-units", "8",
                         "--unit", "0-7", "--concept", "texture", "--by", "curator")
    assert code == 0 and "8 of 8" in out
    code, _, err = mammo(ws, capsys, "concepts", "label", "--model", "m1", "--layer", "conv5", "--n-units", "8",
                         "--unit", "8", "--concept", "texture")
    assert code == 1 and "units 0..7" in err
    assert sorted(ConceptStore(ws).labels("m1", "conv5")) == list(range(8))
