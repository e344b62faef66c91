"""The real FiftyOne App in headless Chromium: the Neuron map panel opens with the layout, a click on a
unit shows its top patches in the grid, a lasso selection is labelled in one action and lands in the
concept store; the workspace saved with the neurons dataset opens FiftyOne's own Embeddings panel on them.

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


@pytest.fixture(scope="module")
def app(fo_pipeline, fo_app):
    """ONE App for the module, started on the patches dataset with the neuron-map layout. The App's server
    holds one state for every page, so the tests that open another dataset come after those that need
    the launch state."""
    return fo_app(fo_pipeline.ws, fo_pipeline.patches.name)


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


def _dismiss_popups(d) -> None:
    """Close FiftyOne's own advertising pop-ups (they open a while after the page, over the panels)."""
    from selenium.webdriver.common.by import By

    for dismiss in d.find_elements(By.XPATH, "//button[normalize-space()='Dismiss']"):
        d.execute_script("arguments[0].click()", dismiss)
    time.sleep(0.5)


def _click_past_popups(d, element, timeout: float = 20.0) -> None:
    from selenium.common.exceptions import ElementClickInterceptedException

    deadline = time.monotonic() + timeout
    while True:
        try:
            element.click()
            return
        except ElementClickInterceptedException:
            if time.monotonic() > deadline:
                raise
            _dismiss_popups(d)


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


def test_neuron_map_click_lasso_and_label_in_the_real_app(fo_pipeline, app, browser, tmp_path):
    try:
        _drive_the_app(fo_pipeline, app, browser, tmp_path)
    finally:  # the pipeline workspace is shared: leave its labels as they were
        with ConceptStore(fo_pipeline.ws) as store:
            if store.find_concept("Browser concept") is not None:
                store.remove_labels(fo_pipeline.run.model_digest, fo_pipeline.run.layer,
                                    concept="Browser concept", by="test-cleanup", source="api")


def _drive_the_app(fo_synced, app, browser, shots: Path):
    from fiftyone import ViewField as F
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    d = browser
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


def test_saved_workspace_shows_the_neurons_in_the_apps_embeddings_panel(fo_pipeline, app, browser, tmp_path):
    """FiftyOne's own Embeddings panel, in the layout saved with the neurons dataset (workspace
    ``mammo-dissect``: what a curator's own App on a shared database opens), draws one point per unit from
    the brain run ``neuron_pca``. Last in the module: it moves the App to the neurons dataset."""
    from PIL import Image
    from scipy import ndimage
    from selenium.webdriver.common.by import By

    from fiftyone_plugins.sync import NEURON_MAP_KEY, WORKSPACE_NAME

    d = browser
    n_units = fo_pipeline.run.n_units
    assert len(fo_pipeline.neurons) == n_units
    # the App loads the saved workspace the URL names (the server's initializer, events/initialize.py)
    d.get(f"{app.url}datasets/{fo_pipeline.neurons.name}?workspace={WORKSPACE_NAME}")
    # the panel lists the dataset's visualizations; FiftyOne 1.22's panel opens none from saved state
    run = _wait(lambda: d.find_elements(By.XPATH, f"//*[normalize-space()='{NEURON_MAP_KEY}']"), d=d)
    _click_past_popups(d, run[-1])
    _wait(lambda: re.search(rf"^{n_units} points$", _body(d), re.M), d=d)
    assert NEURON_MAP_KEY in d.find_element(By.CSS_SELECTOR, ".emb-plot-title").text
    time.sleep(1.0)
    _dismiss_popups(d)
    shot = _shot(d, tmp_path, "fiftyone_embeddings_panel.png")
    # "N points" counts the points the panel loaded; that they are drawn is seen in the picture (a WebGL
    # canvas, no Plotly data to read): orange dots on the grey plot, many apart (some overlap in clusters)
    box = d.execute_script("const r = document.querySelector('.emb-plot canvas').getBoundingClientRect();"
                           "const s = window.devicePixelRatio; return [r.left * s, r.top * s, r.right * s, r.bottom * s];")
    plot = np.asarray(Image.open(shot).convert("RGB").crop(tuple(int(v) for v in box)), dtype=int)
    _labels, dots = ndimage.label(plot[..., 0] - plot[..., 2] > 60)
    assert dots >= n_units // 4, dots
