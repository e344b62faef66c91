"""The backend's HTTP contract, against the real gunicorn process: predictions, interactive ROI, webhook, errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from ml_backend import label_configs as lc
from ml_backend import predictions as pr
from ml_backend.rle import decode_mask
from models.card import DEFAULT_NEGATIVE, DEFAULT_POSITIVE

pytestmark = pytest.mark.slow


def post(service, path, payload, **kw):
    return requests.post(f"{service.url}{path}", data=json.dumps(payload), timeout=120,
                         headers={"Content-Type": "application/json"}, **kw)


@pytest.fixture(scope="module")
def world(ls_pipeline):
    from models.inference import read_mammogram
    from workspace.base.catalog import get_image, open_catalog

    db = open_catalog(ls_pipeline.ws)
    image_id = ls_pipeline.image_ids[0]
    read = read_mammogram(ls_pipeline.ws, image_id, ls_pipeline.loaded)
    return {"image_id": image_id, "row": get_image(db, image_id), "read": read}


def screening_task(image_id, task_id=1):
    return {"id": task_id, "data": {"image_id": image_id, "image": f"/data/local-files/?d={image_id}.png"}}


def disk_roi(shape, centre, radius):
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - centre[1]) ** 2 + (cols - centre[0]) ** 2 <= radius ** 2


def roi_result(mask, to_name="image"):
    return pr.brush(mask, label=lc.ROI_LABEL, to_name=to_name, from_name="roi", rid="roi1")


def test_health_and_setup_answer_fast(ls_backend, ls_pipeline):
    start = time.perf_counter()
    health = requests.get(f"{ls_backend.url}/health", timeout=5)
    assert time.perf_counter() - start < 1.0
    assert health.status_code == 200 and health.json()["status"] == "UP"
    start = time.perf_counter()
    setup = post(ls_backend, "/setup", {"project": "1.1", "schema": lc.SCREENING_CONFIG})
    assert time.perf_counter() - start < 3.0
    assert ls_pipeline.run.run_id in setup.json()["model_version"]
    assert ls_pipeline.loaded.digest[:8] in setup.json()["model_version"]


def test_screening_prediction_geometry_and_scores(ls_backend, ls_pipeline, world):
    read, row = world["read"], world["row"]
    response = post(ls_backend, "/predict", {"tasks": [screening_task(world["image_id"])],
                                             "label_config": lc.SCREENING_CONFIG, "project": "1.1"})
    assert response.status_code == 200, response.text
    [prediction] = response.json()["results"]
    regions = prediction["result"]
    rects = [r for r in regions if r["type"] == "rectanglelabels"]
    assert len(rects) == len(read.suspicious) > 0
    for rect, i in zip(rects, read.suspicious, strict=True):
        x, y, w, h = read.boxes[i]
        v = rect["value"]
        assert (rect["original_width"], rect["original_height"]) == (row["cols"], row["rows"])
        assert v["x"] == pytest.approx(100 * x / row["cols"]) and v["y"] == pytest.approx(100 * y / row["rows"])
        assert v["width"] == pytest.approx(100 * w / row["cols"]) and v["height"] == pytest.approx(100 * h / row["rows"])
        assert rect["score"] == pytest.approx(float(read.scores[i]), abs=1e-6)
    [choice] = [r for r in regions if r["type"] == "choices"]
    assert choice["score"] == pytest.approx(read.image_score, abs=1e-6)
    assert choice["value"]["choices"] == [DEFAULT_POSITIVE if read.image_score >= read.operating_point
                                          else DEFAULT_NEGATIVE]
    assert prediction["score"] == pytest.approx(read.image_score, abs=1e-6)
    # the most activated unit's mask on the most suspicious patch, as a full-image brush region
    from workspace.dissect.query import PatchMasks

    [map_region] = [r for r in regions if r["type"] == "brushlabels"]
    top = int(np.argmax(read.scores))
    masks = PatchMasks.from_maps(np.asarray(read.maps[top], np.float32), ls_pipeline.run.thresholds,
                                 int(read.boxes[top][2]))
    unit = int(np.argmax(masks.max_activation))
    assert pr.unit_of_region(map_region) == unit
    got = decode_mask(map_region["value"]["rle"], row["cols"], row["rows"])
    x, y, s = (int(v) for v in read.boxes[top][:3])
    expected = np.zeros((row["rows"], row["cols"]), bool)
    expected[y:y + s, x:x + s] = masks.mask(unit)
    assert (got == expected).all()
    assert any(r["type"] == "textarea" and r["from_name"] == "report" for r in regions)


def test_interactive_roi_matches_the_query_engine_and_is_recorded(ls_backend, ls_pipeline, world):
    from workspace.dissect.concepts import ConceptStore, decode_roi
    from workspace.dissect.query import query_image

    read, row = world["read"], world["row"]
    x, y, s = (int(v) for v in read.boxes[read.suspicious[0]][:3])
    roi = disk_roi((row["rows"], row["cols"]), (x + s // 2, y + s // 2), s // 3)
    payload = {"tasks": [screening_task(world["image_id"])], "label_config": lc.SCREENING_CONFIG,
               "params": {"context": {"result": [roi_result(roi)]}}}
    response = post(ls_backend, "/predict", payload)
    assert response.status_code == 200, response.text
    [answer] = response.json()["results"]
    expected = query_image(ls_pipeline.ws, world["image_id"], roi, ls_pipeline.loaded, ls_pipeline.run)
    assert [u for u, _ in answer["ranking"]] == [int(u) for u in expected.ranking[:len(answer["ranking"])]]
    assert answer["aligned"] == [int(u) for u in expected.aligned]
    units = [r for r in answer["result"] if r["type"] == "brushlabels"]
    assert units and len(units) <= 5
    assert pr.unit_of_region(units[0]) == int(expected.ranking[0])
    assert units[0]["value"]["brushlabels"] == [lc.MOST_ALIGNED_LABEL]
    for region in units:
        unit = pr.unit_of_region(region)
        assert region["score"] == pytest.approx(float(expected.iou[unit]))
        assert f"unit {unit}" in region["meta"]["text"][0] and "IoU" in region["meta"]["text"][0]
        assert (decode_mask(region["value"]["rle"], row["cols"], row["rows"]) == expected.mask_of(unit)).all()
    report = [r for r in answer["result"] if r["from_name"] == "report"][0]["value"]["text"][0]
    assert "aligned with the ROI" in report
    with ConceptStore(ls_pipeline.ws) as store:
        recorded = store.get_query(answer["query_id"])
    assert recorded.image_id == world["image_id"] and recorded.source == "labelstudio"
    assert (decode_roi(recorded.roi) == roi).all()
    assert recorded.aligned == answer["aligned"]


def test_patch_review_prediction_and_roi(ls_backend, ls_pipeline, world):
    from workspace.dissect.query import PatchMasks, query_patch

    read = world["read"]
    i = int(read.suspicious[0])
    box = [int(v) for v in read.boxes[i]]
    task = {"id": 7, "data": {"image_id": world["image_id"], "box": box, "patch": "/x.png", "image": "/y.png"}}
    response = post(ls_backend, "/predict", {"tasks": [task], "label_config": lc.PATCH_REVIEW_CONFIG})
    assert response.status_code == 200, response.text
    [prediction] = response.json()["results"]
    [choice] = [r for r in prediction["result"] if r["type"] == "choices"]
    assert choice["score"] == pytest.approx(float(read.scores[i]), abs=1e-6) and choice["to_name"] == "patch"
    [brush] = [r for r in prediction["result"] if r["type"] == "brushlabels"]
    assert (brush["original_width"], brush["original_height"]) == (box[2], box[3])
    roi = disk_roi((box[3], box[2]), (box[2] // 2, box[3] // 2), box[2] // 4)
    payload = {"tasks": [task], "label_config": lc.PATCH_REVIEW_CONFIG,
               "params": {"context": {"result": [roi_result(roi, "patch")]}}}
    answer = post(ls_backend, "/predict", payload).json()["results"][0]
    masks = PatchMasks.from_maps(np.asarray(read.maps[i], np.float32), ls_pipeline.run.thresholds, box[2])
    expected = query_patch(masks, roi)
    assert [u for u, _ in answer["ranking"]] == [int(u) for u in expected.ranking[:len(answer["ranking"])]]
    first = [r for r in answer["result"] if r["type"] == "brushlabels"][0]
    assert (decode_mask(first["value"]["rle"], box[2], box[3]) == masks.mask(int(expected.ranking[0]))).all()


def _screening_roi_payload(world, roi_region, task=None, config=lc.SCREENING_CONFIG):
    return {"tasks": [task or screening_task(world["image_id"])], "label_config": config,
            "params": {"context": {"result": [roi_region]}}}


def test_bad_requests_get_clear_errors_and_the_service_stays_up(ls_backend, world):
    row = world["row"]
    shape = (row["rows"], row["cols"])
    good_roi = np.zeros(shape, bool)
    good_roi[shape[0] // 2 - 20:shape[0] // 2 + 20, 60:100] = True
    broken = roi_result(good_roi)
    broken["value"]["rle"] = broken["value"]["rle"][:12]
    outside = np.zeros(shape, bool)
    outside[:3, -3:] = True   # the top corner on the far side of the chest wall: background, no patch
    cases = [
        ({"tasks": [screening_task("I-doesnotexist")], "label_config": lc.SCREENING_CONFIG}, 404, "unknown_image"),
        ({"tasks": [{"id": 3, "data": {"image": "/x.png"}}], "label_config": lc.SCREENING_CONFIG}, 404,
         "unknown_task"),
        (_screening_roi_payload(world, broken), 400, "malformed_rle"),
        (_screening_roi_payload(world, roi_result(np.zeros((10, 10), bool) | True)), 400, "roi_outside_image"),
        (_screening_roi_payload(world, roi_result(outside)), 400, "roi_outside_image"),
        (_screening_roi_payload(world, roi_result(np.zeros(shape, bool))), 400, "empty_roi"),
        ({"tasks": [screening_task(world["image_id"])], "label_config": "<View><Text name='t' value='$t'/></View>"},
         422, "wrong_label_config"),
        ({"tasks": [], "label_config": lc.SCREENING_CONFIG}, 400, "no_tasks"),
    ]
    pid_before = requests.get(f"{ls_backend.url}/health", timeout=5).status_code
    for payload, status, code in cases:
        response = post(ls_backend, "/predict", payload)
        body = response.json()
        assert (response.status_code, body["code"]) == (status, code), body
        assert body["error"] and body["status"] == status
        assert body["error"][:40] in response.reason  # Label Studio shows the reason phrase to the reader
    not_json = requests.post(f"{ls_backend.url}/predict", data=b"{nope", timeout=10)
    assert not_json.status_code == 400 and not_json.json()["code"] == "bad_json"
    # shapes Label Studio never sends: result items that are not objects, values that are not objects, a body
    # nested past Python's recursion limit, one nested past any Label Studio request
    event = {"action": "ANNOTATION_CREATED", "task": screening_task(world["image_id"]),
             "annotation": {"id": 9, "result": [1, "x"]}}
    weird = [("/webhook", event, "bad_result"),
             ("/webhook", {**event, "annotation": {"id": 9, "result": [{"from_name": "roi", "value": [1]}]}},
              "bad_result"),
             ("/webhook", {**event, "task": {"id": 1, "data": "image"}, "annotation": {"id": 9, "result": []}},
              "bad_event"),
             ("/predict", {"tasks": ["task"], "label_config": lc.SCREENING_CONFIG}, "bad_task"),
             ("/predict", {"tasks": [screening_task(world["image_id"])], "label_config": lc.SCREENING_CONFIG,
                           "params": {"context": {"result": [None]}}}, "bad_result")]
    for path, payload, code in weird:
        response = post(ls_backend, path, payload)
        assert (response.status_code, response.json()["code"]) == (400, code), response.text
    for depth in (100_000, 200):
        deep = b'{"tasks": ' + b"[" * depth + b"]" * depth + b"}"
        for path in ("/predict", "/webhook"):
            response = requests.post(f"{ls_backend.url}{path}", data=deep, timeout=30)
            assert response.status_code == 400 and "nested more than" in response.json()["error"]
    assert requests.get(f"{ls_backend.url}/nowhere", timeout=10).status_code == 404
    # a batch with one bad task: the good one is answered, the bad one carries its error
    batch = post(ls_backend, "/predict", {"tasks": [screening_task(world["image_id"]), screening_task("I-nope", 2)],
                                          "label_config": lc.SCREENING_CONFIG}).json()["results"]
    assert "result" in batch[0] and batch[1]["code"] == "unknown_image"
    assert ls_backend.alive() and pid_before == 200
    assert requests.get(f"{ls_backend.url}/health", timeout=5).json()["status"] == "UP"


def test_basic_auth_when_asked_and_required_beyond_localhost(ls_pipeline, monkeypatch, tmp_path):
    from ml_backend import settings
    from ml_backend.serve import check_binding, start_backend
    from workspace.base.errors import MammoError

    with pytest.raises(MammoError, match="login"):
        check_binding("0.0.0.0", None)
    check_binding("0.0.0.0", ("reader", "secret"))
    # the names Label Studio's ML backends use; the password from a file, as secrets are mounted
    password = tmp_path / "pass"
    password.write_text("s3cret\n")
    for name in ("MAMMO_BACKEND_USER", "MAMMO_BACKEND_PASSWORD", "BASIC_AUTH_PASS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BASIC_AUTH_USER", "reader")
    monkeypatch.setenv("BASIC_AUTH_PASS_FILE", str(password))
    monkeypatch.setenv("THREADS", "3")
    monkeypatch.setenv("LOG_LEVEL", "warning")
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:1/")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "abc")
    assert settings.auth() == ("reader", "s3cret") and settings.labelstudio() == ("http://127.0.0.1:1", "abc")
    service = start_backend(ls_pipeline.ws, run_id=ls_pipeline.run.run_id, name="ml_backend_auth")
    try:
        assert requests.get(f"{service.url}/health", timeout=10).status_code == 401
        assert requests.get(f"{service.url}/health", auth=("reader", "wrong"), timeout=10).status_code == 401
        assert requests.get(f"{service.url}/health", auth=("reader", "s3cret"), timeout=10).json()["status"] == "UP"
        command = Path(f"/proc/{service.pid}/cmdline").read_bytes().decode().split("\0")
        assert "s3cret" not in " ".join(command)
        assert command[command.index("--threads") + 1] == "3" and command[command.index("--log-level") + 1] == "warning"
    finally:
        service.stop()
    monkeypatch.setenv("THREADS", "many")
    with pytest.raises(MammoError, match="THREADS='many'"):
        start_backend(ls_pipeline.ws, run_id=ls_pipeline.run.run_id, name="ml_backend_auth")
    assert not service.alive()
