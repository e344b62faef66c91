"""Through the real Label Studio server: provisioning, predictions, the interactive endpoint, the webhook."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from ml_backend import label_configs as lc
from ml_backend import predictions as pr
from ml_backend.provision import provision
from ml_backend.rle import decode_mask
from workspace.app.demo_check import ls_request

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]


@pytest.fixture(scope="module")
def provisioned(labelstudio_server, ls_backend, ls_pipeline):
    result = provision(ls_pipeline.ws, labelstudio_server, backend_url=ls_backend.url, title_suffix=" (projects test)",
                       loaded=ls_pipeline.loaded, run=ls_pipeline.run)
    return result


def api(server, method, path, **kw):
    """A Label Studio API call through the SDK's client (the server takes personal access tokens only)."""
    return ls_request(server, method, path, **kw)


def tasks_of(server, project_id):
    return api(server, "GET", "/api/tasks", params={"project": project_id, "page_size": 1000,
                                                    "fields": "all"})["tasks"]


def test_provisioning_makes_both_projects_once(provisioned, labelstudio_server, ls_backend, ls_pipeline):
    from models.inference import read_mammogram

    server, ws = labelstudio_server, ls_pipeline.ws
    screening = provisioned.projects[lc.SCREENING]
    review = provisioned.projects[lc.PATCH_REVIEW]
    assert screening.tasks_total == len(ls_pipeline.image_ids)
    n_suspicious = sum(len(read_mammogram(ws, i, ls_pipeline.loaded).suspicious) for i in ls_pipeline.image_ids)
    assert review.tasks_total == n_suspicious > 0
    project = api(server, "GET", f"/api/projects/{screening.project_id}")
    assert project["label_config"].strip() == lc.SCREENING_CONFIG.strip()
    assert project["title"] == "Screening reads (projects test)"
    [backend] = api(server, "GET", "/api/ml", params={"project": screening.project_id})
    assert backend["url"] == ls_backend.url and backend["is_interactive"] is True
    [storage] = api(server, "GET", "/api/storages/localfiles", params={"project": screening.project_id})
    assert storage["path"] == str((ws.root / "derived").resolve())
    [hook] = [h for h in api(server, "GET", "/api/webhooks", params={"project": screening.project_id})
              if h["project"] == screening.project_id]
    assert hook["url"] == ls_backend.url + "/webhook"
    # task data: pseudonymous ids, laterality and view, never patient identifiers
    from workspace.base.catalog import open_catalog

    secrets = {str(v) for r in open_catalog(ws).query("SELECT source_patient_id, patient_name FROM patients")
               for v in r.values() if v}
    for task in tasks_of(server, screening.project_id):
        data = task["data"]
        assert data["image_id"] in ls_pipeline.image_ids and data["laterality"] in ("L", "R") and data["view"]
        assert data["image"].startswith("/data/local-files/?d=")
        assert not any(s in json.dumps(data) for s in secrets)
    # idempotent: a second run adds nothing and keeps the same projects, and offers a concept made since
    from workspace.dissect.concepts import ConceptStore

    with ConceptStore(ws) as store:
        store.create_concept("Microcalcification cluster", by="test")
    again = provision(ws, server, backend_url=ls_backend.url, title_suffix=" (projects test)",
                      loaded=ls_pipeline.loaded, run=ls_pipeline.run)
    assert {k: (p.project_id, p.tasks_added, p.ml_backend_id, p.storage_id, p.webhook_id)
            for k, p in again.projects.items()} == \
           {k: (p.project_id, 0, p.ml_backend_id, p.storage_id, p.webhook_id) for k, p in provisioned.projects.items()}
    tasks = tasks_of(server, screening.project_id)
    assert len(tasks) == screening.tasks_total
    assert all({"value": "Microcalcification cluster"} in t["data"]["concepts"] for t in tasks)
    assert len(api(server, "GET", "/api/ml", params={"project": screening.project_id})) == 1


