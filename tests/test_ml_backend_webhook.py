"""Webhook events to the real backend: persisted in ls_annotations, progressive labelling, nothing silently lost."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from ml_backend import label_configs as lc
from ml_backend import predictions as pr
from models.card import DEFAULT_POSITIVE

pytestmark = pytest.mark.slow


def post(service, payload):
    return requests.post(f"{service.url}/webhook", data=json.dumps(payload), timeout=120)


@pytest.fixture(scope="module")
def aligned_roi(ls_pipeline):
    """An ROI equal to one unit's stitched mask (so that unit, at least, is aligned) and the query's answer."""
    from models.inference import read_mammogram
    from workspace.base.catalog import get_image, open_catalog
    from workspace.dissect.query import query_image

    ws, loaded, run = ls_pipeline.ws, ls_pipeline.loaded, ls_pipeline.run
    image_id = ls_pipeline.image_ids[1]
    row = get_image(open_catalog(ws), image_id)
    read = read_mammogram(ws, image_id, loaded)
    x, y, s = (int(v) for v in read.boxes[int(np.argmax(read.scores))][:3])
    probe = np.zeros((row["rows"], row["cols"]), bool)
    probe[y:y + s, x:x + s] = True
    first = query_image(ws, image_id, probe, loaded, run)
    unit = next(int(u) for u in first.ranking if first.mask_of(int(u)).any())
    roi = first.mask_of(unit)
    answer = query_image(ws, image_id, roi, loaded, run)
    assert len(answer.aligned) > 0
    return {"image_id": image_id, "roi": roi, "answer": answer, "row": row}


def event(action, annotation_id, image_id, results, reader="reader@mammo.test", task_id=11):
    return {"action": action,
            "annotation": {"id": annotation_id, "result": results, "completed_by": {"id": 3, "email": reader},
                           "task": task_id},
            "task": {"id": task_id, "data": {"image_id": image_id}},
            "project": {"id": 5, "label_config": lc.SCREENING_CONFIG}}


def roi_region(mask):
    return pr.brush(mask, label=lc.ROI_LABEL, to_name="image", from_name="roi", rid="roi-a")


def rows_of(ws, annotation_id):
    from workspace.base.catalog import open_catalog

    return list(open_catalog(ws).query("SELECT * FROM ls_annotations WHERE annotation_id = ? ORDER BY event_id",
                                       [annotation_id]))


def test_submit_labels_the_aligned_units_then_update_and_delete_keep_history(ls_backend, ls_pipeline, aligned_roi):
    from workspace.dissect.concepts import ConceptStore

    ws, run = ls_pipeline.ws, ls_pipeline.run
    aligned = [int(u) for u in aligned_roi["answer"].aligned]
    created = event("ANNOTATION_CREATED", 901, aligned_roi["image_id"], [
        roi_region(aligned_roi["roi"]),
        {"from_name": "new_concept", "to_name": "image", "type": "textarea", "value": {"text": ["Spiculated margin"]}},
        {"from_name": "assessment", "to_name": "image", "type": "choices", "value": {"choices": [DEFAULT_POSITIVE]}},
    ])
    response = post(ls_backend, created)
    assert response.status_code == 200, response.text
    body = response.json()
    assert sorted(body["labelled"]["units"]) == sorted(aligned)
    with ConceptStore(ws) as store:
        labels = store.labels(run.model_digest, run.layer)
        rows = {r.unit: r for r in store.label_rows(run.model_digest, run.layer)}
        query = store.get_query(body["labelled"]["query_id"])
    assert {u: labels[u].name for u in aligned} == {u: "Spiculated margin" for u in aligned}
    assert {rows[u].labelled_by for u in aligned} == {"labelstudio:reader@mammo.test"}
    assert {rows[u].query_id for u in aligned} == {query.query_id}
    assert query.image_id == aligned_roi["image_id"] and query.asked_by == "labelstudio:reader@mammo.test"
    [stored] = rows_of(ws, 901)
    assert stored["action"] == "ANNOTATION_CREATED" and stored["concept"] == "Spiculated margin"
    assert json.loads(stored["choices"]) == {"assessment": [DEFAULT_POSITIVE]}
    assert json.loads(stored["roi"])["query_id"] == query.query_id and stored["image_id"] == aligned_roi["image_id"]

    # the reader changes the concept and keeps only one of the answered unit regions
    kept = aligned[0]
    kept_region = pr.brush(aligned_roi["answer"].mask_of(kept), label=lc.ALIGNED_LABEL, to_name="image",
                           rid=pr.unit_region_id(kept, 1))
    updated = event("ANNOTATION_UPDATED", 901, aligned_roi["image_id"], [
        roi_region(aligned_roi["roi"]), kept_region,
        {"from_name": "concept", "to_name": "image", "type": "choices", "value": {"choices": ["Calcification"]}},
    ])
    body = post(ls_backend, updated).json()
    assert body["labelled"]["units"] == [kept]
    with ConceptStore(ws) as store:
        labels = store.labels(run.model_digest, run.layer)
        history = store.history(run.model_digest, run.layer, unit=kept)
    assert labels[kept].name == "Calcification"
    # other tests share this workspace and may have labelled the unit before: the last two events are ours
    assert history[-1].action == "relabel" and history[-1].name_after == "Calcification"
    assert history[-2].action in ("add", "relabel") and history[-2].name_after == "Spiculated margin"
    assert history[-1].name_before == "Spiculated margin"
    assert "annotation 901" in history[-1].note
    for other in aligned[1:]:  # not kept by the reader: their labels are not silently removed
        assert labels[other].name == "Spiculated margin"

    deleted = post(ls_backend, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 901}], "project": {"id": 5}})
    assert deleted.status_code == 200
    assert [r["action"] for r in rows_of(ws, 901)] == ["ANNOTATION_CREATED", "ANNOTATION_UPDATED",
                                                       "ANNOTATIONS_DELETED"]
    with ConceptStore(ws) as store:
        assert store.labels(run.model_digest, run.layer) == labels


def test_events_without_concept_or_with_a_bad_roi_are_kept(ls_backend, ls_pipeline, aligned_roi):
    from workspace.dissect.concepts import ConceptStore

    ws, run = ls_pipeline.ws, ls_pipeline.run
    with ConceptStore(ws) as store:
        before = store.labels(run.model_digest, run.layer)
    plain = event("ANNOTATION_CREATED", 902, aligned_roi["image_id"], [roi_region(aligned_roi["roi"])])
    body = post(ls_backend, plain).json()
    assert body["labelled"]["units"] == [] and rows_of(ws, 902)[0]["concept"] is None
    broken = roi_region(aligned_roi["roi"])
    broken["value"]["rle"] = broken["value"]["rle"][:10]
    bad = event("ANNOTATION_CREATED", 903, aligned_roi["image_id"], [
        broken, {"from_name": "new_concept", "to_name": "image", "type": "textarea", "value": {"text": ["Mass"]}}])
    response = post(ls_backend, bad)
    assert response.status_code == 400 and response.json()["code"] == "malformed_rle"
    [row] = rows_of(ws, 903)
    assert json.loads(row["roi"])["code"] == "malformed_rle" and row["concept"] == "Mass"
    ignored = post(ls_backend, {"action": "PROJECT_UPDATED", "project": {"id": 5}}).json()
    assert ignored["status"] == "ignored"
    with ConceptStore(ws) as store:
        assert store.labels(run.model_digest, run.layer) == before
