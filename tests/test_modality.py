"""Another modality, same workflow: a real chest CR (pydicom-data's RG1_UNCR, 1955 x 1841 MONOCHROME1)
imported with `--non-mg warn`, read and dissected with a foreign CNN at a layer the user names, queried and
reported, with no mammography-only step applied (workspace.base.modality)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from workspace.app.cli import main
from workspace.base.catalog import open_catalog
from workspace.base.config import Workspace
from workspace.base.modality import MAMMOGRAPHY, modality_of
from workspace.data.domain import check_domain, domain_profile, image_features

pytestmark = pytest.mark.slow


def test_the_assumptions_of_each_modality():
    assert modality_of(None) is MAMMOGRAPHY and modality_of("mg") is MAMMOGRAPHY
    cr = modality_of("CR")
    assert (cr.region, cr.chest_wall_left, cr.birads) == ("body", False, False)
    pixels = np.full((64, 64), 0.6, np.float32)
    fg = np.zeros((64, 64), bool)
    fg[8:56, 8:56] = True
    profile = domain_profile([image_features(pixels * 0.5, fg)], ["synthetic"])
    reasons = " ".join(check_domain(profile, image_features(pixels, fg), modality="CR").reasons)
    assert "body intensity (median)" in reasons and "breast" not in reasons


MODEL = ["--arch", "torchvision:resnet18", "--layer", "layer3", "--class-names", "no finding,pneumonia",
         "--positive-class", "pneumonia"]


@pytest.fixture(scope="module")
def chest(tmp_path_factory, _quiet_and_contained):
    """pydicom-data's chest CR imported with ``--non-mg warn``, read and dissected over its tissue grid with
    a two-class ResNet-18 (1-channel, random weights) at layer3, as a user types it."""
    from pydicom.data import get_testdata_file
    from torchvision.models import resnet18

    base = tmp_path_factory.mktemp("chest")
    source = base / "cr"
    source.mkdir()
    (source / "chest.dcm").write_bytes(open(get_testdata_file("RG1_UNCR.dcm"), "rb").read())
    torch.manual_seed(0)
    net = resnet18(weights=None, num_classes=2)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(net.state_dict(), base / "resnet.pt")
    ws = ["--workspace", str(base / "ws")]
    model = ["--model", str(base / "resnet.pt"), *MODEL]
    assert main(["import", str(source), "--non-mg", "warn", *ws]) == 0
    assert main(["read", "--all", *model, *ws]) == 0
    assert main(["patches", "--tissue", *ws]) == 0
    assert main(["dissect", "--patch-set", "tissue", "--split", "all", *model, *ws]) == 0
    workspace = Workspace.open(base / "ws")
    db = open_catalog(workspace)
    row = dict(next(iter(db.query("SELECT * FROM images"))))
    run_id = db.execute("SELECT run_id FROM dissection_runs ORDER BY created_at DESC").fetchone()[0]
    db.conn.close()
    return {"ws": workspace, "flags": ws, "model": model, "row": row, "run_id": run_id}


def test_a_chest_radiograph_through_read_dissect_query_and_report(chest, tmp_path, capsys):
    from workspace.data.ingest import load_foreground

    row, ws = chest["row"], chest["flags"]
    assert row["modality"] == "CR" and row["flip_horizontal"] == 0 and row["flip_vertical"] == 0
    assert row["label"] is None and row["view"] == "PA"  # the header's own ViewPosition, kept as it is
    # the foreground is the body: most of a chest film, a solid region, not a sliver
    foreground = load_foreground(chest["ws"], row)
    assert 0.3 < foreground.mean() < 0.98 and foreground[row["rows"] // 2, row["cols"] // 2]

    # the site's class names must fit its network: one clear error, nothing read
    capsys.readouterr()
    assert main(["read", "--all", *chest["model"][:6], "--class-names", "a,b,c", *ws]) == 1
    assert "outputs 2 classes but 3 class names" in capsys.readouterr().err
    box = f"{row['cols'] // 2 - 200},{row['rows'] // 2 - 200},400,400"
    assert main(["query", row["image_id"], "--roi", box, "--json", *ws]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert len(answer["ranking"]) > 0 and answer["roi_area"] == 400 * 400
    assert main(["report", row["image_id"], "--roi", box, "--format", "text", *ws]) == 0
    text = capsys.readouterr().out
    assert "torchvision:resnet18" in text and "breast" not in text.lower()
    # the run's model came back with the class names it was dissected with: the score is named by them
    assert "P(pneumonia)" in text and "malignant" not in text
    out = tmp_path / "report.html"
    assert main(["report", row["image_id"], "--roi", box, "--out", str(out), *ws]) == 0
    assert "breast" not in out.read_text().lower() and "P(pneumonia)" in out.read_text()


@pytest.mark.labelstudio
def test_a_chest_radiograph_in_label_studio_speaks_its_models_classes(chest, labelstudio_server):
    from ml_backend import label_configs as lc
    from ml_backend.provision import provision
    from ml_backend.serve import start_backend
    from workspace.app.demo_check import ask_roi, ls_request, report_text, retrieve_prediction, task_of_image
    from workspace.dissect.session import Session

    ws, row, run_id = chest["ws"], chest["row"], chest["run_id"]
    backend = start_backend(ws, run_id=run_id, name="ml_backend_chest")
    try:
        with Session.open(ws, run=run_id) as session:
            projects = provision(ws, labelstudio_server, backend_url=backend.url, title_suffix=" (chest CR)",
                                 loaded=session.loaded, run=session.run).projects
            read = session.read(row["image_id"])
            roi = np.zeros((int(row["rows"]), int(row["cols"])), dtype=bool)
            roi[800:1100, 700:1000] = True
            expected = session.query(row["image_id"], roi)
        screening = projects[lc.SCREENING]
        config = ls_request(labelstudio_server, "GET", f"/api/projects/{screening.project_id}")["label_config"]
        assert lc.parse_config(config).labels["assessment"] == ["pneumonia", "no finding"]
        assert "mammogram" not in config and "malignant" not in config
        task = task_of_image(labelstudio_server, screening.project_id, row["image_id"])
        prediction = retrieve_prediction(labelstudio_server, screening.project_id, task["id"])
        choice = next(r for r in prediction["result"] if r["from_name"] == "assessment")
        assert choice["value"]["choices"] == ["pneumonia" if read.image_score >= read.operating_point
                                              else "no finding"]
        answer = ask_roi(labelstudio_server, screening.ml_backend_id, task["id"], roi, region_id="chest")
        assert sorted(int(u) for u in answer["aligned"]) == sorted(int(u) for u in expected.aligned)
        report = report_text(answer)
        assert "P(pneumonia)" in report and "breast" not in report.lower() and "malignant" not in report
        # the Patch review project is the same model's: its config and tasks name the score the same way
        review = projects[lc.PATCH_REVIEW]
        config = ls_request(labelstudio_server, "GET", f"/api/projects/{review.project_id}")["label_config"]
        assert lc.parse_config(config).labels["assessment"] == ["pneumonia", "no finding"]
    finally:
        backend.stop()


@pytest.mark.fiftyone
def test_a_chest_radiograph_in_fiftyone(chest, fo_db):
    from fiftyone_plugins.sync import sync_with_summary
    from workspace.dissect.dissect_run import load_run
    from workspace.dissect.session import Session

    run = load_run(chest["ws"], chest["run_id"])
    patches, neurons, summary = sync_with_summary(chest["ws"], run, prefix="chest")
    assert len(neurons) == run.n_units and set(patches.values("ground_truth.label")) == {"unlabelled"}
    import fiftyone as fo

    reads = fo.load_dataset(summary.reads_dataset)
    sample = reads.first()
    with Session.open(chest["ws"], run=chest["run_id"]) as session:
        read = session.read(chest["row"]["image_id"])
    assert (sample["image_id"], sample["modality"]) == (chest["row"]["image_id"], "CR")
    assert sample["prediction"].label == ("pneumonia" if read.image_score >= read.operating_point else "no finding")
    assert reads.info["mammo"]["model_card"]["score_label"] == "P(pneumonia)"
