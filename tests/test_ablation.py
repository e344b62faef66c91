"""Silencing concepts (models.ablation): the partial pass from the dissected layer on against a plain forward
pass whose layer output is zeroed by a hook, on the slim VGG and on a torchvision ResNet-18 at layer3; the
hook fallback; the read's own score back when nothing is silenced; unit groups outside the layer; the cache on
the read (no second pass); and score_change in every report form (text, HTML, JSON, the backend's report)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import ablation
from models.ablation import ScoreChanges, rest_of_network, silence_patches, silenced_scores
from models.checkpoint import LoadedModel, base_meta
from models.features import get_layer
from models.vgg import build_vgg
from workspace.base.errors import ModelError

PATCH = 64
ATOL = 1e-5   # float32 on any CPU: the partial and the full pass may sum in another order


def _loaded(model: nn.Module, layer: str, arch: str = "x") -> LoadedModel:
    meta = base_meta(arch, dissected_layer=layer, input_size=PATCH)
    return LoadedModel(model=model.eval(), meta=meta, digest="0" * 16, path=Path("/nonexistent/model.pt"))


def _slim() -> LoadedModel:
    torch.manual_seed(0)
    return _loaded(build_vgg("vgg16_slim"), "features.29", "vgg16_slim")


def _resnet(layer: str = "layer3") -> LoadedModel:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=2)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return _loaded(net, layer, "torchvision:resnet18")


class AroundTheLayer(nn.Module):
    """A skip connection over the dissected layer: the rest of the network also reads the layer's input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(self.block(y) + y)


def zeroed_by_hook(loaded: LoadedModel, x01: torch.Tensor, units: list[int]) -> np.ndarray:
    """The reference: a plain forward pass with the units' channels of the layer's output set to zero."""
    def zero(_m, _i, output):
        output = output.clone()
        output[:, units] = 0
        return output

    handle = get_layer(loaded.model, loaded.dissected_layer).register_forward_hook(zero)
    try:
        return loaded.predict_proba(x01).numpy()
    finally:
        handle.remove()


GROUPS = [[], [0, 1, 2], [5], list(range(0, 40, 3))]


@pytest.mark.parametrize("make", [_slim, _resnet], ids=["vgg16_slim", "resnet18-layer3"])
def test_partial_pass_equals_a_hook_zeroed_full_pass(make, monkeypatch):
    loaded = make()
    assert rest_of_network(loaded.model, loaded.dissected_layer) is not None   # the true partial pass
    x01 = torch.rand(5, 1, PATCH, PATCH, generator=torch.Generator().manual_seed(1))
    scores, silenced = silence_patches(loaded, x01, GROUPS)
    expected = np.stack([zeroed_by_hook(loaded, x01, g) for g in GROUPS])
    np.testing.assert_allclose(scores, loaded.predict_proba(x01).numpy(), atol=ATOL)
    np.testing.assert_allclose(silenced, expected, atol=ATOL)
    assert np.abs(silenced[1:] - silenced[0]).max() > 1e-3          # the groups do change the score here
    # the hook fallback gives the same numbers
    monkeypatch.setattr(ablation, "rest_of_network", lambda model, layer: None)
    _scores, by_hook = silence_patches(loaded, x01, GROUPS)
    np.testing.assert_allclose(by_hook, expected, atol=ATOL)


def test_fallback_where_the_rest_reads_more_than_the_layer():
    torch.manual_seed(2)
    loaded = _loaded(AroundTheLayer(), "block")
    assert rest_of_network(loaded.model, "block") is None
    assert "around the layer" in ablation.fallback_reason(loaded.model, "block")
    x01 = torch.rand(3, 1, 16, 16)
    _scores, silenced = silence_patches(loaded, x01, [[], [1, 2], [7]])
    np.testing.assert_allclose(silenced, np.stack([zeroed_by_hook(loaded, x01, g) for g in ([], [1, 2], [7])]),
                               atol=ATOL)
    with pytest.raises(ModelError, match="needs the patches' pixels"):
        silenced_scores(loaded, np.zeros((3, 8, 16, 16), np.float32), [[1]])


