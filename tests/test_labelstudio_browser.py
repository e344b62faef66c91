"""A reader's view, in headless Chromium against the real Label Studio 1.23.2 and the real backend.

1. A Screening task opens with the model's read drawn: outline-only suspicious-patch rectangles (the
   tissue under them stays visible), the most activated unit's map, the report, the concepts offered.
2. The reader does what the task's instructions say: switches on Auto-Annotation and Auto-Accept
   Suggestions, clicks ROI, drags a box over a lesion with the smart tool. Label Studio sends the box
   to the backend (recorded in the concept store), the aligned units' masks and the new report appear,
   the box stays in the annotation; the reader types a concept and submits, and the webhook labels the
   units with it. (A smart BRUSH stroke never reaches the backend in this Label Studio version: its
   frontend creates brush regions as non-dynamic; see ``ml_backend/label_configs.py``.)
3. A Patch review task shows the enlarged patch beside the outlined mammogram and answers a box too.

Screenshots are kept in the tests' folders; with ``MAMMO_UPDATE_SCREENSHOTS=1`` they also replace
``docs/img/labelstudio_*.png`` (``labelstudio_task.png`` is the README picture: an ROI answered).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend import label_configs as lc
from ml_backend import predictions as pr
from ml_backend.provision import provision
from ml_backend.rle import decode_mask
from tests.fixtures.common import headless_chrome, keep_screenshot

pytestmark = [pytest.mark.labelstudio, pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not ((shutil.which("chromium") or shutil.which("chromium-browser"))
                                      and shutil.which("chromedriver")),
                                 reason="needs chromium and chromedriver (`make browser`)")]

CONCEPT = "Spiculated margin"
VISIBLE_MASK_PIXELS = 150  # a mask this big has an outline of more than 20 screen pixels

# the regions and the tool state of the annotation being edited, from the Label Studio frontend's store
REGIONS_JS = """
const a = window.Htx && window.Htx.annotationStore.selected;
if (!a) return null;
return {auto: window.Htx.autoAnnotation, accept: window.Htx.autoAcceptSuggestions,
        regions: a.regions.map(r => ({id: r.cleanId || r.id, label: r.labelName || null,
                                      from: r.results.length ? r.results[0].from_name.name : null})),
        suggestions: a.suggestions ? a.suggestions.size : 0};
"""


@pytest.fixture(scope="module")
def reader(labelstudio_server, tmp_path_factory):
    """Headless Chromium, logged into the run's Label Studio as its reader (fresh profile)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chrome(1600, 1100, profile=tmp_path_factory.mktemp("chrome-profile"))
    try:
        server = labelstudio_server
        wait = WebDriverWait(driver, 90)
        driver.get(f"{server.url}/user/login/")
        wait.until(ec.presence_of_element_located((By.NAME, "email"))).send_keys(server.username)
        driver.find_element(By.NAME, "password").send_keys(server.password)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
        wait.until(lambda d: "/user/login" not in d.current_url)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def lesion(ls_pipeline):
    """An image of the workspace with a ground-truth lesion that is not benign: its id, the lesion's box
    [x, y, w, h] in the displayed (normalised) image, and ``ask``, the box the reader draws (see
    ``_box_over_lesion_units``). The first such lesion whose answer's most aligned unit has a mask big
    enough to see on screen (the stand-in model is untrained: some of its units fire in specks)."""
    from workspace.base.catalog import get_image, open_catalog
    from workspace.data.dicom_io import to_normalised

    db = open_catalog(ls_pipeline.ws)
    try:
        rows = db.execute("SELECT image_id, geometry FROM lesions WHERE source = 'ground_truth' AND "
                          "pathology != 'benign' ORDER BY image_id, lesion_id").fetchall()
        assert rows, "the test workspace has no malignant lesion"
        candidates = []
        for image_id, geometry in rows:
            image = get_image(db, image_id)
            box = to_normalised("box", json.loads(geometry)["bbox"], image)
            candidates.append({"image_id": image_id, "box": [float(v) for v in box],
                               "size": (int(image["cols"]), int(image["rows"]))})
    finally:
        db.conn.close()
    for candidate in candidates:
        candidate["ask"], top_mask_pixels = _box_over_lesion_units(ls_pipeline, candidate)
        if top_mask_pixels >= VISIBLE_MASK_PIXELS:
            return candidate
    raise AssertionError("no lesion of the test workspace has an answer with a visible most aligned unit")


