"""The real FiftyOne App in headless Chromium: the Neuron map panel opens with the layout, a click on a
unit shows its top patches in the grid, a lasso selection is labelled in one action and lands in the
concept store.

Screenshots are kept in the test's folder; with ``MAMMO_UPDATE_SCREENSHOTS=1`` they also replace
``docs/img/fiftyone_*.png`` (so a CI run leaves the tracked pictures alone)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.common import headless_chrome, keep_screenshot
from workspace.dissect.concepts import ConceptStore

pytestmark = [pytest.mark.fiftyone, pytest.mark.browser, pytest.mark.slow]


# Pixel offsets of every point from the plot's centre (what ActionChains offsets are relative to).
POINTS_JS = """
const gd = document.querySelector('.js-plotly-plot'); const r = gd.getBoundingClientRect();
const fl = gd._fullLayout; const out = {};
gd.data.forEach(t => t.ids.forEach((id, i) => {
  out[id] = [r.left + fl.xaxis._offset + fl.xaxis.l2p(t.x[i]) - (r.left + r.width / 2),
             r.top + fl.yaxis._offset + fl.yaxis.l2p(t.y[i]) - (r.top + r.height / 2)];
}));
const cx = r.left + r.width / 2, cy = r.top + r.height / 2;
const area = [r.left + fl.xaxis._offset - cx, r.top + fl.yaxis._offset - cy,
              r.left + fl.xaxis._offset + fl.xaxis._length - cx, r.top + fl.yaxis._offset + fl.yaxis._length - cy];