def test_images_are_served_to_a_logged_in_reader(provisioned, labelstudio_server):
    from io import BytesIO

    from PIL import Image

    from tests.test_labelstudio_server import login

    server = labelstudio_server
    session = login(server)
    for kind in (lc.SCREENING, lc.PATCH_REVIEW):
        task = tasks_of(server, provisioned.projects[kind].project_id)[0]
        key = "patch" if kind == lc.PATCH_REVIEW else "image"
        response = session.get(server.url + task["data"][key], timeout=30)
        assert response.status_code == 200
        with Image.open(BytesIO(response.content)) as image:
            if kind == lc.PATCH_REVIEW:
                assert list(image.size) == task["data"]["box"][2:]


def test_predictions_retrieved_through_label_studio(provisioned, labelstudio_server, ls_pipeline):
    from models.inference import read_mammogram
    from workspace.base.catalog import get_image, open_catalog

    server = labelstudio_server
    project_id = provisioned.projects[lc.SCREENING].project_id
    client = server.client()
    client.actions.create(id="retrieve_tasks_predictions", project=project_id)
    tasks = tasks_of(server, project_id)
    assert all(t["predictions"] for t in tasks), "Label Studio stored no prediction (backend unreachable?)"
    db = open_catalog(ls_pipeline.ws)
    for task in tasks:
        read = read_mammogram(ls_pipeline.ws, task["data"]["image_id"], ls_pipeline.loaded)
        row = get_image(db, task["data"]["image_id"])
        [prediction] = task["predictions"]
        assert prediction["score"] == pytest.approx(read.image_score, abs=1e-5)
        rects = [r for r in prediction["result"] if r["type"] == "rectanglelabels"]
        assert len(rects) == len(read.suspicious)
        for rect, i in zip(rects, read.suspicious, strict=True):
            assert rect["value"]["x"] == pytest.approx(100 * read.boxes[i][0] / row["cols"])
            assert rect["value"]["height"] == pytest.approx(100 * read.boxes[i][3] / row["rows"])
            assert rect["score"] == pytest.approx(float(read.scores[i]), abs=1e-5)
        [brush] = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        mask = decode_mask(brush["value"]["rle"], brush["original_width"], brush["original_height"])
        x, y, w, h = read.boxes[int(np.argmax(read.scores))]
        assert mask.any() == mask[y:y + h, x:x + w].any() and not mask.sum() > w * h  # inside the top patch