def test_a_layer_that_runs_twice_is_a_clear_error():
    loaded = _resnet("layer3.1.relu")      # BasicBlock applies its ReLU twice
    with pytest.raises(ModelError, match="runs 2 times"):
        silence_patches(loaded, torch.rand(2, 1, PATCH, PATCH), [[1]])


def test_units_outside_the_layer_are_a_clear_error():
    loaded = _slim()
    maps = np.zeros((2, 128, 2, 2), np.float32)
    for bad in ([128], [3, -1]):
        with pytest.raises(ModelError, match=r"outside layer features\.29, whose units are 0\.\.127"):
            silenced_scores(loaded, maps, [[0], bad])
    with pytest.raises(ModelError, match="maps must be"):
        silenced_scores(loaded, maps[0], [[0]])


def test_batches_hold_every_group_of_a_patch(monkeypatch):
    """Small batches (one patch's groups each) give the numbers of one big batch."""
    loaded = _slim()
    x01 = torch.rand(4, 1, PATCH, PATCH, generator=torch.Generator().manual_seed(3))
    _s, big = silence_patches(loaded, x01, GROUPS)
    monkeypatch.setattr(ablation, "BATCH_BYTES", 1)
    _s, small = silence_patches(loaded, x01, GROUPS)
    np.testing.assert_allclose(small, big, atol=ATOL)


# -- reads, the session, reports ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def read_ws(tmp_path_factory, _quiet_and_contained):
    """One synthetic patient, a tiny slim VGG (random weights, 64-pixel patches), its reads and a run."""
    from tests.fixtures.pipeline import tiny_read_run

    ws, loaded, run, ids, reads = tiny_read_run(tmp_path_factory.mktemp("ablation-ws") / "ws", PATCH)
    image_id = max(ids, key=lambda i: len(reads[ids.index(i)].boxes))
    return {"ws": ws, "loaded": loaded, "run": run, "image_id": image_id}


def _patches_of(ws, read) -> torch.Tensor:
    from models.inference import _load_pixels
    from workspace.base.catalog import get_image, open_catalog

    pixels = _load_pixels(ws, dict(get_image(open_catalog(ws), read.image_id)))
    return torch.from_numpy(np.stack([pixels[y:y + h, x:x + w] for x, y, w, h in read.boxes])[:, None].copy())


def test_silencing_nothing_gives_the_reads_own_score(read_ws):
    from models.inference import read_mammogram

    ws, loaded = read_ws["ws"], read_ws["loaded"]
    read = read_mammogram(ws, read_ws["image_id"], loaded)
    assert len(read.scores) >= 3
    rows = ablation.read_silenced(ws, loaded, read, [()])
    np.testing.assert_allclose(rows[0], read.scores, atol=2e-3)    # from the float16 maps the read kept
    changes = ablation.read_score_changes(ws, loaded, read, {"none": []})
    assert changes.of == "image" and changes.score == pytest.approx(read.image_score, abs=2e-3)
    assert changes.changes == {"none": 0.0}
    patch = ablation.read_score_changes(ws, loaded, read, {"none": [], "a": [1, 2]}, index=1)
    assert patch.of == "patch" and patch.score == pytest.approx(float(read.scores[1]), abs=2e-3)
    with pytest.raises(ModelError, match="outside layer features.29"):
        ablation.read_silenced(ws, loaded, read, [[0], [500]])
    with pytest.raises(ModelError, match="no patch 99"):
        ablation.read_silenced(ws, loaded, read, [[0]], index=99)


