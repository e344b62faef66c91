"""One read followed end to end, on the test run's shared Label Studio server and mongod.

A reader opens a mammogram task, gets the model's predictions, draws an ROI over the lesion (a brush
RLE sent through Label Studio's interactive endpoint), gets the aligned units; a curator labels two
of them in FiftyOne (the plugin's operator, on the real database, after the sync); the reader draws
the ROI again and the report in Label Studio's answer now names the concept.

The workspace is this module's own (the Label Studio stand-in: 3 synthetic patients, an untrained
slim VGG, a dissection run), so the labels written here touch no other test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

pytestmark = [pytest.mark.labelstudio, pytest.mark.fiftyone, pytest.mark.slow]

CONCEPT = "spiculated mass (e2e)"


@dataclass
class ReadSetup:
    ws: object
    loaded: object
    run: object
    server: object
    project: object
    backend: object


@pytest.fixture(scope="module")
def read_setup(tmp_path_factory, _quiet_and_contained, labelstudio_server):
    from ml_backend import label_configs as lc
    from ml_backend.provision import provision
    from ml_backend.serve import start_backend
    from tests.fixtures.labelstudio import _standin

    built = _standin(tmp_path_factory.mktemp("e2e-read"))
    backend = start_backend(built.ws, run_id=built.run.run_id, name="ml_backend_e2e")
    try:
        result = provision(built.ws, labelstudio_server, backend_url=backend.url, kinds=(lc.SCREENING,),
                           title_suffix=" (e2e read)", loaded=built.loaded, run=built.run)
        yield ReadSetup(ws=built.ws, loaded=built.loaded, run=built.run, server=labelstudio_server,
                        project=result.projects[lc.SCREENING], backend=backend)
    finally:
        backend.stop()


def _lesion_roi(setup: ReadSetup) -> tuple[str, np.ndarray]:
    """The image and ground-truth lesion box ROI with the most aligned units (the model is untrained, so
    not every lesion aligns with two units; the reader would pick another)."""
    from workspace.app.demo_check import lesion_boxes
    from workspace.base.catalog import get_image, open_catalog
    from workspace.dissect.query import query_image

    db = open_catalog(setup.ws)
    best = None
    for image_id in [r["image_id"] for r in db.query("SELECT image_id FROM images ORDER BY image_id")]:
        row = get_image(db, image_id)
        for x, y, w, h in lesion_boxes(setup.ws, image_id):
            roi = np.zeros((int(row["rows"]), int(row["cols"])), dtype=bool)
            roi[y:y + h, x:x + w] = True
            first = query_image(setup.ws, image_id, roi, setup.loaded, setup.run)
            candidates = [roi]
            # an untrained model's masks are small next to a lesion box: the reader then outlines where the
            # two units closest to the lesion fire (still a region over the lesion's patch)
            near = [int(u) for u in first.ranking[:8] if first.mask_of(int(u)).any()]
            candidates += [first.mask_of(a) | first.mask_of(b) for i, a in enumerate(near) for b in near[i + 1:4]]
            for candidate in candidates:
                n = len(query_image(setup.ws, image_id, candidate, setup.loaded, setup.run).aligned)
                if best is None or n > best[0]:
                    best = (n, image_id, candidate)
            if best[0] >= 2:
                break
        if best is not None and best[0] >= 2:
            break
    assert best is not None and best[0] >= 2, "no lesion ROI aligns with two units in the stand-in workspace"
    return best[1], best[2]


def test_one_read_from_prediction_to_a_report_naming_the_new_concept(read_setup, fo_db):
    import fiftyone as fo
    import fiftyone.operators as foo
    from fiftyone import ViewField as F

    from fiftyone_plugins import operator_uri
    from fiftyone_plugins.sync import sync
    from ml_backend import predictions as pr
    from models.inference import read_mammogram
    from workspace.app.demo_check import ask_roi, report_text, retrieve_prediction, task_of_image
    from workspace.dissect.concepts import ConceptStore
    from workspace.dissect.query import query_image

    setup = read_setup
    ws, run, server = setup.ws, setup.run, setup.server
    image_id, roi = _lesion_roi(setup)

    # 1. the reader opens the mammogram's task and gets the model's predictions through Label Studio
    task = task_of_image(server, setup.project.project_id, image_id)
    assert task["data"]["image_id"] == image_id
    prediction = retrieve_prediction(server, setup.project.project_id, task["id"])
    read = read_mammogram(ws, image_id, setup.loaded)
    rects = [r for r in prediction["result"] if r["type"] == "rectanglelabels"]
    assert len(rects) == len(read.suspicious)
    assert prediction["score"] == pytest.approx(read.image_score, abs=1e-5)
    assert any(r["type"] == "choices" for r in prediction["result"])

    # 2. an ROI over the lesion: the aligned units, as the query engine finds them
    answer = ask_roi(server, setup.project.ml_backend_id, task["id"], roi, region_id="e2e-roi")
    expected = query_image(ws, image_id, roi, setup.loaded, run)
    aligned = [int(u) for u in answer["aligned"]]
    assert sorted(aligned) == sorted(int(u) for u in expected.aligned) and len(aligned) >= 2
    shown = [pr.unit_of_region(r) for r in answer["result"] if r["type"] == "brushlabels"]
    assert shown[:2] == [u for u, _ in answer["ranking"] if u in set(aligned)][:2]
    before = report_text(answer)
    assert CONCEPT not in before and "Label me: unit" in before

    # 3. a curator labels two of them in FiftyOne, with the plugin's operator on the real database
    patches, neurons = sync(ws, run, prefix="e2e", loaded=setup.loaded)
    units = shown[:2]
    result = foo.execute_operator(operator_uri("label_units"), dataset=fo.load_dataset(patches.name),
                                  params={"units": units, "concept": CONCEPT})
    assert result.result == {"changed": 2}
    assert sorted(neurons.match(F("unit").is_in(units)).values("concept.label")) == [CONCEPT] * 2
    with ConceptStore(ws) as store:
        labels = store.labels(run.model_digest, run.layer)
        events = store.history(run.model_digest, run.layer, concept=CONCEPT)
    assert {u: labels[u].name for u in units} == {u: CONCEPT for u in units}
    assert {e.source for e in events} == {"fiftyone"}

    # 4. the reader draws the same ROI again: the report in Label Studio's answer names the concept
    again = ask_roi(server, setup.project.ml_backend_id, task["id"], roi, region_id="e2e-roi2")
    text = report_text(again)
    assert CONCEPT in text, text
    line = next(t for t in text.splitlines() if t.startswith(CONCEPT))
    assert "2 units" in line and "ROI IoU" in line
    assert again["query_id"] > answer["query_id"]
    # the labelled units' masks now carry the concept in their captions
    captions = {pr.unit_of_region(r): " ".join((r.get("meta") or {}).get("text") or [])
                for r in again["result"] if r["type"] == "brushlabels"}
    assert all(CONCEPT in captions[u] for u in units)
    # and the labelled units are no longer offered as "label me"
    label_me = next((t for t in text.splitlines() if t.startswith("Label me")), "")
    assert not any(f" {u} (" in label_me for u in units)
