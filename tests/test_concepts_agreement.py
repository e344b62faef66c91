"""Agreement between readers: votes from the history, Cohen's and Fleiss' kappa against known values, the team's
label rule in what reports read, and `mammo concepts agreement | rule`."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from sklearn.metrics import cohen_kappa_score

from tests.test_concepts_cli import mammo
from tests.test_concepts_store import LAYER, MODEL, add_run
from workspace.base.errors import ConceptError
from workspace.dissect.agreement import agreement, cohen_kappa, fleiss_kappa
from workspace.dissect.concepts import ConceptStore

A, B, C = "labelstudio:ana@clinic", "labelstudio:ben@clinic", "fiftyone:cy"


def _team(store: ConceptStore) -> None:
    """Ana labels 0-2 mass; Ben agrees on 0-1, says calcification for 2 and 3; Cy (a curator) says 0 is
    calcification. Votes: 0 {A mass, B mass, C calc}, 1 {A mass, B mass}, 2 {A mass, B calc}, 3 {B calc}."""
    store.label_units(MODEL, LAYER, [0, 1, 2], "mass", by=A, source="labelstudio")
    store.label_units(MODEL, LAYER, [0, 1], "mass", by=B, source="labelstudio")
    store.label_units(MODEL, LAYER, [2, 3], "calcification", by=B, source="labelstudio")
    store.label_units(MODEL, LAYER, [0], "calcification", by=C, source="fiftyone")


@pytest.fixture
def store(ws):
    add_run(ws)
    with ConceptStore(ws) as s:
        yield s


def test_votes_count_a_second_reader_who_agrees(store):
    _team(store)
    assert store.votes(MODEL, LAYER) == {0: {A: "mass", B: "mass", C: "calcification"}, 1: {A: "mass", B: "mass"},
                                         2: {A: "mass", B: "calcification"}, 3: {B: "calcification"}}
    confirms = [e for e in store.history(MODEL, LAYER) if e.action == "confirm"]
    assert [(e.unit, e.actor) for e in confirms] == [(0, B), (1, B)]
    # saying it again adds nothing; the current labels are as before (the last given)
    store.label_units(MODEL, LAYER, [1], "mass", by=B, source="labelstudio")
    assert len([e for e in store.history(MODEL, LAYER) if e.action == "confirm"]) == 2
    assert {u: c.name for u, c in store.current_labels(MODEL, LAYER).items()} == \
           {0: "calcification", 1: "mass", 2: "calcification", 3: "calcification"}


def test_agreement_per_unit_per_concept_and_kappas(store):
    _team(store)
    found = store.agreement(MODEL, LAYER)
    assert found.readers == sorted([A, B, C]) and found.n_shared == 3
    assert [u.unit for u in found.disputed] == [0, 2]
    assert [u.unit for u in found.units if u.agreed] == [1]
    by_name = {c.name: c for c in found.concepts}
    assert (by_name["mass"].units, by_name["mass"].shared, by_name["mass"].agreed, by_name["mass"].disputed) == \
           (3, 3, 1, 2)
    assert (by_name["calcification"].units, by_name["calcification"].shared, by_name["calcification"].agreed,
            by_name["calcification"].disputed) == (3, 2, 0, 2)
    pairs = {p.readers: p for p in found.pairs}
    ana_ben = pairs[(A, B)]
    assert ana_ben.shared == 3 and ana_ben.observed == pytest.approx(2 / 3)
    assert ana_ben.kappa == pytest.approx(cohen_kappa_score(["mass"] * 3, ["mass", "mass", "calcification"]))
    # Fleiss by hand: P_i = 1/3, 1, 0 (mean 4/9); p = 5/7 mass, 2/7 calcification (chance 29/49)
    assert found.fleiss_kappa == pytest.approx((4 / 9 - 29 / 49) / (1 - 29 / 49))
    text = found.to_text()
    assert "disputed unit 0: fiftyone:cy: calcification" in text and "Fleiss' kappa -0.36" in text


def test_kappas_against_published_and_library_values():
    # Fleiss (1971) as worked on Wikipedia's "Fleiss' kappa" page: 10 subjects, 14 raters, 5 categories, 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    counts = [Counter({f"c{j}": n for j, n in enumerate(row) if n}) for row in table]
    assert fleiss_kappa(counts) == pytest.approx(0.20993, abs=5e-5)
    first = ["a", "a", "b", "b", "c", "a", "b", "c", "c", "a"]
    second = ["a", "b", "b", "b", "c", "a", "c", "c", "a", "a"]
    assert cohen_kappa(list(zip(first, second, strict=True))) == pytest.approx(cohen_kappa_score(first, second))
    assert cohen_kappa([("a", "a"), ("a", "a")]) is None       # one concept only: chance agreement is 1
    assert cohen_kappa([]) is None and fleiss_kappa([Counter({"a": 1})]) is None
    lone = agreement({5: {A: "mass"}})
    assert lone.n_shared == 0 and lone.fleiss_kappa is None and "No unit has votes from two readers" in lone.to_text()


def test_the_team_rule_decides_what_reports_read(store):
    _team(store)
    assert store.rule() == "latest"
    latest = {u: c.name for u, c in store.labels(MODEL, LAYER).items()}
    assert latest == {0: "calcification", 1: "mass", 2: "calcification", 3: "calcification"}
    assert store.labellers(MODEL, LAYER)[0] == C
    assert store.labels_and_labellers(MODEL, LAYER) == (store.labels(MODEL, LAYER), store.labellers(MODEL, LAYER))
    store.set_rule("majority", by="lead")
    # 0: mass 2 of 3; 1: mass; 2: a tie, left out; 3: Ben alone
    assert {u: c.name for u, c in store.labels(MODEL, LAYER).items()} == {0: "mass", 1: "mass", 3: "calcification"}
    assert store.labellers(MODEL, LAYER) == {0: f"{A}, {B}", 1: f"{A}, {B}", 3: B}
    assert store.labels_and_labellers(MODEL, LAYER) == (store.labels(MODEL, LAYER), store.labellers(MODEL, LAYER))
    # a remove withdraws that reader's vote only; under the majority rule the others' still count
    store.remove_labels(MODEL, LAYER, [1], by=A, source="cli")
    assert store.votes(MODEL, LAYER)[1] == {B: "mass"}
    assert store.labels(MODEL, LAYER)[1].name == "mass" and 1 not in store.current_labels(MODEL, LAYER)
    with pytest.raises(ConceptError, match="label rule 'loudest'"):
        store.set_rule("loudest", by="lead")
    assert store.rule() == "majority"


def test_cli_agreement_and_rule(ws, capsys):
    add_run(ws)
    with ConceptStore(ws) as store:
        _team(store)
    code, out, _ = mammo(ws, capsys, "concepts", "agreement")
    assert code == 0 and "3 reader(s), 4 unit(s) with a vote, 3 shared" in out
    assert f"disputed unit 2: {A}: mass; {B}: calcification" in out and "Cohen's kappa" in out
    code, out, _ = mammo(ws, capsys, "concepts", "agreement", "--json")
    data = json.loads(out)
    assert code == 0 and [u["unit"] for u in data["units"] if u["disputed"]] == [0, 2]
    code, out, _ = mammo(ws, capsys, "concepts", "rule")
    assert code == 0 and out.strip() == "label rule: latest"
    code, out, _ = mammo(ws, capsys, "concepts", "rule", "majority", "--by", "lead")
    assert code == 0 and out.strip() == "label rule: majority"
    code, out, _ = mammo(ws, capsys, "concepts", "list", "--concept", "mass")
    assert code == 0
    with pytest.raises(SystemExit) as refused:
        mammo(ws, capsys, "concepts", "rule", "loudest")
    assert refused.value.code == 2 and "invalid choice" in capsys.readouterr().err