def test_interactive_roi_through_label_studio_matches_the_query_engine(provisioned, labelstudio_server, ls_pipeline):
    from models.inference import read_mammogram
    from workspace.base.catalog import get_image, open_catalog
    from workspace.dissect.concepts import ConceptStore
    from workspace.dissect.query import query_image

    server = labelstudio_server
    project = provisioned.projects[lc.SCREENING]
    task = tasks_of(server, project.project_id)[0]
    image_id = task["data"]["image_id"]
    row = get_image(open_catalog(ls_pipeline.ws), image_id)
    read = read_mammogram(ls_pipeline.ws, image_id, ls_pipeline.loaded)
    x, y, s = (int(v) for v in read.boxes[int(np.argmax(read.scores))][:3])
    roi = np.zeros((row["rows"], row["cols"]), bool)
    roi[y + s // 4:y + 3 * s // 4, x + s // 4:x + s // 2] = True
    region = pr.brush(roi, label=lc.ROI_LABEL, to_name="image", from_name="roi", rid="drawn1")
    answer = api(server, "POST", f"/api/ml/{project.ml_backend_id}/interactive-annotating",
                 json={"task": task["id"], "context": {"result": [region]}})
    assert "errors" not in answer, answer
    data = answer["data"]
    expected = query_image(ls_pipeline.ws, image_id, roi, ls_pipeline.loaded, ls_pipeline.run)
    assert [u for u, _ in data["ranking"]] == [int(u) for u in expected.ranking[:len(data["ranking"])]]
    shown = [pr.unit_of_region(r) for r in data["result"] if r["type"] == "brushlabels"]
    aligned = [int(u) for u in expected.aligned]
    assert shown == (aligned[:5] if aligned else [int(expected.ranking[0])])
    with ConceptStore(ls_pipeline.ws) as store:
        assert store.latest_query(image_id=image_id).query_id == data["query_id"]
    # a bad ROI comes back as Label Studio's error list with our message
    empty = pr.brush(np.zeros_like(roi), label=lc.ROI_LABEL, to_name="image", from_name="roi")
    bad = api(server, "POST", f"/api/ml/{project.ml_backend_id}/interactive-annotating",
              json={"task": task["id"], "context": {"result": [empty]}})
    assert "ROI is empty" in bad["errors"][0]


def test_submitted_annotation_reaches_the_webhook_and_labels_units(provisioned, labelstudio_server, ls_pipeline):
    from workspace.base.catalog import get_image, open_catalog
    from workspace.dissect.concepts import ConceptStore
    from workspace.dissect.query import query_image

    server = labelstudio_server
    ws, run = ls_pipeline.ws, ls_pipeline.run
    project = provisioned.projects[lc.SCREENING]
    task = tasks_of(server, project.project_id)[1]
    image_id = task["data"]["image_id"]
    row = get_image(open_catalog(ws), image_id)
    # an ROI equal to a unit's mask, so at least that unit is aligned
    from models.inference import read_mammogram

    read = read_mammogram(ws, image_id, ls_pipeline.loaded)
    x, y, s = (int(v) for v in read.boxes[int(np.argmax(read.scores))][:3])
    probe = np.zeros((row["rows"], row["cols"]), bool)
    probe[y:y + s, x:x + s] = True
    first = query_image(ws, image_id, probe, ls_pipeline.loaded, run)
    unit = next(int(u) for u in first.ranking if first.mask_of(int(u)).any())
    roi = first.mask_of(unit)
    aligned = [int(u) for u in query_image(ws, image_id, roi, ls_pipeline.loaded, run).aligned]
    result = [pr.brush(roi, label=lc.ROI_LABEL, to_name="image", from_name="roi", rid="sub1"),
              {"id": "c1", "from_name": "new_concept", "to_name": "image", "type": "textarea",
               "value": {"text": ["architectural distortion"]}}]
    annotation = server.client().annotations.create(id=task["id"], result=result)
    from workspace.base.catalog import open_catalog as reopen

    [stored] = list(reopen(ws).query("SELECT * FROM ls_annotations WHERE annotation_id = ?", [annotation.id]))
    assert stored["action"] == "ANNOTATION_CREATED" and stored["task_id"] == task["id"]
    assert stored["project_id"] == project.project_id and stored["concept"] == "architectural distortion"
    assert stored["reader"] == f"labelstudio:{server.username}"
    assert sorted(json.loads(stored["roi"])["labelled_units"]) == sorted(aligned)
    with ConceptStore(ws) as store:
        labels = store.labels(run.model_digest, run.layer)
    assert {labels[u].name for u in aligned} == {"architectural distortion"}
    # the brush ROI was answered as a box is, and the answer put on the task as a prediction (Label Studio never
    # sends a brush stroke to the interactive endpoint): the reader sees it on reopening the task
    written = []
    deadline = time.monotonic() + 60
    while not written and time.monotonic() < deadline:
        predictions = api(server, "GET", f"/api/tasks/{task['id']}")["predictions"]
        written = [p for p in predictions if any(r.get("from_name") == "units" and r["value"]["brushlabels"]
                                                 == [lc.MOST_ALIGNED_LABEL] for r in p["result"])]
        time.sleep(0.5)
    assert written, "the brush ROI's answer never reached the task"
    shown = [pr.unit_of_region(r) for r in written[-1]["result"] if r.get("from_name") == "units"]
    assert shown[0] in aligned and set(shown) <= set(aligned)
    report = next(r for r in written[-1]["result"] if r["type"] == "textarea")["value"]["text"][0]
    assert "architectural distortion" in report and "ROI IoU" in report


def test_two_readers_with_their_own_accounts_label_at_the_same_time(provisioned, labelstudio_server, ls_pipeline):
    """Two readers sign up (their own accounts and personal access tokens) and submit ROI + concept annotations
    at the same moment: every event is kept with its reader, each reader's units carry that reader's label,
    and the report names who labelled what."""
    import threading

    from tests.fixtures.labelstudio import sign_up
    from workspace.base.catalog import open_catalog
    from workspace.dissect.concepts import ConceptStore
    from workspace.dissect.session import Session

    server, ws, run = labelstudio_server, ls_pipeline.ws, ls_pipeline.run
    readers = [sign_up(server, f"{name}-{ls_pipeline.run.run_id[:6]}@clinic.example", f"{name}-long-password")
               for name in ("ana", "ben")]
    assert readers[0].client().users.whoami().email == readers[0].username
    tasks = tasks_of(server, provisioned.projects[lc.SCREENING].project_id)
    plans = _disjoint_rois(ls_pipeline, tasks, 2)   # each unit's label has one author
    concepts = ["ana's spiculated mass", "ben's calcification cluster"]
    made: dict[int, int] = {}
    start, errors = threading.Barrier(2), []

    def submit(k: int) -> None:
        task, roi, _ = plans[k]
        result = _roi_and_concept(roi, concepts[k], f"two{k}")
        start.wait(timeout=60)
        try:
            made[k] = readers[k].client().annotations.create(id=task["id"], result=result).id
        except Exception as error:   # reported below, with the reader
            errors.append((k, error))

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and len(made) == 2, errors
    catalog = open_catalog(ws)
    for k, reader in enumerate(readers):
        [stored] = list(catalog.query("SELECT * FROM ls_annotations WHERE annotation_id = ?", [made[k]]))
        assert stored["reader"] == f"labelstudio:{reader.username}" and stored["concept"] == concepts[k]
        assert sorted(json.loads(stored["roi"])["labelled_units"]) == sorted(plans[k][2])
    with ConceptStore(ws) as store:
        labels, by = store.labels(run.model_digest, run.layer), store.labellers(run.model_digest, run.layer)
    for k, reader in enumerate(readers):
        assert {labels[u].name for u in plans[k][2]} == {concepts[k]}
        assert {by[u] for u in plans[k][2]} == {f"labelstudio:{reader.username}"}
    with Session.open(ws, run=run, loaded=ls_pipeline.loaded) as session:
        report = session.report(plans[0][0]["data"]["image_id"], thumbnail=False)
    for k, reader in enumerate(readers):
        assert report.concept(concepts[k]).labelled_by == [f"labelstudio:{reader.username}"]
        assert f"by labelstudio:{reader.username}" in report.to_text(max_concepts=50)


def test_readers_who_disagree_through_label_studio(provisioned, labelstudio_server, ls_pipeline, fo_db, monkeypatch):
    """Two readers with their own accounts name the same ROI's units differently in Label Studio: the store shows
    them disputed (`mammo concepts agreement`), the answer Label Studio shows follows the team's rule (latest:
    the second reader's concept; majority: a tie, so the units are offered to label again). Then a curator in
    FiftyOne sides with the first reader: three readers, still disputed, and the majority names the first
    reader's concept in Label Studio's answer."""
    from tests.fixtures.labelstudio import sign_up
    from workspace.app.cli import main
    from workspace.dissect.concepts import ConceptStore

    server, ws, run = labelstudio_server, ls_pipeline.ws, ls_pipeline.run
    tasks = tasks_of(server, provisioned.projects[lc.SCREENING].project_id)
    with ConceptStore(ws) as store:
        voted = set(store.votes(run.model_digest, run.layer))
    task, roi, aligned = next(p for p in _disjoint_rois(ls_pipeline, tasks, 3) if not p[2] & voted)
    readers = [sign_up(server, f"{name}-agree-{run.run_id[:6]}@clinic.example", f"{name}-long-password")
               for name in ("cleo", "dan")]
    concepts = ["cleo's architectural distortion", "dan's asymmetry"]
    for k, reader in enumerate(readers):
        reader.client().annotations.create(id=task["id"], result=_roi_and_concept(roi, concepts[k], f"ag{k}"))
    with ConceptStore(ws) as store:
        found = store.agreement(run.model_digest, run.layer)
    disputed = {u.unit: u.votes for u in found.disputed}
    who = [f"labelstudio:{r.username}" for r in readers]
    assert set(aligned) <= set(disputed)
    assert all(disputed[u] == dict(zip(who, concepts, strict=True)) for u in aligned)
    assert next(p for p in found.pairs if set(p.readers) == set(who)).observed == 0.0
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--workspace", str(ws.root), "concepts", "agreement", "--limit", "500"]) == 0
    assert f"disputed unit {min(aligned)}: {who[0]}: {concepts[0]}; {who[1]}: {concepts[1]}" in printed.getvalue()

    def answer() -> dict:
        return ls_request(server, "POST", f"/api/ml/{provisioned.projects[lc.SCREENING].ml_backend_id}"
                          "/interactive-annotating", json={"task": task["id"], "context": {"result": [
                              pr.brush(roi, label=lc.ROI_LABEL, to_name="image", from_name="roi", rid="ask")]}})

    def shown(data: dict) -> tuple[dict[int, str], str]:
        """The units drawn on the image with their labels' text, and the report."""
        results = data["data"]["result"]
        units = {pr.unit_of_region(r): r["meta"]["text"][0] for r in results if r.get("from_name") == "units"}
        return units, next(r for r in results if r["type"] == "textarea")["value"]["text"][0]

    units, report = shown(answer())
    assert units and set(units) <= set(aligned)
    assert all(text.endswith(concepts[1]) for text in units.values())        # latest: Dan's
    assert "silenced: " in report   # what each concept does to the score, in the answer Label Studio shows
    with ConceptStore(ws) as store:
        store.set_rule("majority", by="lead")
    try:
        units, report = shown(answer())
        assert all(text.endswith("unlabelled") for text in units.values())   # a tie: no label
        assert "Label me: unit" in report
        # a curator in FiftyOne, on the same workspace's datasets, agrees with Cleo through the plugin's operator
        import fiftyone.operators as foo

        from fiftyone_plugins import operator_uri
        from fiftyone_plugins.sync import sync

        patches, neurons = sync(ws, run, prefix="ls-team", loaded=ls_pipeline.loaded)
        monkeypatch.setenv("MAMMO_USER", "fiftyone:curator")
        foo.execute_operator(operator_uri("label_units"), dataset=patches,
                             params={"units": ",".join(map(str, sorted(aligned))), "concept": concepts[0]})
        with ConceptStore(ws) as store:
            found = store.agreement(run.model_digest, run.layer)
        disputed = {u.unit: u.votes for u in found.disputed}
        assert all(disputed[u] == {who[0]: concepts[0], who[1]: concepts[1], "fiftyone:curator": concepts[0]}
                   for u in aligned)
        assert found.fleiss_kappa is not None
        units, _report = shown(answer())
        assert all(text.endswith(concepts[0]) for text in units.values())      # majority: Cleo and the curator
        from fiftyone import ViewField as F

        assert set(neurons.match(F("unit").is_in(sorted(aligned))).values("disputed")) == {True}
    finally:
        with ConceptStore(ws) as store:
            store.set_rule("latest", by="lead")


def test_a_reader_accepts_proposed_concepts_in_label_studio(provisioned, labelstudio_server, ls_pipeline):
    """Concepts proposed for the ROI's aligned units show on their regions ("proposed: ..."); a reader who submits
    the ROI with "Accept the proposed concepts" labels them (the evidence in the label's note), through the real
    Label Studio."""
    from tests.fixtures.labelstudio import sign_up
    from workspace.dissect.concepts import ConceptStore
    from workspace.dissect.proposals import Proposal

    server, ws, run = labelstudio_server, ls_pipeline.ws, ls_pipeline.run
    project = provisioned.projects[lc.SCREENING]
    tasks = tasks_of(server, project.project_id)
    with ConceptStore(ws) as store:
        voted = set(store.votes(run.model_digest, run.layer))
    task, roi, aligned = next(p for p in _disjoint_rois(ls_pipeline, tasks, 4) if not p[2] & voted)
    units = sorted(aligned)
    with ConceptStore(ws) as store:
        store.save_proposals(run.run_id, run.model_digest, run.layer, [
            Proposal(unit=u, concept="proposed spiculation", attribute="finding", value="spiculated", iou=0.25,
                     n_lesions=7) for u in units])
    try:
        answer = ls_request(server, "POST", f"/api/ml/{project.ml_backend_id}/interactive-annotating", json={
            "task": task["id"], "context": {"result": [
                pr.brush(roi, label=lc.ROI_LABEL, to_name="image", from_name="roi", rid="askp")]}})
        texts = [r["meta"]["text"][0] for r in answer["data"]["result"] if r.get("from_name") == "units"]
        assert texts and all("proposed: proposed spiculation (IoU 0.25 over 7 lesions)" in t for t in texts)
        reader = sign_up(server, f"eve-{run.run_id[:6]}@clinic.example", "eve-long-password")
        result = [pr.brush(roi, label=lc.ROI_LABEL, to_name="image", from_name="roi", rid="accept"),
                  {"id": "p1", "from_name": "proposals", "to_name": "image", "type": "choices",
                   "value": {"choices": [lc.PROPOSALS_ACCEPT]}}]
        annotation = reader.client().annotations.create(id=task["id"], result=result)
        with ConceptStore(ws) as store:
            decided = [p for p in store.proposals(run.model_digest, run.layer, status=None, units=units)]
            labels = store.current_labels(run.model_digest, run.layer)
            event = store.history(run.model_digest, run.layer, unit=units[0])[-1]
        assert {p.status for p in decided} == {"accepted"}
        assert {p.decided_by for p in decided} == {f"labelstudio:{reader.username}"}
        assert {labels[u].name for u in units} == {"proposed spiculation"}
        assert event.note.startswith("proposal #") and event.note.endswith("IoU 0.25 over 7 lesions")
        from workspace.base.catalog import open_catalog

        [stored] = list(open_catalog(ws).query("SELECT roi FROM ls_annotations WHERE annotation_id = ?",
                                               [annotation.id]))
        assert json.loads(stored["roi"])["proposals"]["decision"] == "accept"
    finally:
        with ConceptStore(ws) as store:
            store.remove_labels(run.model_digest, run.layer, units, by="test-cleanup", source="api")
            store.db.execute("DELETE FROM concept_proposals WHERE run_id = ?", [run.run_id])


def _disjoint_rois(ls_pipeline, tasks, n: int) -> list[tuple[dict, np.ndarray, set[int]]]:
    """``n`` (task, ROI mask, aligned units) on distinct tasks whose aligned units do not overlap: each ROI is the
    mask of the best unit under a suspicious patch, so at least that unit is aligned."""
    from models.inference import read_mammogram
    from workspace.base.catalog import get_image, open_catalog
    from workspace.dissect.query import query_image

    ws, run = ls_pipeline.ws, ls_pipeline.run
    plans, taken = [], set()
    for task in tasks:
        image_id = task["data"]["image_id"]
        row = get_image(open_catalog(ws), image_id)
        read = read_mammogram(ws, image_id, ls_pipeline.loaded)
        for box in read.boxes[np.argsort(-read.scores)][:6]:
            x, y, s = (int(v) for v in box[:3])
            probe = np.zeros((row["rows"], row["cols"]), bool)
            probe[y:y + s, x:x + s] = True
            first = query_image(ws, image_id, probe, ls_pipeline.loaded, run)
            unit = next((int(u) for u in first.ranking if first.mask_of(int(u)).any()), None)
            if unit is None:
                continue
            roi = first.mask_of(unit)
            aligned = {int(u) for u in query_image(ws, image_id, roi, ls_pipeline.loaded, run).aligned}
            if aligned and not aligned & taken:
                plans.append((task, roi, aligned))
                taken |= aligned
                break
        if len(plans) == n:
            return plans
    raise AssertionError(f"no {n} tasks with disjoint aligned units")


def _roi_and_concept(roi: np.ndarray, concept: str, key: str) -> list[dict]:
    return [pr.brush(roi, label=lc.ROI_LABEL, to_name="image", from_name="roi", rid=f"r{key}"),
            {"id": f"c{key}", "from_name": "new_concept", "to_name": "image", "type": "textarea",
             "value": {"text": [concept]}}]