@pytest.fixture(scope="module")
def projects(labelstudio_server, ls_backend, ls_pipeline, lesion):
    """Both projects, for the first image and the lesion's, with the backend's predictions retrieved."""
    from workspace.dissect.concepts import ConceptStore

    with ConceptStore(ls_pipeline.ws) as store:  # offered in the task's concept choice
        store.create_concept(CONCEPT, by="test")
    images = sorted({ls_pipeline.image_ids[0], lesion["image_id"]})
    result = provision(ls_pipeline.ws, labelstudio_server, backend_url=ls_backend.url, image_ids=images,
                       title_suffix=" (browser test)", loaded=ls_pipeline.loaded, run=ls_pipeline.run)
    client = labelstudio_server.client()
    found = {}
    for kind, project in result.projects.items():
        client.actions.create(id="retrieve_tasks_predictions", project=project.project_id)
        found[kind] = {"id": project.project_id, "ml": project.ml_backend_id,
                       "tasks": list(client.tasks.list(project=project.project_id))}
    return found


def open_task(driver, server, project_id: int, task_id: int, expect: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 90)
    driver.get(f"{server.url}/projects/{project_id}/data?task={task_id}")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "canvas")))
    wait.until(lambda d: expect in d.find_element(By.TAG_NAME, "body").text)
    wait.until(lambda d: (d.execute_script(REGIONS_JS) or {}).get("regions"))
    time.sleep(1.5)  # the image and the brush layers finish drawing


def image_canvas(driver):
    """The Konva stage of the task's main image (the largest canvas on the page)."""
    from selenium.webdriver.common.by import By

    return max(driver.find_elements(By.CSS_SELECTOR, "canvas"), key=lambda c: c.size["width"] * c.size["height"])


def ask_with_a_box(driver, box: list[float], image_size: tuple[int, int]) -> None:
    """What the task's instructions tell a reader to do: Auto-Annotation and Auto-Accept Suggestions on
    (once), click ROI, pick the smart tool, drag a box (``box`` in image pixels) on the image."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    state = driver.execute_script(REGIONS_JS)
    if not state["auto"]:
        driver.find_element(By.XPATH, "//*[normalize-space(text())='Auto-Annotation']").click()
        time.sleep(0.5)
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: d.find_elements(By.XPATH, "//*[normalize-space(text())='Auto-Accept Suggestions']"))
    if not driver.execute_script(REGIONS_JS)["accept"]:
        driver.find_element(By.XPATH, "//*[normalize-space(text())='Auto-Accept Suggestions']").click()
    driver.find_element(By.XPATH, f"//span[@class='lsf-label__text' and text()='{lc.ROI_LABEL}']").click()
    smart = wait.until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, ".lsf-tool_smart")
                                  if e.size["width"] > 0])  # shown once Auto-Annotation is on
    if "lsf-tool_active" not in smart[0].get_attribute("class"):
        smart[0].click()
    wait.until(lambda d: "lsf-tool_active" in smart[0].get_attribute("class"))
    canvas = image_canvas(driver)
    width, height = canvas.size["width"], canvas.size["height"]
    scale_x, scale_y = width / image_size[0], height / image_size[1]
    x, y, w, h = box
    actions = ActionChains(driver)
    actions.move_to_element_with_offset(canvas, round(x * scale_x - width / 2), round(y * scale_y - height / 2))
    actions.key_down(Keys.CONTROL).click_and_hold()  # Ctrl: draw even where a suspicious patch lies
    for _ in range(6):  # a drag in steps, as a hand does
        actions.move_by_offset(round(w * scale_x / 6), round(h * scale_y / 6))
    actions.release().key_up(Keys.CONTROL).perform()


def wait_for_answer(driver, store, image_id: str, before: int | None, shots: Path, timeout: float = 60.0):
    """The new query the backend recorded, once its answer is in the page (the report mentions the ROI)."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    query = None
    while time.monotonic() < deadline:
        latest = store.latest_query(image_id=image_id)
        if latest is not None and latest.query_id != before:
            query = latest
            if "aligned with the ROI" in driver.find_element(By.TAG_NAME, "body").text:
                state = driver.execute_script(REGIONS_JS)
                if not state["suggestions"] and any(r["from"] == "units" and r["label"] != lc.MOST_ACTIVATED_LABEL
                                                    for r in state["regions"]):
                    return query, state
        time.sleep(0.25)
    driver.save_screenshot(str(shots / "labelstudio_no_answer.png"))  # what the page showed instead
    raise AssertionError("no interactive answer in the page" if query else
                         "Label Studio sent no interactive request to the backend for the drawn box")


