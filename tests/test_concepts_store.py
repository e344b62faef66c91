"""The concept store: names, group labelling, one concept per unit, history, ROI queries, bad input."""

from __future__ import annotations

import sqlite3
import time

import numpy as np
import pytest

from workspace.base.errors import ConceptError
from workspace.base.schema import connect, utc_now
from workspace.dissect.concepts import (
    PALETTE,
    ConceptStore,
    decode_roi,
    encode_roi,
    parse_units,
    ranking_from_iou,
)

MODEL, LAYER = "a1b2c3d4e5f60718", "features.29"


def add_run(ws, run_id="run-1", model=MODEL, layer=LAYER, n_units=16):
    """A row in the real dissection_runs table (the store reads n_units from it)."""
    db = connect(ws.catalog_path)
    db.execute(
        "INSERT INTO dissection_runs (run_id, model_digest, layer, patch_set, patch_set_digest, quantile, top_k, "
        "n_units, n_patches, path, status, created_at, finished_at) "
        "VALUES (?, ?, ?, 'default', 'x', 0.99, 4, ?, 10, 'runs/x', 'complete', ?, ?)",
        [run_id, model, layer, n_units, utc_now(), utc_now()])
    db.conn.close()
    return run_id


@pytest.fixture
def store(ws):
    add_run(ws)
    with ConceptStore(ws) as s:
        yield s


def counts(store):
    return {c.name: c.n_units for c in store.list_concepts()}


def test_names_merge_ignoring_case_and_spaces(store):
    mass = store.create_concept("Mass", "alice", description="a dense lesion")
    again = store.create_concept("  mASS ", "bob", description="other", colour="#000000")
    assert again == mass                                   # the first spelling, description, colour win
    spaced = store.create_concept("lesion  like\ttexture", "bob")
    assert spaced.name == "lesion like texture"
    assert store.get_concept("LESION LIKE TEXTURE").concept_id == spaced.concept_id
    assert store.get_concept(mass.concept_id).name == "Mass"
    assert [c.name for c in store.list_concepts()] == ["lesion like texture", "Mass"]
    with pytest.raises(ConceptError, match="no concept 'calc'.*known: lesion like texture, Mass"):
        store.get_concept("calc")


def test_colours_from_palette_unless_given(store):
    a = store.create_concept("a", "x")
    b = store.create_concept("b", "x")
    c = store.create_concept("c", "x", colour="#ABC")
    d = store.create_concept("d", "x")
    assert (a.colour, b.colour) == PALETTE[:2]
    assert c.colour == "#aabbcc"
    assert d.colour == PALETTE[2]                          # the least used palette colour
    with pytest.raises(ConceptError, match="#rrggbb"):
        store.create_concept("e", "x", colour="red")


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
def test_empty_concept_name_rejected_nothing_written(store, name):
    with pytest.raises(ConceptError, match="cannot be empty"):
        store.create_concept(name, "x")
    with pytest.raises(ConceptError, match="cannot be empty"):
        store.label_units(MODEL, LAYER, [1, 2], name, by="x", source="cli")
    assert store.list_concepts() == [] and store.history() == []


def test_group_label_relabel_and_noop(store):
    assert store.label_units(MODEL, LAYER, [1, 2, 3], "mass", by="alice", source="labelstudio") == 3
    assert counts(store) == {"mass": 3}
    # same concept again: no change; another reader's agreement is recorded (a confirm), a repeat is not
    assert store.label_units(MODEL, LAYER, [1, 2], "MASS", by="bob", source="cli") == 0
    assert store.label_units(MODEL, LAYER, [1, 2], "mass", by="alice", source="cli") == 0
    assert [e.action for e in store.history()] == ["add"] * 3 + ["confirm"] * 2
    assert store.label_units(MODEL, LAYER, [1, 2], "mass", by="bob", source="cli") == 0
    assert len(store.history()) == 5
    # one concept per unit: 3 moves to calcification (relabel), 4 is new (add)
    assert store.label_units(MODEL, LAYER, "3-4", "calcification", by="bob", source="fiftyone") == 2
    labels = store.labels(MODEL, LAYER)
    assert {u: c.name for u, c in labels.items()} == {1: "mass", 2: "mass", 3: "calcification", 4: "calcification"}
    assert counts(store) == {"calcification": 2, "mass": 2}
    assert store.units_of("Mass", MODEL, LAYER) == [1, 2]
    events = store.history()
    assert [(e.unit, e.action, e.name_before, e.name_after) for e in events[5:]] == [
        (3, "relabel", "mass", "calcification"), (4, "add", None, "calcification")]
    rows = {r.unit: r for r in store.label_rows(MODEL, LAYER)}
    assert rows[1].labelled_by == "alice" and rows[1].source == "labelstudio" and rows[1].run_id == "run-1"
    assert rows[3].labelled_by == "bob" and rows[3].source == "fiftyone"


