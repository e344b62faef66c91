"""A reader's view: headless Chromium logs into the real Label Studio and opens a task with the predictions.

The screenshot is kept in the test's folder; with ``MAMMO_UPDATE_SCREENSHOTS=1`` it also replaces
``docs/img/labelstudio_task.png`` (the README picture).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend import label_configs as lc
from ml_backend.provision import provision

pytestmark = [pytest.mark.labelstudio, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
DOCS_PICTURE = Path(__file__).resolve().parents[1] / "docs" / "img" / "labelstudio_task.png"


def chrome(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1600,1250",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver (`make browser`)")
def test_task_with_predictions_in_headless_chromium(labelstudio_server, ls_backend, ls_pipeline, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from workspace.concepts import ConceptStore

    server = labelstudio_server
    with ConceptStore(ls_pipeline.ws) as store:  # offered in the task's concept choice
        store.create_concept("Spiculated margin", by="test")
    result = provision(ls_pipeline.ws, server, backend_url=ls_backend.url, kinds=(lc.SCREENING,),
                       title_suffix=" (browser test)", loaded=ls_pipeline.loaded, run=ls_pipeline.run)
    project_id = result.projects[lc.SCREENING].project_id
    client = server.client()
    client.actions.create(id="retrieve_tasks_predictions", project=project_id)
    tasks = list(client.tasks.list(project=project_id))
    task = max(tasks, key=lambda t: t.data["image_id"] == ls_pipeline.image_ids[0])
    driver = chrome(tmp_path)
    try:
        wait = WebDriverWait(driver, 90)
        driver.get(f"{server.url}/user/login/")
        wait.until(ec.presence_of_element_located((By.NAME, "email"))).send_keys(server.username)
        driver.find_element(By.NAME, "password").send_keys(server.password)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
        wait.until(lambda d: "/user/login" not in d.current_url)
        driver.get(f"{server.url}/projects/{project_id}/data?task={task.id}")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "canvas")))
        wait.until(lambda d: lc.SUSPICIOUS_LABEL in d.find_element(By.TAG_NAME, "body").text)
        time.sleep(3)  # let the image and the brush layers finish drawing
        shot = tmp_path / "labelstudio_task.png"
        driver.save_screenshot(str(shot))
        page = driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()
    assert task.data["image_id"] in page and lc.MOST_ACTIVATED_LABEL in page
    assert "units labelled" in page  # the report text area shows the backend's report
    assert "Spiculated margin" in page  # existing concepts are offered next to the ROI
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] >= 900 and pixels.std() > 20  # a rendered page, not a blank one
    orange = (pixels[..., 0] > 200) & (pixels[..., 1] > 90) & (pixels[..., 1] < 160) & (pixels[..., 2] < 60)
    assert orange.sum() > 200  # the suspicious-patch rectangles (#ff7a00) are drawn
    if os.environ.get("MAMMO_UPDATE_SCREENSHOTS") == "1":
        DOCS_PICTURE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_PICTURE)