def on_image(pixels: np.ndarray, canvas) -> np.ndarray:
    """The part of a screenshot where the task's image is (the region list beside it repeats the colours)."""
    x0, y0 = canvas.location["x"], canvas.location["y"]
    return pixels[y0:y0 + canvas.size["height"], x0:x0 + canvas.size["width"]]


def colour_pixels(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> int:
    return int((np.abs(pixels.astype(int) - np.array(rgb)).max(axis=-1) < tol).sum())


def test_task_with_predictions_in_headless_chromium(labelstudio_server, reader, projects, ls_pipeline, tmp_path):
    from selenium.webdriver.common.by import By

    screening = projects[lc.SCREENING]
    task = next(t for t in screening["tasks"] if t.data["image_id"] == ls_pipeline.image_ids[0])
    open_task(reader, labelstudio_server, screening["id"], task.id, lc.SUSPICIOUS_LABEL)
    shot = tmp_path / "labelstudio_predictions.png"
    reader.save_screenshot(str(shot))
    page = reader.find_element(By.TAG_NAME, "body").text
    canvas = image_canvas(reader)
    origin, size = canvas.location, canvas.size
    assert task.data["image_id"] in page and lc.MOST_ACTIVATED_LABEL in page
    assert "units labelled" in page  # the report text area shows the backend's report
    assert CONCEPT in page  # existing concepts are offered next to the ROI
    assert "Auto-Annotation" in page and "drag a box" in page and "Ctrl" in page  # the instructions and the switch they name
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] >= 900 and pixels.std() > 20  # a rendered page, not a blank one
    assert colour_pixels(on_image(pixels, canvas), (255, 122, 0)) > 200  # the suspicious-patch outlines (#ff7a00)
    # the rectangles are outlines: inside them the mammogram shows untinted (grey), except where the
    # most activated unit's see-through map lies
    predictions = list(labelstudio_server.client().predictions.list(task=task.id))
    assert len(predictions) == 1
    result = predictions[0].result
    unit = next(r for r in result if r["from_name"] == "units")
    unit_mask = decode_mask(unit["value"]["rle"], unit["original_width"], unit["original_height"])
    grey_fractions = []
    for r in result:
        if r["from_name"] != "findings":
            continue
        v = r["value"]
        x0 = origin["x"] + size["width"] * v["x"] / 100 + 6
        y0 = origin["y"] + size["height"] * v["y"] / 100 + 6
        x1 = x0 + size["width"] * v["width"] / 100 - 12
        y1 = y0 + size["height"] * v["height"] / 100 - 12
        ow, oh = unit["original_width"], unit["original_height"]
        ix = slice(int(ow * v["x"] / 100), int(ow * (v["x"] + v["width"]) / 100))
        iy = slice(int(oh * v["y"] / 100), int(oh * (v["y"] + v["height"]) / 100))
        if unit_mask[iy, ix].any() or x1 <= x0 or y1 <= y0:
            continue
        inside = pixels[int(y0):int(y1), int(x0):int(x1)].astype(int)
        chroma = inside.max(axis=-1) - inside.min(axis=-1)
        grey_fractions.append(float((chroma < 16).mean()))
    assert grey_fractions and min(grey_fractions) > 0.95, grey_fractions
    keep_screenshot(shot, "labelstudio_predictions.png")


