"""A site's own CNN through every surface with no code change: torchvision ResNet-18 and DenseNet-121 with a
1-channel first convolution (state_dict files made here, random weights), each at a layer the user names:
read and dissect (CLI), Label Studio (predictions and an ROI answer through the real server), FiftyOne (the
run's datasets on the real database) and reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from workspace.app.cli import main
from workspace.base.catalog import open_catalog
from workspace.base.config import Workspace

pytestmark = pytest.mark.slow


def _state_dict(name: str, path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(name, weights=None, num_classes=2)
    if name == "resnet18":
        net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    else:
        net.features.conv0 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory, _quiet_and_contained):
    """A small workspace (one synthetic patient, 768 x 640), read and dissected over its unlabelled tissue
    grid with each foreign model, as a user types it."""
    from workspace.data.synth import synthesize

    base = tmp_path_factory.mktemp("foreign")
    ws = Workspace.open(base / "ws")
    synthesize(ws, 1, seed=3, image_shape=(768, 640), variants=False, birads0_fraction=1.0)
    models = {"resnet18": ("layer2", _state_dict("resnet18", base / "resnet18_1ch.pt")),
              "densenet121": ("features.transition2", _state_dict("densenet121", base / "densenet121_1ch.pt"))}
    flags = ["--workspace", str(ws.root)]
    assert main(["patches", "--tissue", *flags]) == 0
    runs = {}
    for name, (layer, path) in models.items():
        options = ["--model", str(path), "--arch", f"torchvision:{name}", "--layer", layer]
        assert main(["read", "--all", *options, *flags]) == 0
        assert main(["dissect", "--patch-set", "tissue", "--split", "all", *options, *flags]) == 0
        runs[name] = open_catalog(ws).execute("SELECT run_id FROM dissection_runs ORDER BY created_at DESC").fetchone()[0]
    image_id = open_catalog(ws).execute("SELECT image_id FROM images ORDER BY image_id").fetchone()[0]
    return {"ws": ws, "runs": runs, "layers": {k: v[0] for k, v in models.items()}, "image_id": image_id}


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_reports_of_a_foreign_model_at_its_layer(site, name, capsys):
    from workspace.dissect.session import Session

    capsys.readouterr()
    assert main(["report", site["image_id"], "--roi", "100,200,200,200", "--run", site["runs"][name],
                 "--format", "json", "--workspace", str(site["ws"].root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layer"] == site["layers"][name] and report["model_card"]["architecture"] == f"torchvision:{name}"
    with Session.open(site["ws"], run=site["runs"][name]) as session:
        assert report["n_units"] == session.run.n_units and session.loaded.load_options["arch"] == f"torchvision:{name}"


@pytest.mark.labelstudio
def test_label_studio_answers_with_a_foreign_model(site, labelstudio_server):
    from ml_backend import label_configs as lc
    from ml_backend.provision import provision
    from ml_backend.serve import start_backend
    from workspace.app.demo_check import ask_roi, report_text, retrieve_prediction, task_of_image
    from workspace.base.catalog import get_image
    from workspace.dissect.session import Session

    ws, run_id, image_id = site["ws"], site["runs"]["resnet18"], site["image_id"]
    backend = start_backend(ws, run_id=run_id, name="ml_backend_foreign")
    try:
        with Session.open(ws, run=run_id) as session:
            project = provision(ws, labelstudio_server, backend_url=backend.url, kinds=(lc.SCREENING,),
                                image_ids=[image_id], title_suffix=" (foreign model)", loaded=session.loaded,
                                run=session.run).projects[lc.SCREENING]
            task = task_of_image(labelstudio_server, project.project_id, image_id)
            prediction = retrieve_prediction(labelstudio_server, project.project_id, task["id"])
            read = session.read(image_id)
            assert len([r for r in prediction["result"] if r["type"] == "rectanglelabels"]) == len(read.suspicious)
            assert "torchvision:resnet18" in report_text(prediction)
            row = get_image(open_catalog(ws), image_id)
            roi = np.zeros((int(row["rows"]), int(row["cols"])), dtype=bool)
            roi[200:400, 100:300] = True
            answer = ask_roi(labelstudio_server, project.ml_backend_id, task["id"], roi, region_id="foreign")
            expected = session.query(image_id, roi)
        assert sorted(int(u) for u in answer["aligned"]) == sorted(int(u) for u in expected.aligned)
        assert [u for u, _ in answer["ranking"][:5]] == [int(u) for u in expected.ranking[:5]]
    finally:
        backend.stop()


@pytest.mark.fiftyone
def test_fiftyone_builds_the_datasets_of_a_foreign_model(site, fo_db):
    from fiftyone_plugins.sync import sync_with_summary
    from workspace.dissect.dissect_run import load_run

    run = load_run(site["ws"], site["runs"]["densenet121"])
    patches, neurons, summary = sync_with_summary(site["ws"], run, prefix="foreign")  # the model from the catalog
    assert len(neurons) == run.n_units and len(patches) == run.manifest["n_patches"]
    assert set(patches.values("ground_truth.label")) == {"unlabelled"}
    assert patches.info["mammo"]["model_card"]["architecture"] == "torchvision:densenet121"
    assert summary.reads_dataset == "foreign-reads" and summary.reads_written >= 1
