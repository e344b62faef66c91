"""Report numbers against a hand computation, and the four output forms."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from workspace.base.errors import ConceptError
from workspace.dissect.concepts import ConceptStore
from workspace.dissect.reports import ReportError, build_report

MODEL, LAYER = "0123456789abcdef", "features.29"

# Six units, two concepts, explicit numbers:
#   unit:        0    1    2    3    4    5
ACTS = [2.0, 4.0, 1.0, 3.0, 0.5, 6.0]      # max activation of each unit on the image
T = [1.0, 2.0, 4.0, 1.5, 0.5, 3.0]         # dissection thresholds -> normalised 2, 2, .25, 2, 1, 2
IOU = [0.5, 0.1, 0.0, 0.3, 0.25, 0.05]     # mask IoU with the ROI -> aligned (>= .2): 0, 3, 4
# mass = units 0, 1, 2; calcification = unit 3; units 4 and 5 unlabelled.


@pytest.fixture
def labels(ws):
    with ConceptStore(ws) as store:
        store.label_units(MODEL, LAYER, [0, 1, 2], "mass", by="r1", source="cli", n_units=6)
        store.label_units(MODEL, LAYER, [3], "calcification", by="r1", source="cli", n_units=6)
        return store.labels(MODEL, LAYER)


def test_numbers_match_hand_computation(labels):
    report = build_report(ACTS, T, labels, iou=IOU, image_id="I-1", model_digest=MODEL, layer=LAYER)
    mass, calc = report.concept("mass"), report.concept("Calcification")
    # mass: raw (2 + 4 + 1) / 3; normalised (2/1 + 4/2 + 1/4) / 3 = 4.25 / 3; IoU (.5 + .1 + 0) / 3
    assert mass.mean_activation == pytest.approx(7 / 3)
    assert mass.mean_normalised == pytest.approx(4.25 / 3)
    assert mass.mean_iou == pytest.approx(0.2)
    assert (mass.n_units, mass.n_normalised, mass.n_aligned) == (3, 3, 1)
    assert mass.unit_normalised == pytest.approx([2.0, 2.0, 0.25])
    # calcification: one unit, 3 / 1.5 = 2
    assert (calc.mean_activation, calc.mean_normalised, calc.mean_iou) == pytest.approx((3.0, 2.0, 0.3))
    assert calc.n_units == 1
    # strongest normalised first (the raw order would be the other way round)
    assert [s.name for s in report.concepts] == ["calcification", "mass"]
    # aligned: IoU >= 0.2 -> 0, 3, 4; unlabelled among them -> unit 4 only
    assert report.aligned == [0, 3, 4]
    assert [(c.unit, c.iou, c.activation, c.normalised) for c in report.label_me] == [(4, 0.25, 0.5, 1.0)]
    assert (report.n_units, report.n_labelled, report.has_roi) == (6, 4, True)


def test_without_roi_and_explicit_aligned_set(labels):
    report = build_report(ACTS, T, labels)
    assert not report.has_roi and report.label_me == [] and report.aligned == []
    assert all(s.mean_iou is None and s.unit_iou is None for s in report.concepts)
    # an explicit aligned set wins over the threshold; candidates ranked by IoU
    report = build_report(ACTS, T, labels, iou=IOU, aligned=[5, 4, 1])
    assert [c.unit for c in report.label_me] == [4, 5]
    assert report.concept("mass").n_aligned == 1


def test_dead_unit_left_out_of_normalised_mean_only(labels):
    thresholds = list(T)
    thresholds[2] = 0.0                         # unit 2 (mass) never reaches a positive threshold
    report = build_report(ACTS, thresholds, labels, iou=IOU)
    mass = report.concept("mass")
    assert mass.mean_activation == pytest.approx(7 / 3)
    assert mass.mean_normalised == pytest.approx(2.0) and mass.n_normalised == 2
    assert mass.unit_normalised[2] is None
    assert any("T <= 0" in note for note in report.notes)
    json.loads(report.to_json())                # still valid JSON (no NaN)


def test_bad_inputs_give_clear_errors(labels):
    with pytest.raises(ReportError, match="6 activations but 5 thresholds"):
        build_report(ACTS, T[:5], labels)
    with pytest.raises(ReportError, match="6 activations but 2 IoUs"):
        build_report(ACTS, T, labels, iou=[0.1, 0.2])
    with pytest.raises(ReportError, match="shape"):
        build_report(np.ones((2, 3)), np.ones((2, 3)), {})
    with pytest.raises(ReportError, match="NaN"):
        build_report([1.0, float("nan")], [1.0, 1.0], {})
    with pytest.raises(ConceptError, match="another model or layer"):
        build_report(ACTS[:3], T[:3], labels)


def test_empty_store_report_is_well_formed():
    report = build_report(ACTS, T, {}, iou=IOU)
    assert report.concepts == [] and [c.unit for c in report.label_me] == [0, 3, 4]
    assert "No labelled units yet" in report.to_text()
    assert "No labelled units yet" in report.to_html()


def test_outputs_json_text_html(labels):
    roi = {"bbox": [10, 20, 30, 40], "area": 1200}
    report = build_report(ACTS, T, labels, iou=IOU, image_id="I-1", model_digest=MODEL, layer=LAYER,
                          run_id="run-x", roi=roi)
    data = json.loads(report.to_json())
    assert data["concepts"][0]["name"] == "calcification" and data["concepts"][1]["n_units"] == 3
    assert data["label_me"] == [{"unit": 4, "iou": 0.25, "activation": 0.5, "normalised": 1.0, "proposal": None}]
    assert data["roi"] == {"bbox": [10, 20, 30, 40], "area": 1200}

    text = report.to_text()
    lines = text.splitlines()
    assert len(lines) <= 6 and max(len(line) for line in lines) < 100
    assert lines[1] == "calcification: 2.00xT (raw 3.00, 1 unit), ROI IoU 0.30"
    assert lines[2] == "mass: 1.42xT (raw 2.33, 3 units), ROI IoU 0.20"
    assert lines[-1] == "Label me: unit 4 (0.25)"

    page = report.to_html()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"(src|href)=\"https?:", page) and "<script" not in page
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) == 2
    for svg in svgs:
        ET.fromstring(svg)                      # well-formed XML
    # bar widths proportional to the values: calcification 2.0, mass 1.4167 on the same axis
    widths = [float(w) for w in re.findall(r'<rect x="180" y="[\d.]+" width="([\d.]+)"', svgs[0])]
    assert widths[1] / widths[0] == pytest.approx(4.25 / 3 / 2.0, rel=0.01)
    iou_widths = [float(w) for w in re.findall(r'<rect x="180" y="[\d.]+" width="([\d.]+)"', svgs[1])]
    assert iou_widths[0] / iou_widths[1] == pytest.approx(0.3 / 0.2, rel=0.01)
    assert "3 units" in page and "unit 4" in page


def test_save_picks_format_from_suffix(labels, tmp_path):
    report = build_report(ACTS, T, labels, iou=IOU)
    assert json.loads(report.save(tmp_path / "r.json").read_text())["n_units"] == 6
    assert report.save(tmp_path / "r.txt").read_text().startswith("4/6 units labelled")
    assert "<svg" in report.save(tmp_path / "r.html").read_text()


def test_activation_over_threshold_has_one_definition_for_reports_and_fiftyone():
    from types import SimpleNamespace

    from fiftyone_plugins.sync import _relative
    from workspace.dissect.dissection import relative_activation

    acts = np.array([[2.0, 0.5], [0.0, 0.0], [3.0, 6.0]])
    thresholds = np.array([2.0, 0.0, 3.0])  # unit 1 never reached its quantile: no scale
    rel = relative_activation(acts, thresholds)
    np.testing.assert_allclose(rel[[0, 2]], [[1.0, 0.25], [1.0, 2.0]])
    assert np.isnan(rel[1]).all()
    ranked = _relative(SimpleNamespace(max_activations=acts, thresholds=thresholds))
    assert [int(np.argsort(-ranked[:, j], kind="stable")[-1]) for j in range(2)] == [1, 1]  # last on every patch
    report = build_report(acts[:, 1], thresholds, {})
    assert "1 unit(s) have T <= 0" in " ".join(report.notes)


def test_the_report_says_who_labelled_what(ws):
    """Two readers label units of the same concept, a third another: the report names the readers of the current
    labels, the one with more units first, in the text and per unit."""
    with ConceptStore(ws) as store:
        store.label_units(MODEL, LAYER, [0], "mass", by="labelstudio:ana@clinic", source="labelstudio", n_units=6)
        store.label_units(MODEL, LAYER, [2, 1], "mass", by="labelstudio:ben@clinic", source="labelstudio", n_units=6)
        store.label_units(MODEL, LAYER, [3], "calcification", by="fiftyone:cy", source="fiftyone", n_units=6)
        labels_now = store.labels(MODEL, LAYER)
        report = build_report(ACTS, T, labels_now, iou=IOU, labelled_by=store.labellers(MODEL, LAYER))
    mass, calc = report.concept("mass"), report.concept("calcification")
    assert mass.unit_labelled_by == ["labelstudio:ana@clinic", "labelstudio:ben@clinic", "labelstudio:ben@clinic"]
    assert mass.labelled_by == ["labelstudio:ben@clinic", "labelstudio:ana@clinic"]
    assert calc.labelled_by == ["fiftyone:cy"]
    text = report.to_text()
    assert "by labelstudio:ben@clinic, labelstudio:ana@clinic" in text and "by fiftyone:cy" in text
    assert report.to_html().count("labelstudio:ben@clinic") == 2   # one row per unit
    assert build_report(ACTS, T, labels_now).concept("mass").labelled_by == []   # not asked: not shown


def test_label_me_units_carry_their_proposals(labels):
    """An aligned unit without a concept but with a pending proposal says so in the "label me" list."""
    report = build_report(ACTS, T, labels, iou=IOU, proposals={4: "spiculated (IoU 0.03 over 9 lesions)",
                                                               1: "labelled units do not list it"})
    assert [(c.unit, c.proposal) for c in report.label_me] == [(4, "spiculated (IoU 0.03 over 9 lesions)")]
    assert "Label me: unit 4 (0.25; proposed: spiculated (IoU 0.03 over 9 lesions))" in report.to_text()
    assert "<th>proposed concept</th>" in report.to_html() and "over 9 lesions" in report.to_html()
    assert "proposed" not in build_report(ACTS, T, labels, iou=IOU).to_text()