def test_labels_belong_to_model_and_layer(store, ws):
    add_run(ws, "run-2", model="ffff000011112222", n_units=16)
    store.label_units(MODEL, LAYER, [5], "mass", by="a", source="api")
    store.label_units("ffff000011112222", LAYER, [5], "calcification", by="a", source="api")
    store.label_units(MODEL, "features.27", [5], "vessel", by="a", source="api", n_units=8)
    assert store.labels(MODEL, LAYER)[5].name == "mass"
    assert store.labels("ffff000011112222", LAYER)[5].name == "calcification"
    assert store.labels(MODEL, "features.27")[5].name == "vessel"
    assert {c.name: c.n_units for c in store.list_concepts(MODEL, LAYER)} == {
        "calcification": 0, "mass": 1, "vessel": 0}


def test_bad_group_writes_nothing(store, ws):
    store.label_units(MODEL, LAYER, [0], "mass", by="a", source="cli")
    before = (store.labels(MODEL, LAYER), store.history(), store.list_concepts())
    with pytest.raises(ConceptError, match=r"unknown unit 16, 99: layer features.29 has units 0\.\.15"):
        store.label_units(MODEL, LAYER, [1, 2, 16, 99], "new concept", by="a", source="cli")
    with pytest.raises(ConceptError, match="no dissection run 'nope'"):
        store.label_units(None, None, [1], "new concept", by="a", source="cli", run_id="nope")
    with pytest.raises(ConceptError, match="no dissection run of model 0000 layer features.29"):
        store.label_units("0000", LAYER, [1], "new concept", by="a", source="cli")
    with pytest.raises(ConceptError, match="run run-1 dissected model"):
        store.label_units("0000", LAYER, [1], "new concept", by="a", source="cli", run_id="run-1")
    with pytest.raises(ConceptError, match="is negative"):
        store.label_units(MODEL, LAYER, [1, -2], "new concept", by="a", source="cli")
    with pytest.raises(ConceptError, match="no ROI query 42"):
        store.label_units(MODEL, LAYER, [1], "new concept", by="a", source="cli", query_id=42)
    with pytest.raises(ConceptError, match="unknown label source"):
        store.label_units(MODEL, LAYER, [1], "new concept", by="a", source="web")
    with pytest.raises(ConceptError, match="say who"):
        store.label_units(MODEL, LAYER, [1], "new concept", by=" ", source="cli")
    with pytest.raises(ConceptError, match="no concept 'other'"):
        store.label_units(MODEL, LAYER, [1], "other", by="a", source="cli", create=False)
    # the concept of a refused group was not created either
    assert (store.labels(MODEL, LAYER), store.history(), store.list_concepts()) == before


