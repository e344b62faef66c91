"""Concept proposals: the dataset-level IoU of units with lesion attribute values against a brute-force
computation from the definition, proposals stored and decided (never applied on their own), `mammo concepts
propose | proposals | accept | reject`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tests.test_concepts_cli import mammo
from workspace.base.errors import ConceptError
from workspace.dissect.concepts import ConceptStore
from workspace.dissect.proposals import Proposal, attribute_values, concept_name, iou_table, propose


@pytest.fixture(scope="module")
def table(pipeline):
    return iou_table(pipeline.ws, pipeline.run, pipeline.loaded)


def test_attribute_values_and_names():
    lesion = {"kind": "Mass", "attributes": json.dumps({"finding": "spiculated", "contrast": 0.2, "mass_margins":
                                                        "ILL_DEFINED-SPICULATED", "categories": ["Mass", "N/A"]})}
    assert attribute_values(lesion) == [("kind", "mass"), ("finding", "spiculated"),
                                        ("mass_margins", "ILL_DEFINED-SPICULATED"), ("categories", "Mass")]
    assert concept_name("finding", "calcification_cluster") == "calcification cluster"
    assert concept_name("mass_margins", "ILL_DEFINED-SPICULATED") == "ill defined / spiculated (mass margins)"


def test_dataset_iou_equals_the_definition(pipeline, table):
    """Summed intersections over summed unions of the unit's thresholded, upsampled maps (the dissection's
    mask rule) and the value's lesion pixels (annotated copies of a lesion left out: they outline the same lesion),
    over every patch of the run: recomputed by brute force."""
    from workspace.base.catalog import get_image, lesions_of, open_catalog
    from workspace.data.patches import lesion_region, open_patch_set
    from workspace.dissect.dissect_run import model_source
    from workspace.dissect.dissection import unit_masks

    ws, run = pipeline.ws, pipeline.run
    iou, counts = table.iou()
    assert iou.shape == (run.thresholds.size, len(table.values)) and counts.sum() > 0
    value = int(np.argmax(counts))                         # the value most lesions show
    units = [int(u) for u in np.argsort(-iou[:, value])[:2]] + [int(np.argmin(iou[:, value]))]
    source = model_source(ws, pipeline.loaded, patch_set=run.manifest["patch_set"], split=None, layer=run.layer)
    rows = {int(r["patch_id"]): r for r in open_patch_set(ws, run.manifest["patch_set"]).rows}
    db = open_catalog(ws)
    inter = np.zeros(len(units))
    union = np.zeros(len(units))
    for start in range(0, len(source.patch_ids), 8):
        maps = source.activations(start, min(start + 8, len(source.patch_ids)))
        for k, patch_id in enumerate(source.patch_ids[start:start + 8]):
            row = rows[int(patch_id)]
            x, y, size = int(row["x"]), int(row["y"]), int(row["size"])
            masks = unit_masks(maps[k][units].float(), torch.as_tensor(run.thresholds[units]), size).numpy()
            lesion = np.zeros((size, size), bool)
            image = get_image(db, row["image_id"])
            for record in lesions_of(db, row["image_id"]):
                if record["source"] == "annotated_copy" or table.values[value] not in attribute_values(record):
                    continue
                region = lesion_region(ws, image, record)
                full = np.zeros((image["rows"] + 2 * size, image["cols"] + 2 * size), bool)
                h, w = region.mask.shape
                full[region.y0 + size:region.y0 + size + h, region.x0 + size:region.x0 + size + w] = region.mask
                lesion |= full[y + size:y + 2 * size, x + size:x + 2 * size]
            inter += (masks & lesion).sum(axis=(1, 2))
            union += (masks | lesion).sum(axis=(1, 2))
    expected = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    np.testing.assert_allclose(iou[units, value], expected, rtol=1e-12)
    assert expected[0] > 0


def test_proposals_are_each_values_most_specific_matches(table):
    found = propose(table, per_value=2, min_lesions=1)
    assert found and [p.iou for p in found] == sorted((p.iou for p in found), reverse=True)
    iou, counts = table.iou()
    index = {v: k for k, v in enumerate(table.values)}
    for p in found:   # a proposed unit aligns with its value more than with any other value of the attribute
        others = [index[v] for v in table.values if v[0] == p.attribute and v != (p.attribute, p.value)
                  and counts[index[v]] > 0]
        own = iou[p.unit, index[(p.attribute, p.value)]]
        assert own == pytest.approx(p.iou, abs=1e-4) and (not others or own > iou[p.unit, others].max())
    for v, (key, _value) in enumerate(table.values):   # each value's two most specific units are proposed
        others = [w for w, (k, _) in enumerate(table.values) if k == key and w != v and counts[w] > 0]
        margin = iou[:, v] - (iou[:, others].max(axis=1) if others else 0)
        for unit in np.argsort(-margin, kind="stable")[:2]:
            if margin[unit] > 0 and iou[unit, v] > 0:
                assert any(p.unit == unit for p in found)
    best = found[0]
    assert best.n_lesions > 0 and best.to_text().startswith(f"unit {best.unit}: probably {best.concept} (IoU ")
    assert len({p.unit for p in found}) == len(found)
    assert propose(table, min_iou=1.0) == [] and propose(table, min_lesions=10**6) == []
    # a subset of images gives the IoU of a table made of those images alone (what the held-out check relies
    # on); the whole table's IoU is checked against the maps above
    images = sorted(table.area)
    half, rest = images[: max(1, len(images) // 2)], images[max(1, len(images) // 2):]

    def only(chosen):
        return dataclasses.replace(table, **{name: {i: getattr(table, name)[i] for i in chosen}
                                             for name in ("inter", "area", "lesion_area", "lesions", "n_patches")})

    for part in (half, rest):
        np.testing.assert_array_equal(table.iou(part)[0], only(part).iou()[0])
    np.testing.assert_array_equal(table.iou(half)[1] + table.iou(rest)[1], counts)
    assert not np.array_equal(table.iou(half)[0], iou)   # the subset is not ignored


def test_proposals_are_stored_and_decided_never_applied(pipeline, tmp_path):
    """On the shared pipeline's run: what it labels and proposes is removed at the end."""
    run = pipeline.run
    model, layer = run.model_digest, run.layer
    found = [Proposal(unit=3, concept="spiculated", attribute="finding", value="spiculated", iou=0.31, n_lesions=42,
                      runner_up="mass", runner_up_iou=0.2),
             Proposal(unit=5, concept="mass", attribute="kind", value="mass", iou=0.012, n_lesions=9)]
    with ConceptStore(pipeline.ws) as store:
        assert store.save_proposals(run.run_id, model, layer, found) == 2
        rows = store.proposals(model, layer)
        assert [(r.unit, r.concept, r.status) for r in rows] == [(3, "spiculated", "proposed"), (5, "mass", "proposed")]
        assert rows[0].to_text() == "unit 3: probably spiculated (IoU 0.31 over 42 lesions)"
        assert rows[1].to_text() == "unit 5: probably mass (IoU 0.012 over 9 lesions)"   # a real run's size
        before = store.current_labels(model, layer)
        assert 3 not in before and 5 not in before                            # nothing applied
        with pytest.raises(ConceptError, match="no proposal 999"):
            store.decide_proposals([rows[0].proposal_id, 999], accept=True, by="ana", source="cli")
        accepted = store.decide_proposals([rows[0].proposal_id], accept=True, by="ana", source="labelstudio")
        assert [(r.status, r.decided_by) for r in accepted] == [("accepted", "ana")]
        assert store.current_labels(model, layer)[3].name == "spiculated"
        [event] = store.history(model, layer, unit=3)
        assert event.note == f"proposal #{rows[0].proposal_id}: IoU 0.31 over 42 lesions"
        store.decide_proposals([rows[1].proposal_id], accept=False, by="ben", source="fiftyone")
        assert 5 not in store.current_labels(model, layer)
        # computed again: decided ones stay decided and are not proposed again
        assert store.save_proposals(run.run_id, model, layer, found) == 0
        assert store.proposals(model, layer) == []
        assert {r.status for r in store.proposals(model, layer, status=None)} == {"accepted", "rejected"}
        assert store.decide_proposals([rows[1].proposal_id], accept=True, by="ana", source="cli") == []
        store.remove_labels(model, layer, [3], by="test-cleanup", source="api")
        store.db.execute("DELETE FROM concept_proposals WHERE run_id = ?", [run.run_id])


def test_cli_propose_accept_reject(pipeline, capsys):
    ws, run = pipeline.ws, pipeline.run
    code, out, _ = mammo(ws, capsys, "concepts", "propose", "--run", run.run_id, "--top", "3")
    assert code == 0 and "proposal(s) pending" in out and "probably" in out
    code, out, _ = mammo(ws, capsys, "concepts", "proposals", "--run", run.run_id, "--json")
    rows = json.loads(out)
    assert code == 0 and rows and all(r["status"] == "proposed" for r in rows)
    first, second = rows[0], rows[1]
    code, out, _ = mammo(ws, capsys, "concepts", "reject", str(second["proposal_id"]), "--by", "ana")
    assert code == 0 and "rejected" in out
    code, out, _ = mammo(ws, capsys, "concepts", "accept", str(first["proposal_id"]), "--by", "ana")
    assert code == 0 and f"#{first['proposal_id']} accepted" in out
    with ConceptStore(ws) as store:
        assert store.current_labels(run.model_digest, run.layer)[first["unit"]].name == first["concept"]
        store.remove_labels(run.model_digest, run.layer, [first["unit"]], by="test-cleanup", source="api")
        store.db.execute("DELETE FROM concept_proposals WHERE run_id = ?", [run.run_id])