return {points: out, area: area};"""


@pytest.fixture(scope="module")
def browser():
    d = headless_chrome(1600, 1000)
    yield d
    d.quit()


def _wait(predicate, timeout=60.0, step=0.25, d=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    seen = [line for line in _body(d).splitlines() if "nit" in line] if d is not None else ""
    raise AssertionError(f"timed out waiting for the App; panel shows {seen}")


def _body(d) -> str:
    from selenium.webdriver.common.by import By

    return d.find_element(By.TAG_NAME, "body").text


def _shot(d, shots: Path, name: str) -> Path:
    path = shots / name
    d.save_screenshot(str(path))
    keep_screenshot(path)
    return path


def _lasso_box(points: dict[int, list[float]], area: list[float]):
    """A box inside the plot area around some unit, holding 2+ points, none within 5 px of its border."""
    for centre in sorted(points):
        cx, cy = points[centre]
        for half in (60, 50, 40, 70, 30):
            if cx - half < area[0] + 5 or cy - half < area[1] + 5 or cx + half > area[2] - 5 \
                    or cy + half > area[3] - 5:
                continue
            dist = {u: max(abs(x - cx), abs(y - cy)) for u, (x, y) in points.items()}
            if any(half - 5 <= v <= half + 5 for v in dist.values()):
                continue
            inside = {u for u, v in dist.items() if v < half}
            if len(inside) >= 2:
                return (cx, cy), half, inside
    raise AssertionError(f"no clean lasso box among {points}")


def test_neuron_map_click_lasso_and_label_in_the_real_app(fo_pipeline, fo_app, browser, tmp_path):
    try:
        _drive_the_app(fo_pipeline, fo_app, browser, tmp_path)
    finally:  # the pipeline workspace is shared: leave its labels as they were
        with ConceptStore(fo_pipeline.ws) as store:
            if store.find_concept("Browser concept") is not None:
                store.remove_labels(fo_pipeline.run.model_digest, fo_pipeline.run.layer,
                                    concept="Browser concept", by="test-cleanup", source="api")


def _drive_the_app(fo_synced, fo_app, browser, shots: Path):
    from fiftyone import ViewField as F
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    d = browser
    app = fo_app(fo_synced.ws, fo_synced.patches.name)
    d.get(app.url)
    _wait(lambda: d.execute_script("return document.querySelectorAll('.js-plotly-plot').length"))
    _wait(lambda: "units of" in _body(d))
    for dismiss in d.find_elements(By.XPATH, "//button[normalize-space()='Dismiss']"):
        dismiss.click()
    time.sleep(1.0)
    _shot(d, shots, "fiftyone_panel_opened.png")  # the README picture (a unit clicked) is taken on the demo
    plot = d.find_element(By.CSS_SELECTOR, ".js-plotly-plot")
    geometry = d.execute_script(POINTS_JS)
    points = {int(k): v for k, v in geometry["points"].items()}
    assert sorted(points) == list(range(fo_synced.run.n_units))

    # click a unit: the grid shows its top-k patches, best first
    k = np.asarray(fo_synced.run.top_k).shape[1]
    unit = int(np.argmax(np.asarray(fo_synced.run.top_k_values)[:, 0]))
    ActionChains(d).move_to_element_with_offset(plot, int(points[unit][0]), int(points[unit][1])) \
        .pause(0.4).click().perform()
    _wait(lambda: re.search(rf"(?<!\d){k} samples", _body(d)) and f"Unit {unit} shown" in _body(d))
    time.sleep(1.5)  # the grid's thumbnails
    _shot(d, shots, "fiftyone_unit_top_patches.png")
    montage = fo_synced.neurons.match(F("unit") == unit).first().filepath
    shutil.copyfile(montage, shots / "fiftyone_unit_montage.png")
    keep_screenshot(shots / "fiftyone_unit_montage.png")

    # lasso a box around a unit; the expected selection is every point clearly inside it
    (cx, cy), half, inside = _lasso_box(points, geometry["area"])
    corners = [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half),
               (cx - half, cy - half)]
    chain = ActionChains(d).move_to_element_with_offset(plot, int(corners[0][0]), int(corners[0][1])).click_and_hold()
    for (x0, y0), (x1, y1) in zip(corners, corners[1:], strict=False):
        for s in range(1, 6):
            chain = chain.move_to_element_with_offset(plot, int(x0 + (x1 - x0) * s / 5), int(y0 + (y1 - y0) * s / 5))
    chain.release().perform()
    listed = ", ".join(str(u) for u in sorted(inside))
    _wait(lambda: f"Selected: {len(inside)} unit(s) ({listed})" in _body(d), d=d)

    # label them with a new concept typed in, one action
    field = d.find_element(By.XPATH, "//input[@placeholder='e.g. spiculated margin']")
    field.send_keys("Browser concept")
    time.sleep(1.0)  # the App debounces text input into the panel state
    _shot(d, shots, "fiftyone_lasso_selection.png")
    d.find_element(By.XPATH, f"//button[normalize-space()='Label {len(inside)} unit(s)']").click()
    _wait(lambda: 'as "Browser concept"' in _body(d))
    with ConceptStore(fo_synced.ws) as store:
        labels = store.labels(fo_synced.run.model_digest, fo_synced.run.layer)
        events = store.history(fo_synced.run.model_digest, fo_synced.run.layer, concept="Browser concept")
    assert {u for u, c in labels.items() if c.name == "Browser concept"} == inside
    assert {e.source for e in events} == {"fiftyone"}
    # inputs are cleared and the points are back to normal size, coloured by their concept
    _wait(lambda: "Label 0 unit(s)" in _body(d))
    assert d.find_element(By.XPATH, "//input[@placeholder='e.g. spiculated margin']").get_attribute("value") == ""
    traces = d.execute_script("return document.querySelector('.js-plotly-plot').data.map("
                              "t => ({name: t.name, ids: t.ids, color: t.marker.color, size: t.marker.size}))")
    mine = next(t for t in traces if t["name"] == "Browser concept")
    assert {int(i) for i in mine["ids"]} == inside and mine["color"] != "#b0b0b0"
    assert max(mine["size"]) <= 18
    time.sleep(1.0)
    _shot(d, shots, "fiftyone_labelled.png")
