"""One Session rule for model and run, through the CLI and the backend's loader: a torchvision model
dissected at a layer the user names, our VGG at a non-default layer, and one ROI-mask rule.

Each of these disagreed before the Session object: `mammo report`, the backend and the FiftyOne sync
reloaded a run's model without its architecture (a foreign state_dict failed there), the read cache held
one layer's maps per model (a run of another layer found the wrong maps), and `mammo query` read an ROI
mask as ``> 127`` where `mammo report` read ``> 0``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models.checkpoint import base_meta, save_checkpoint
from models.vgg import build_vgg
from workspace.app.cli import main
from workspace.base.catalog import open_catalog
from workspace.base.config import Workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, _quiet_and_contained):
    """One synthetic patient at a reduced size, its patch set, a 1-channel ResNet-18 state_dict and our slim
    VGG (both untrained: the rule, not the model, is under test)."""
    from workspace.data.patches import build_patch_set
    from workspace.data.synth import synthesize

    base = tmp_path_factory.mktemp("session")
    ws = Workspace.open(base / "ws")
    synthesize(ws, 1, seed=3, image_shape=(1024, 768), variants=False, birads0_fraction=1.0)
    build_patch_set(ws, "default")
    torch.manual_seed(0)
    resnet = __import__("torchvision").models.resnet18(weights=None, num_classes=2)
    resnet.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(resnet.state_dict(), base / "resnet18_1ch.pt")
    save_checkpoint(base / "vgg.pt", build_vgg("vgg16_slim"), base_meta("vgg16_slim"))
    image_id = open_catalog(ws).execute("SELECT image_id FROM images ORDER BY image_id").fetchone()[0]
    return {"ws": ws, "resnet": base / "resnet18_1ch.pt", "vgg": base / "vgg.pt", "image_id": image_id}


def _cli(world, *argv) -> int:
    return main([*argv, "--workspace", str(world["ws"].root)])


def _newest_run(ws) -> str:
    return open_catalog(ws).execute("SELECT run_id FROM dissection_runs ORDER BY created_at DESC").fetchone()[0]


def test_a_torchvision_model_at_a_named_layer_through_dissect_report_query_and_the_backend(world, capsys):
    from ml_backend.app import load_model_and_run
    from workspace.dissect.session import Session

    ws, image_id = world["ws"], world["image_id"]
    assert _cli(world, "dissect", "--model", str(world["resnet"]), "--arch", "torchvision:resnet18",
                "--layer", "layer3", "--split", "all") == 0
    run_id = _newest_run(ws)
    capsys.readouterr()
    # `mammo report` names no model: the session opens the newest run and its model as it was dissected
    assert _cli(world, "report", image_id, "--roi", "100,300,200,200", "--format", "json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run_id"] == run_id and report["layer"] == "layer3" and report["n_units"] == 256
    assert report["model_card"]["architecture"] == "torchvision:resnet18"
    # the backend's loader and `mammo query` reach the same run and model
    loaded, run = load_model_and_run(ws)
    assert run.run_id == run_id and loaded.architecture == "torchvision:resnet18"
    assert loaded.dissected_layer == "layer3" and loaded.load_options == {"arch": "torchvision:resnet18"}
    assert _cli(world, "query", image_id, "--roi", "100,300,200,200", "--run", run_id, "--json") == 0
    answer = json.loads(capsys.readouterr().out)
    with Session.open(ws, run=run_id) as session:
        expected = session.query(image_id, [100, 300, 200, 200])
    assert answer["run_id"] == run_id and answer["aligned"] == [int(u) for u in expected.aligned]


def test_our_vgg_at_a_non_default_layer_keeps_its_own_read(world, capsys):
    from workspace.dissect.session import Session

    ws, image_id = world["ws"], world["image_id"]
    assert _cli(world, "read", image_id, "--model", str(world["vgg"])) == 0  # features.29, the default
    assert _cli(world, "dissect", "--model", str(world["vgg"]), "--layer", "features.22", "--split", "all") == 0
    run_id = _newest_run(ws)
    with Session.open(ws, run=run_id) as session:
        assert session.loaded.dissected_layer == "features.22"
        read = session.read(image_id)
        assert read.layer == "features.22" and read.maps.shape[1] == 64  # block 4 of the slim VGG: 64 units
        report = session.report(image_id, [100, 300, 200, 200])
    assert report.layer == "features.22" and report.n_units == 64
    # the default layer's read is still there, beside it
    with Session.open(ws, model=str(world["vgg"])) as default:
        assert default.read(image_id).layer == "features.29"


def test_an_roi_mask_reads_the_same_in_query_and_report(world, tmp_path, capsys):
    ws, image_id = world["ws"], world["image_id"]
    row = open_catalog(ws).execute("SELECT rows, cols FROM images WHERE image_id = ?", [image_id]).fetchone()
    mask = np.zeros(row, dtype=np.uint8)
    mask[300:500, 100:300] = 1  # a 0/1 mask, as numpy writes one
    Image.fromarray(mask).save(tmp_path / "roi.png")
    run_id = _newest_run(ws)
    capsys.readouterr()
    assert _cli(world, "query", image_id, "--roi-mask", str(tmp_path / "roi.png"), "--run", run_id, "--json") == 0
    query = json.loads(capsys.readouterr().out)
    assert _cli(world, "report", image_id, "--roi-mask", str(tmp_path / "roi.png"), "--run", run_id,
                "--format", "json") == 0
    report = json.loads(capsys.readouterr().out)
    assert query["roi_area"] == 200 * 200 and report["roi"]["area"] == 200 * 200
    assert sorted(query["aligned"]) == sorted(report["aligned"])