def test_report_score_change_against_the_hook_reference(read_ws):
    """The whole image: the image score (highest patch score) with the concept silenced, from the pixels through
    a hook-zeroed full pass, minus the score as read; a patch: that patch's own score."""
    from workspace.dissect.concepts import ConceptStore
    from workspace.dissect.session import Session

    ws, loaded, run, image_id = read_ws["ws"], read_ws["loaded"], read_ws["run"], read_ws["image_id"]
    mass, vessel = [1, 4, 9, 30], list(range(40, 100))
    with ConceptStore(ws) as store:
        store.label_units(run.model_digest, run.layer, mass, "abl-mass", by="t", source="api", n_units=run.n_units)
        store.label_units(run.model_digest, run.layer, vessel, "abl-vessel", by="t", source="api",
                          n_units=run.n_units)
    with Session.open(ws, run=run, loaded=loaded) as session:
        report = session.report(image_id, thumbnail=False)
        read = session.read(image_id)
        x01 = _patches_of(ws, read)
        for name, units in (("abl-mass", mass), ("abl-vessel", vessel)):
            expected = zeroed_by_hook(loaded, x01, units).max() - read.image_score
            assert report.concept(name).score_change == pytest.approx(expected, abs=2e-3)
        assert abs(report.concept("abl-vessel").score_change) > 5e-3    # 60 units move this model's score
        assert report.silenced == {"of": "image", "score": pytest.approx(read.image_score, abs=2e-3),
                                   "label": loaded.score_label}
        box = [int(v) for v in read.boxes[2]]
        patch = session.report(image_id, patch_box=box, thumbnail=False)
        expected = zeroed_by_hook(loaded, x01[2:3], vessel)[0] - read.scores[2]
        assert patch.concept("abl-vessel").score_change == pytest.approx(expected, abs=2e-3)
        assert patch.silenced["of"] == "patch"
        assert session.report(image_id, thumbnail=False, silence=False).concept("abl-mass").score_change is None


def test_a_second_report_runs_no_forward_pass(read_ws):
    """Cached with the read: the same image and labels again cost nothing; a relabelled concept costs one
    partial pass of its own over the image's patches, and the other concepts nothing."""
    from workspace.dissect.concepts import ConceptStore
    from workspace.dissect.session import Session

    ws, loaded, run, image_id = read_ws["ws"], read_ws["loaded"], read_ws["run"], read_ws["image_id"]
    with ConceptStore(ws) as store:
        store.label_units(run.model_digest, run.layer, [2, 3], "abl-cache", by="t", source="api", n_units=run.n_units)
    rows = []
    handle = loaded.model.classifier[6].register_forward_hook(lambda _m, inputs, _o: rows.append(len(inputs[0])))
    try:
        with Session.open(ws, run=run, loaded=loaded) as session:
            n_patches = len(session.read(image_id).scores)
            n_concepts = len({c.concept_id for c in session.labels().values()})
            first = session.report(image_id, thumbnail=False)
            assert sum(rows) == n_patches * (n_concepts + 1)      # every concept and "nothing silenced", once
            rows.clear()
            again = session.report(image_id, thumbnail=False)
            assert rows == []
            assert [c.score_change for c in again.concepts] == [c.score_change for c in first.concepts]
            with ConceptStore(ws) as store:
                store.label_units(run.model_digest, run.layer, [7], "abl-cache", by="t", source="api",
                                  n_units=run.n_units)
            session.report(image_id, thumbnail=False)
            assert sum(rows) == n_patches                          # only the changed unit set
    finally:
        handle.remove()