def _roi_of_box(box: list[float], size: tuple[int, int]) -> np.ndarray:
    cols, rows = size
    x, y, w, h = box
    roi = np.zeros((rows, cols), dtype=bool)
    roi[max(0, int(y)):max(0, int(y + h)), max(0, int(x)):max(0, int(x + w))] = True
    return roi


def _box_over_lesion_units(pipeline, lesion) -> tuple[list[float], int]:
    """The box a reader draws: around the lesion, or, where the test's untrained model fires in small spots
    only, around the biggest mask among the units closest to the lesion (so an answer has a visible unit).
    Also the pixel count of the mask of the unit that box aligns best with."""
    from workspace.dissect.query import query_image

    x, y, w, h = lesion["box"]
    margin = max(6.0, 0.25 * max(w, h))
    answer = query_image(pipeline.ws, lesion["image_id"], _roi_of_box(lesion["box"], lesion["size"]),
                         pipeline.loaded, pipeline.run)
    masks = [answer.mask_of(int(u)) for u in answer.ranking[:8]]
    masks = [m for m in masks if m.any()]
    if answer.aligned.size or not masks:
        box = [x - margin, y - margin, w + 2 * margin, h + 2 * margin]
    else:
        ys, xs = np.nonzero(max(masks, key=np.count_nonzero))
        box = [float(xs.min()) - 4, float(ys.min()) - 4, float(np.ptp(xs)) + 9, float(np.ptp(ys)) + 9]
    asked = query_image(pipeline.ws, lesion["image_id"], _roi_of_box(box, lesion["size"]), pipeline.loaded,
                        pipeline.run)
    return box, int(np.count_nonzero(asked.mask_of(int(asked.ranking[0]))))


