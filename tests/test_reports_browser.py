"""The HTML report as a browser draws it (headless Chromium): bars laid out, nothing off-page, offline."""

from __future__ import annotations

import shutil

import pytest

from tests.fixtures.common import headless_chrome
from tests.test_reports_numbers import ACTS, IOU, LAYER, MODEL, T
from workspace.dissect.concepts import ConceptStore
from workspace.dissect.reports import build_report, make_thumbnail

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                                 reason="needs chromium and chromedriver (make browser)")]


def test_report_page_renders_bars_in_proportion(ws, tmp_path):
    import numpy as np
    from selenium.webdriver.common.by import By

    store = ConceptStore(ws)
    store.label_units(MODEL, LAYER, [0, 1, 2], "mass", by="r", source="cli", n_units=6)
    store.label_units(MODEL, LAYER, [3], "calcification", by="r", source="cli", n_units=6)
    display = (np.linspace(0, 255, 300 * 200).reshape(300, 200)).astype(np.uint8)
    roi = np.zeros((300, 200), bool)
    roi[100:150, 40:90] = True
    report = build_report(ACTS, T, store.labels(MODEL, LAYER), iou=IOU, image_id="I-1", roi={"bbox": [40, 100, 50, 50]},
                          thumbnail=make_thumbnail(display, roi_mask=roi))
    page = report.save(tmp_path / "report.html")

    driver = headless_chrome(1280, 1000)
    try:
        driver.get(page.as_uri())
        charts = driver.find_elements(By.CSS_SELECTOR, ".charts svg")
        assert len(charts) == 2
        bars = [[r.size["width"] for r in chart.find_elements(By.CSS_SELECTOR, "rect")] for chart in charts]
        # drawn widths keep the numbers' proportions: activation 2.0 vs 1.4167, IoU 0.3 vs 0.2
        assert bars[0][1] / bars[0][0] == pytest.approx(4.25 / 3 / 2.0, rel=0.03)
        assert bars[1][0] / bars[1][1] == pytest.approx(0.3 / 0.2, rel=0.03)
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 1280
        thumb = driver.find_element(By.CSS_SELECTOR, ".thumb svg")
        assert thumb.size["height"] > 200 and len(thumb.find_elements(By.CSS_SELECTOR, "image")) == 2
        assert driver.find_element(By.TAG_NAME, "h1").text == "Concept report — I-1"
        assert driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
