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


def test_a_chest_radiograph_through_read_dissect_query_and_report(tmp_path, capsys):
    from pydicom.data import get_testdata_file
    from torchvision.models import resnet18

    from workspace.base.config import Workspace
    from workspace.data.ingest import load_foreground

    source = tmp_path / "cr"
    source.mkdir()
    (source / "chest.dcm").write_bytes(open(get_testdata_file("RG1_UNCR.dcm"), "rb").read())
    torch.manual_seed(0)
    net = resnet18(weights=None, num_classes=2)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(net.state_dict(), tmp_path / "resnet.pt")
    ws = ["--workspace", str(tmp_path / "ws")]
    model = ["--model", str(tmp_path / "resnet.pt"), "--arch", "torchvision:resnet18", "--layer", "layer3",
             "--class-names", "no finding,pneumonia", "--positive-class", "pneumonia"]

    assert main(["import", str(source), "--non-mg", "warn", *ws]) == 0
    db = open_catalog(Workspace.open(tmp_path / "ws"))
    row = next(iter(db.query("SELECT * FROM images")))
    assert row["modality"] == "CR" and row["flip_horizontal"] == 0 and row["flip_vertical"] == 0
    assert row["label"] is None and row["view"] == "PA"  # the header's own ViewPosition, kept as it is
    # the foreground is the body: most of a chest film, a solid region, not a sliver
    foreground = load_foreground(Workspace.open(tmp_path / "ws"), row)
    assert 0.3 < foreground.mean() < 0.98 and foreground[row["rows"] // 2, row["cols"] // 2]

    # the site's class names must fit its network: one clear error, nothing read
    assert main(["read", "--all", *model[:6], "--class-names", "a,b,c", *ws]) == 1
    assert "outputs 2 classes but 3 class names" in capsys.readouterr().err
    assert main(["read", "--all", *model, *ws]) == 0
    assert main(["patches", "--tissue", *ws]) == 0
    assert main(["dissect", "--patch-set", "tissue", "--split", "all", *model, *ws]) == 0
    capsys.readouterr()
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