def test_reader_draws_an_roi_box_and_gets_the_answer(labelstudio_server, reader, projects, ls_pipeline, lesion,
                                                     tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from workspace.base.catalog import open_catalog
    from workspace.dissect.concepts import ConceptStore

    screening = projects[lc.SCREENING]
    task = next(t for t in screening["tasks"] if t.data["image_id"] == lesion["image_id"])
    open_task(reader, labelstudio_server, screening["id"], task.id, lc.SUSPICIOUS_LABEL)
    box = lesion["ask"]
    with ConceptStore(ls_pipeline.ws) as store:
        before = store.latest_query(image_id=lesion["image_id"])
        started = time.perf_counter()
        ask_with_a_box(reader, box, lesion["size"])
        query, state = wait_for_answer(reader, store, lesion["image_id"], before.query_id if before else None,
                                       tmp_path)
        seconds = time.perf_counter() - started
    # the backend got the box the reader drew (screen pixels -> image pixels: within a few pixels)
    bx, by, bw, bh = query.roi["bbox"]
    tolerance = 3 * lesion["size"][0] / image_canvas(reader).size["width"] + 1
    assert np.allclose([bx, by, bx + bw, by + bh], [box[0], box[1], box[0] + box[2], box[1] + box[3]],
                       atol=tolerance), (query.roi["bbox"], box)
    assert query.source == "labelstudio" and seconds < 30
    # the answer is in the annotation: the most aligned unit first, the box kept (echoed by the backend)
    units = [(pr.unit_of_region({"id": r["id"]}), r["label"]) for r in state["regions"] if r["from"] == "units"
             and r["label"] != lc.MOST_ACTIVATED_LABEL]
    assert (query.ranking[0][0], lc.MOST_ALIGNED_LABEL) in units
    assert all(label in (lc.MOST_ALIGNED_LABEL, lc.ALIGNED_LABEL) for _, label in units)
    assert any(r["from"] == "roi_box" and r["id"].startswith(pr.ECHO_PREFIX) for r in state["regions"])
    page = reader.find_element(By.TAG_NAME, "body").text
    assert f"{len(query.aligned)} aligned with the ROI" in page  # the report was rewritten for this ROI
    time.sleep(1.0)
    shot = tmp_path / "labelstudio_task.png"
    reader.save_screenshot(str(shot))
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    drawn = on_image(pixels, image_canvas(reader)).astype(int)
    assert colour_pixels(drawn, (255, 0, 255)) > 100  # the ROI box (magenta) is drawn on the image
    # and the most aligned unit (green, drawn see-through over the grey tissue)
    red, green, blue = drawn[..., 0], drawn[..., 1], drawn[..., 2]
    assert int(((green - red > 60) & (green - blue > 20)).sum()) > 20
    keep_screenshot(shot, "labelstudio_task.png")

    # the reader names the concept and submits: the webhook labels the units with it, from this ROI
    typed = "Spiculated mass (browser)"
    field = reader.find_element(By.CSS_SELECTOR, "[placeholder^='...or type a new concept']")
    field.send_keys(typed, Keys.ENTER)
    reader.find_element(By.XPATH, "//button[normalize-space(.)='Submit']").click()
    deadline, rows = time.monotonic() + 60, []
    while time.monotonic() < deadline and not rows:
        db = open_catalog(ls_pipeline.ws)
        try:
            rows = [dict(r) for r in db.query("SELECT * FROM ls_annotations WHERE task_id = ? AND concept = ?",
                                              [task.id, typed])]
        finally:
            db.conn.close()
        time.sleep(0.3)
    assert rows, "the submitted annotation did not reach the webhook with the typed concept"
    roi = json.loads(rows[-1]["roi"])
    assert roi["geometry"]["bbox"] == query.roi["bbox"]  # the echoed box: the same ROI as the question
    assert sorted(roi["labelled_units"]) == sorted(u for u, _ in units)  # the units the reader kept
    with ConceptStore(ls_pipeline.ws) as store:
        labels = store.labels(ls_pipeline.run.model_digest, ls_pipeline.run.layer)
    assert all(labels[u].name == typed for u, _ in units)


def test_patch_review_task_shows_the_patch_and_answers_a_box(labelstudio_server, reader, projects, ls_pipeline,
                                                            tmp_path):
    from selenium.webdriver.common.by import By

    from workspace.dissect.concepts import ConceptStore

    review = projects[lc.PATCH_REVIEW]
    assert review["tasks"], "no suspicious patch to review"
    task = review["tasks"][0]
    open_task(reader, labelstudio_server, review["id"], task.id, lc.MOST_ACTIVATED_LABEL)
    page = reader.find_element(By.TAG_NAME, "body").text
    assert "draw the ROI here" in page and "orange outline" in page and task.data["image_id"] in page
    stages = [c for c in reader.find_elements(By.CSS_SELECTOR, "canvas") if c.size["width"] > 50]
    widths = sorted({c.size["width"] for c in stages})
    assert len(widths) >= 2 and widths[-1] > 1.5 * widths[0]  # the enlarged patch beside the smaller mammogram
    size = int(task.data["box"][2])
    with ConceptStore(ls_pipeline.ws) as store:
        before = store.latest_query(image_id=task.data["image_id"])
        ask_with_a_box(reader, [size * 0.3, size * 0.3, size * 0.4, size * 0.4], (size, size))
        query, state = wait_for_answer(reader, store, task.data["image_id"], before.query_id if before else None,
                                       tmp_path)
    assert query.patch_box == task.data["box"]
    assert any(r["label"] == lc.MOST_ALIGNED_LABEL for r in state["regions"])
    shot = tmp_path / "labelstudio_patch_review.png"
    reader.save_screenshot(str(shot))
    keep_screenshot(shot, "labelstudio_patch_review.png")
