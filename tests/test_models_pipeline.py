"""`mammo train` / `mammo evaluate` / `mammo read` on a real (small) synthetic cohort and patch set,
and the recorded test split being redrawn from the generator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.checkpoint import load_checkpoint
from models.data import PatchData, compare_to_recorded, rebuild_recorded_split
from workspace.app.cli import main
from workspace.base.catalog import open_catalog
from workspace.base.config import Workspace
from workspace.base.errors import MammoError
from workspace.data.synth import GENERATOR_VERSION

SHAPE = (832, 640)
PATCH = 128


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """6 small synthetic patients, splits fixed by patient index (2 each), a 128-pixel patch set."""
    from workspace.data import patches, synth

    ws = Workspace.open(tmp_path_factory.mktemp("models-pipeline") / "ws")
    synth.synthesize(ws, 6, seed=5, image_shape=SHAPE, birads0_fraction=0.8)
    db = open_catalog(ws)
    # by source path, not by pseudonym (keyed at random per workspace): the val patient must be the same each run
    patients = [r["patient_id"] for r in db.query("SELECT patient_id FROM images GROUP BY patient_id "
                                                  "ORDER BY MIN(source_path)")]
    for i, patient in enumerate(patients):
        split = ("train", "train", "val", "test")[i % 4] if i < 4 else "train"
        db.execute("UPDATE patients SET split = ? WHERE patient_id = ?", [split, patient])
        db.execute("UPDATE images SET split = ? WHERE patient_id = ?", [split, patient])
    summary = patches.build_patch_set(ws, "small", size=PATCH, step=64)
    return ws, summary


def _run(ws, *argv):
    return main([*argv, "--workspace", str(ws.root)])


def test_mammo_train_then_evaluate_on_a_patch_set(cohort, capsys):
    ws, summary = cohort
    data = PatchData.from_patch_set(ws, "small")
    assert len(data) == summary["n_patches"] and data.digest == summary["digest"] and data.size == PATCH
    counts = data.split_counts()
    assert counts["train"]["lesion"] > 0 and counts["test"]["patches"] > 0 and counts["val"]["patches"] > 0

    assert _run(ws, "train", "--patch-set", "small", "--epochs", "1", "--batch-size", "8", "--bootstrap", "50",
                "--device", "cpu") == 0
    assert _run(ws, "train", "--patch-set", "small", "--epochs", "2", "--batch-size", "8", "--bootstrap", "50",
                "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert "continued from epoch 1" in out and "test  AUC" in out
    model_path = ws.models_dir / "vgg16_slim-small" / "model.pt"
    meta = load_checkpoint(model_path, "cpu").meta
    assert meta["data_digest"] == summary["digest"] and meta["recipe"]["epochs"] == 2
    assert meta["data"]["synthetic"] == {"seeds": [5], "patients": [0, 6]}
    recorded = meta["data"]["recorded_test"]
    assert recorded["image_shape"] == list(SHAPE) and len(recorded["patches"]) == counts["test"]["patches"]

    assert _run(ws, "evaluate", "--model", "vgg16_slim-small", "--patch-set", "small", "--bootstrap", "50",
                "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert f"test  AUC {meta['metrics']['test']['auc']:.3f}" in out
    report = ws.reports_dir / f"evaluate-{load_checkpoint(model_path, 'cpu').digest}-small"
    assert json.loads((report / "metrics.json").read_text())["metrics"]["test"]["n_patches"] == \
        counts["test"]["patches"]
    assert (report / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_the_recorded_test_split_is_redrawn_pixel_for_pixel(cohort, tmp_path, capsys):
    ws, _ = cohort
    data = PatchData.from_patch_set(ws, "small")
    recorded = data.recorded_split("test")
    rebuilt = rebuild_recorded_split(recorded, birads0_fraction=0.8, folder=tmp_path)
    same = compare_to_recorded(rebuilt, np.arange(len(rebuilt)), recorded)
    # the same machine in the same process: bit for bit; elsewhere the fingerprint rule decides
    assert same["bit_identical"] and same["accepted"] and same["max_block_difference"] == 0
    np.testing.assert_array_equal(rebuilt.labels, data.labels[data.indices("test")])
    different = dict(recorded, patches=[[p, k, x + 1, y, lab] for p, k, x, y, lab in recorded["patches"]])
    moved = rebuild_recorded_split(different, birads0_fraction=0.8, folder=tmp_path)
    shifted = compare_to_recorded(moved, np.arange(len(moved)), recorded)
    assert not shifted["accepted"] and shifted["max_block_difference"] > 1  # one pixel over is a real change
    # a split recorded by another generator is refused with a reason, not redrawn with other pixels
    assert recorded["generator_version"] == GENERATOR_VERSION
    other = dict(recorded, generator_version=GENERATOR_VERSION + 1)
    with pytest.raises(MammoError, match=f"generator version {GENERATOR_VERSION + 1}"):
        rebuild_recorded_split(other, birads0_fraction=0.8, folder=tmp_path)


def test_mammo_read_uses_a_trained_workspace_model(cohort, capsys):
    ws, _ = cohort
    model_path = ws.models_dir / "vgg16_slim-small" / "model.pt"
    if not model_path.exists():
        assert _run(ws, "train", "--patch-set", "small", "--epochs", "1", "--batch-size", "8", "--bootstrap",
                    "20", "--device", "cpu", "--name", "vgg16_slim-small") == 0
    image_id = open_catalog(ws).execute("SELECT image_id FROM images ORDER BY image_id LIMIT 1").fetchone()[0]
    assert _run(ws, "read", image_id, "--model", "vgg16_slim-small", "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert image_id in out and "1 read, 0 failed" in out
