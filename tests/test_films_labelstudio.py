"""A real film read through a real Label Studio: the task, the model's prediction with the card and the
domain warning, and an ROI answered through Label Studio's interactive endpoint."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

WARNING = "Outside the model's training domain"


@pytest.fixture(scope="module")
def film_project(films, labelstudio_server):
    from ml_backend import label_configs as lc
    from ml_backend.provision import provision
    from ml_backend.serve import start_backend

    backend = start_backend(films.ws, run_id=films.run.run_id, name="ml_backend_films")
    try:
        result = provision(films.ws, labelstudio_server, backend_url=backend.url, kinds=(lc.SCREENING,),
                           image_ids=films.film_ids[:2], title_suffix=" (films)", loaded=films.loaded,
                           run=films.run)
        yield result.projects[lc.SCREENING]
    finally:
        backend.stop()


def test_a_film_task_prediction_and_roi_through_label_studio(films, film_project, labelstudio_server):
    from models.inference import read_mammogram
    from workspace.app.demo_check import ask_roi, report_text, retrieve_prediction, task_of_image
    from workspace.base.catalog import get_image, open_catalog
    from workspace.dissect.query import query_image

    server, image_id = labelstudio_server, films.film_ids[0]
    card = films.loaded.card.summary()
    task = task_of_image(server, film_project.project_id, image_id)
    assert task["data"]["model_card"] == card and task["data"]["view"] in ("CC", "MLO")

    prediction = retrieve_prediction(server, film_project.project_id, task["id"])
    read = read_mammogram(films.ws, image_id, films.loaded)
    rects = [r for r in prediction["result"] if r["type"] == "rectanglelabels"]
    assert len(rects) == len(read.suspicious) > 0
    assert all("(image outside the model's training domain)" in r["meta"]["text"][0] for r in rects)
    text = report_text(prediction)
    assert "WARNING: " + WARNING in text and card in text

    row = get_image(open_catalog(films.ws), image_id)
    x, y, w, h = (int(v) for v in read.boxes[int(read.suspicious[0])])
    roi = np.zeros((int(row["rows"]), int(row["cols"])), dtype=bool)
    roi[y + h // 4: y + 3 * h // 4, x + w // 4: x + 3 * w // 4] = True
    answer = ask_roi(server, film_project.ml_backend_id, task["id"], roi, region_id="film-roi")
    expected = query_image(films.ws, image_id, roi, films.loaded, films.run)
    assert sorted(int(u) for u in answer["aligned"]) == sorted(int(u) for u in expected.aligned)
    assert [u for u, _ in answer["ranking"][:5]] == [int(u) for u in expected.ranking[:5]]
    assert "WARNING: " + WARNING in report_text(answer)