def test_failure_mid_group_rolls_back(store, ws):
    """A real fault in the middle of a group (the history refuses a write) leaves nothing behind."""
    store.label_units(MODEL, LAYER, [0, 1], "mass", by="a", source="cli")
    blocker = sqlite3.connect(ws.catalog_path)
    blocker.execute("CREATE TRIGGER refuse_unit_7 BEFORE INSERT ON label_events WHEN NEW.unit = 7 "
                    "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    blocker.commit()
    with pytest.raises(sqlite3.IntegrityError, match="refused"):
        store.label_units(MODEL, LAYER, [1, 5, 6, 7, 8], "calcification", by="a", source="cli")
    assert {u: c.name for u, c in store.labels(MODEL, LAYER).items()} == {0: "mass", 1: "mass"}
    assert len(store.history()) == 2
    assert store.find_concept("calcification") is None


def test_remove_by_units_and_by_concept(store):
    store.label_units(MODEL, LAYER, [1, 2, 3], "mass", by="a", source="cli")
    store.label_units(MODEL, LAYER, [4, 5], "calcification", by="a", source="cli")
    assert store.remove_labels(MODEL, LAYER, [2, 9], by="b", source="cli") == 1       # 9 was not labelled
    assert store.remove_labels(MODEL, LAYER, by="b", source="cli", concept="calcification") == 2
    assert sorted(store.labels(MODEL, LAYER)) == [1, 3]
    removes = [e for e in store.history() if e.action == "remove"]
    assert [(e.unit, e.name_before, e.actor) for e in removes] == [
        (2, "mass", "b"), (4, "calcification", "b"), (5, "calcification", "b")]
    with pytest.raises(ConceptError, match="say which labels"):
        store.remove_labels(MODEL, LAYER, by="b", source="cli")
    # an index the layer does not have (16 units in its run) is refused, and nothing is removed
    with pytest.raises(ConceptError, match=r"unknown unit 16: layer features.29 has units 0\.\.15"):
        store.remove_labels(MODEL, LAYER, [1, 16], by="b", source="cli")
    assert sorted(store.labels(MODEL, LAYER)) == [1, 3] and len(store.history()) == 8


def test_history_is_append_only(store, ws):
    store.label_units(MODEL, LAYER, [1], "mass", by="a", source="cli")
    raw = sqlite3.connect(ws.catalog_path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("DELETE FROM label_events")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("UPDATE label_events SET actor = 'x'")
    raw.rollback()
    assert len(store.history()) == 1


def test_labels_at_rebuilds_every_past_state(store):
    moments, states = [], []

    def snapshot():
        time.sleep(0.003)
        moments.append(utc_now())
        states.append({u: c.name for u, c in store.labels(MODEL, LAYER).items()})
        time.sleep(0.003)

    snapshot()
    store.label_units(MODEL, LAYER, [1, 2, 3], "mass", by="a", source="cli")
    snapshot()
    store.label_units(MODEL, LAYER, [3, 4], "calcification", by="b", source="cli")
    snapshot()
    store.remove_labels(MODEL, LAYER, [1], by="c", source="cli")
    snapshot()
    store.label_units(MODEL, LAYER, [1], "calcification", by="c", source="cli")
    snapshot()
    assert states[0] == {} and states[-1] == {1: "calcification", 2: "mass", 3: "calcification",
                                              4: "calcification"}
    for when, expected in zip(moments, states, strict=True):
        assert {u: c.name for u, c in store.labels_at(MODEL, LAYER, when).items()} == expected
    with pytest.raises(ConceptError, match="cannot read the time"):
        store.labels_at(MODEL, LAYER, "yesterday")


def test_roi_queries_recorded_and_labels_point_to_them(store):
    roi = np.zeros((64, 64), bool)
    roi[10:20, 30:45] = True
    roi[12, 30] = False
    iou = np.zeros(16, np.float32)
    iou[[3, 7, 9]] = [0.1, 0.5, 0.25]
    assert store.latest_query() is None
    qid = store.record_query(MODEL, LAYER, roi=roi, ranking=iou, aligned=[7, 9], iou_threshold=0.2,
                             asked_by="alice", source="labelstudio", image_id="I-1", patch_box=[0, 0, 512, 512],
                             run_id="run-1")
    q = store.latest_query(MODEL, LAYER)
    assert q.query_id == qid and q.image_id == "I-1" and q.patch_box == [0, 0, 512, 512]
    assert q.ranking == [(7, 0.5), (9, 0.25), (3, pytest.approx(0.1))] and q.aligned == [7, 9]
    assert np.array_equal(decode_roi(q.roi), roi) and q.roi["bbox"] == [30, 10, 15, 10]
    assert np.allclose(q.iou_array(16), iou)
    store.label_units(MODEL, LAYER, q.aligned, "mass", by="alice", source="labelstudio", query_id=qid)
    assert {r.query_id for r in store.label_rows(MODEL, LAYER)} == {qid}
    assert {e.query_id for e in store.history()} == {qid}
    assert store.latest_query(model_digest="other") is None
    # a label cannot claim to come from a query about another model's (or layer's) units
    with pytest.raises(ConceptError, match=f"ROI query {qid} asked model {MODEL} layer {LAYER}, not model "
                                           "m2 layer conv5"):
        store.label_units("m2", "conv5", [1], "mass", by="alice", source="api", n_units=4, query_id=qid)
    assert store.labels("m2", "conv5") == {}


def test_roi_encoding_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((rng.integers(1, 40), rng.integers(1, 40))) < rng.random()
        assert np.array_equal(decode_roi(encode_roi(mask)), mask)
    assert encode_roi(np.zeros((3, 3), bool))["bbox"] is None


def test_parse_units():
    assert parse_units("3,5, 10-12,5") == [3, 5, 10, 11, 12]
    assert parse_units(np.array([4, 1, 4])) == [1, 4]
    assert parse_units(7) == [7]
    for bad in ("3-1", "x", [True], [1.5]):
        with pytest.raises(ConceptError):
            parse_units(bad)
    assert ranking_from_iou(np.array([0.2, 0.0, 0.5, 0.2])) == [(2, 0.5), (0, 0.2), (3, 0.2)]


def test_busy_store_retries_then_says_so(ws):
    """A real write lock held by another connection: short holds are waited out, long ones give a
    clear ConceptError (never "database is locked")."""
    add_run(ws)
    store = ConceptStore(ws, busy_timeout_s=0.05, retries=3)
    holder = sqlite3.connect(ws.catalog_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(ConceptError, match="busy"):
        store.label_units(MODEL, LAYER, [1], "mass", by="a", source="cli")
    holder.execute("ROLLBACK")
    assert store.labels(MODEL, LAYER) == {}

    import threading
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(0.15, lambda: holder.execute("COMMIT")).start()
    patient = ConceptStore(ws, busy_timeout_s=0.05, retries=20)
    assert patient.label_units(MODEL, LAYER, [1], "mass", by="a", source="cli") == 1
