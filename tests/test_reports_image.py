"""report_for_image and `mammo report` end to end: synthetic mammograms, a real (tiny, untrained) model,
its cached read, a real dissection run of its activations, the ROI query engine and the concept store."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.pipeline import tiny_read_run
from workspace.app.cli import main
from workspace.base.errors import CatalogError, QueryError
from workspace.dissect import query
from workspace.dissect.concepts import ConceptStore
from workspace.dissect.reports import report_for_image

PATCH = 64


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    ws, loaded, run, ids, reads = tiny_read_run(tmp_path_factory.mktemp("report-ws") / "ws", PATCH)
    image_id = max(ids, key=lambda i: len(reads[ids.index(i)].boxes))
    read = reads[ids.index(image_id)]
    # an ROI where one live unit is active above its threshold: that unit's own mask on the image
    live = np.flatnonzero(run.thresholds > 0)
    ratio = np.asarray(read.maps, dtype=np.float32).max(axis=(2, 3))[:, live] / run.thresholds[live]
    for flat in np.argsort(-ratio, axis=None)[:20]:
        p, u = np.unravel_index(flat, ratio.shape)
        box = [int(v) for v in read.boxes[p]]
        probe = query.query_image(ws, image_id, query.roi_from_box(box, read.shape), loaded, run, read=read)
        unit = int(live[u])
        roi = probe.mask_of(unit)
        if roi.any():
            break
    assert roi.any()
    return {"ws": ws, "loaded": loaded, "run": run, "image_id": image_id, "read": read, "roi": roi,
            "unit": unit, "live": live}


def test_report_numbers_follow_the_read_the_run_and_the_query(pipeline):
    ws, run, loaded, read = pipeline["ws"], pipeline["run"], pipeline["loaded"], pipeline["read"]
    image_id, roi = pipeline["image_id"], pipeline["roi"]
    expected_iou = query.query_image(ws, image_id, roi, loaded, run, read=read).iou
    aligned = {int(u) for u in np.flatnonzero(expected_iou >= 0.2)}
    assert pipeline["unit"] in aligned
    live = [int(u) for u in pipeline["live"] if int(u) != pipeline["unit"]]
    mass, vessel = live[:3], live[3:5]
    store = ConceptStore(ws)
    store.label_units(run.model_digest, run.layer, mass, "mass", by="t", source="api", run_id=run.run_id)
    store.label_units(run.model_digest, run.layer, vessel, "vessel", by="t", source="api", run_id=run.run_id)

    report = report_for_image(ws, image_id, roi, record=True, asked_by="dr-r")   # run and model found alone
    peak = np.asarray(read.maps, dtype=np.float64).max(axis=(0, 2, 3))       # hand computation
    for name, units in (("mass", mass), ("vessel", vessel)):
        score = report.concept(name)
        assert score.units == units
        assert score.mean_activation == pytest.approx(peak[units].mean(), rel=1e-6)
        assert score.mean_normalised == pytest.approx((peak[units] / run.thresholds[units]).mean(), rel=1e-5)
        assert score.mean_iou == pytest.approx(expected_iou[units].mean())
    assert [c.unit for c in report.label_me] == sorted(aligned - set(mass) - set(vessel),
                                                       key=lambda u: (-expected_iou[u], u))
    assert report.label_me[0].unit == pipeline["unit"] or expected_iou[report.label_me[0].unit] >= 0.999
    assert (report.n_units, report.run_id, report.thumbnail is not None) == (run.n_units, run.run_id, True)

    recorded = store.latest_query(image_id=image_id)
    assert recorded.query_id == report.query_id and recorded.asked_by == "dr-r"
    assert set(recorded.aligned) == aligned and recorded.ranking[0][1] == pytest.approx(expected_iou.max())

    # one patch of the read only
    box = [int(v) for v in read.boxes[0]]
    patch_report = report_for_image(ws, image_id, patch_box=box, run=run, loaded=loaded)
    patch_peak = np.asarray(read.maps[0], dtype=np.float64).max(axis=(1, 2))
    assert patch_report.concept("mass").mean_activation == pytest.approx(patch_peak[mass].mean(), rel=1e-6)
    assert not patch_report.has_roi and patch_report.patch_box == box


def test_mammo_report_cli(pipeline, capsys, tmp_path):
    ws, image_id, roi = pipeline["ws"], pipeline["image_id"], pipeline["roi"]
    ConceptStore(ws).label_units(pipeline["run"].model_digest, pipeline["run"].layer, [int(pipeline["live"][0])],
                                 "mass", by="t", source="api", n_units=pipeline["run"].n_units)
    mask_png = tmp_path / "roi.png"
    Image.fromarray(roi.astype(np.uint8) * 255).save(mask_png)
    base = ["--workspace", str(ws.root), "report", image_id]

    assert main([*base, "--roi-mask", str(mask_png), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    direct = report_for_image(ws, image_id, roi)
    assert data["concepts"][0]["mean_iou"] == pytest.approx(direct.concepts[0].mean_iou)
    assert data["aligned"] == direct.aligned

    ys, xs = np.nonzero(roi)
    box = f"{xs.min()},{ys.min()},{xs.max() - xs.min() + 1},{ys.max() - ys.min() + 1}"
    assert main([*base, "--roi", box]) == 0
    html_path = ws.reports_dir / f"{image_id}.html"
    assert capsys.readouterr().out.strip() == str(html_path)
    page = html_path.read_text()
    # the thumbnail, activation value, activation area and the effect of silencing each concept on the score
    assert page.count("<svg") == 4 and "data:image/png;base64," in page and "mass" in page
    assert "Effect on the score" in page

    assert main([*base, "--format", "text"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{image_id}: ") and "mass:" in text and len(text.splitlines()) <= 6
    assert "silenced: " in text
    assert main([*base, "--format", "text", "--no-silence"]) == 0
    assert "silenced" not in capsys.readouterr().out

    for argv, message in [(["--roi", "5000,5000,10,10"], "no pixel inside"),
                          (["--roi-mask", str(tmp_path / "none.png")], "no ROI mask file")]:
        assert main([*base, *argv]) == 1
        assert message in capsys.readouterr().err


def test_bad_image_and_roi(pipeline):
    ws = pipeline["ws"]
    with pytest.raises(CatalogError, match="no image 'I-nope'"):
        report_for_image(ws, "I-nope")
    with pytest.raises(QueryError, match="no pixel inside"):
        report_for_image(ws, pipeline["image_id"], [9000, 9000, 5, 5])