def test_patch_set_patches_as_fiftyone_asks(read_ws):
    """Session.patch_score_changes (the FiftyOne panel's patch report) against the hook reference."""
    from workspace.base.catalog import open_catalog
    from workspace.data.patches import build_patch_set, open_patch_set
    from workspace.dissect.session import Session

    ws, loaded, run = read_ws["ws"], read_ws["loaded"], read_ws["run"]
    build_patch_set(ws, "abl", size=PATCH, step=PATCH // 2)
    patch_id, index = open_catalog(ws).execute(
        "SELECT patch_id, array_index FROM patches WHERE patch_set = 'abl' ORDER BY patch_id").fetchone()
    x01 = open_patch_set(ws, "abl").batch([index])
    with Session.open(ws, run=run, loaded=loaded) as session:
        changes = session.patch_score_changes(patch_id, {10: [0, 5], 11: list(range(64))})
        assert changes.of == "patch" and changes.score == pytest.approx(float(loaded.predict_proba(x01)[0]), abs=ATOL)
        for key, units in ((10, [0, 5]), (11, list(range(64)))):
            assert changes.changes[key] == pytest.approx(zeroed_by_hook(loaded, x01, units)[0] - changes.score,
                                                         abs=ATOL)


def test_the_backend_report_carries_the_change(read_ws):
    from ml_backend.app import Backend
    from workspace.dissect.session import Session

    ws, loaded, run, image_id = read_ws["ws"], read_ws["loaded"], read_ws["run"], read_ws["image_id"]
    backend = Backend(ws, loaded=loaded, run=run)
    try:
        read = backend.read(image_id)
        report = backend.report(image_id, maps=read.maps, labels=backend.labels())
        with Session.open(ws, run=run, loaded=loaded) as session:
            direct = session.report(image_id, thumbnail=False)
        assert report.concepts and all(c.score_change is not None for c in report.concepts)
        for score in report.concepts:
            assert score.score_change == pytest.approx(direct.concept(score.name).score_change, abs=1e-6)
        assert "silenced: " in report.to_text()
    finally:
        backend.store.close()


# -- the report's forms --------------------------------------------------------------------------------------
def test_score_change_in_text_html_and_json(ws):
    from workspace.dissect.concepts import ConceptStore
    from workspace.dissect.reports import build_report, concept_groups

    model, layer = "fedcba9876543210", "features.29"
    with ConceptStore(ws) as store:
        store.label_units(model, layer, [0, 1, 2], "mass", by="r1", source="cli", n_units=6)
        store.label_units(model, layer, [3], "calcification", by="r1", source="cli", n_units=6)
        labels = store.labels(model, layer)
    ids = {c.name: c.concept_id for c in labels.values()}
    assert concept_groups(labels) == {ids["mass"]: [0, 1, 2], ids["calcification"]: [3]}
    changes = ScoreChanges(of="image", score=0.8, silenced={ids["mass"]: 0.68, ids["calcification"]: 0.805})
    acts, thr = [2.0, 4.0, 1.0, 3.0, 0.5, 6.0], [1.0, 2.0, 4.0, 1.5, 0.5, 3.0]
    report = build_report(acts, thr, labels, score_changes=changes)
    mass, calc = report.concept("mass"), report.concept("calcification")
    assert mass.score_change == pytest.approx(-0.12) and calc.score_change == pytest.approx(0.005)

    lines = report.to_text().splitlines()
    assert lines[1] == "calcification: 2.00xT (raw 3.00, 1 unit), silenced: +0.005"
    assert lines[2] == "mass: 1.42xT (raw 2.33, 3 units), silenced: -0.12"

    data = json.loads(report.to_json())
    assert [c["score_change"] for c in data["concepts"]] == pytest.approx([0.005, -0.12])
    assert data["silenced"] == {"of": "image", "score": 0.8, "label": "score"}

    page = report.to_html()
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) == 2 and "Effect on the score" in page       # value and effect (no ROI: no area chart)
    for svg in svgs:
        ET.fromstring(svg)
    # signed bars from the zero line: calcification right of it, mass left, lengths in proportion
    bars = [(float(x), float(w)) for x, w in re.findall(r'<rect x="([\d.]+)" y="[\d.]+" width="([\d.]+)"', svgs[1])]
    zero = float(re.search(r'<line x1="([\d.]+)"[^>]*stroke="#8c959f"', svgs[1]).group(1))
    (calc_x, calc_w), (mass_x, mass_w) = bars
    assert calc_x == pytest.approx(zero, abs=0.1) and mass_x + mass_w == pytest.approx(zero, abs=0.1)
    assert mass_w / calc_w == pytest.approx(0.12 / 0.005, rel=0.02)
    assert "0.80 → 0.68" in page

    plain = build_report(acts, thr, labels)                         # not computed: nothing shown
    assert plain.concept("mass").score_change is None and plain.silenced is None
    assert "silenced" not in plain.to_text() and "Effect on the score" not in plain.to_html()
