"""Whole-mammogram reads (models.inference) on real DICOM files registered in a real catalog.

The model is an untrained vgg16_slim saved with a 128-pixel input so the images stay small; the code
path is the one 512 x 512 models take.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import base_meta, load_checkpoint, save_checkpoint
from models.features import capture
from models.inference import read_mammogram, read_many
from models.vgg import build_vgg
from tests.fixtures.dicom import breast_phantom, write_dicom
from workspace.base.catalog import open_catalog
from workspace.base.errors import CatalogError, MammoError, ModelError
from workspace.data import ingest
from workspace.data.patches import grid_positions, tissue_grid

PATCH = 128


@pytest.fixture
def small_model(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "small.pt"
    save_checkpoint(path, build_vgg("vgg16_slim"),
                    base_meta("vgg16_slim", input_size=PATCH, operating_point={"threshold": 0.5, "rule": "fixed:0.5"}))
    return load_checkpoint(path, "cpu")


def _register(ws, name, shape, seed=0):
    path = write_dicom(ws.root / "incoming" / f"{name}.dcm", breast_phantom(shape, seed=seed))
    return ingest.register_dicom(ws, open_catalog(ws), path, dataset="test"), path


def catalog_row(ws, image_id):
    from workspace.base.catalog import get_image

    return get_image(open_catalog(ws), image_id)


def test_grid_covers_the_image_to_its_far_edge():
    assert grid_positions(700, 128, 128) == [0, 128, 256, 384, 512, 572]
    assert grid_positions(512, 128, 128) == [0, 128, 256, 384]
    assert grid_positions(300, 128, 64) == [0, 64, 128, 172]
    foreground = np.zeros((256, 384), bool)
    foreground[:, :100] = True  # tissue only in the first column of patches
    boxes = tissue_grid(foreground, 128, 128, 0.1)
    assert boxes.tolist() == [[0, 0, 128, 128], [0, 128, 128, 128]]


def test_read_scores_every_tissue_patch_keeps_maps_and_caches(ws, small_model):
    image_id, _ = _register(ws, "a", (700, 500), seed=1)
    read = read_mammogram(ws, image_id, small_model)
    assert not read.cached and read.shape == (700, 500) and read.size == PATCH == read.stride
    b = read.boxes
    assert len(b) > 4 and (b[:, 2] == PATCH).all() and (b[:, 0] + PATCH <= 500).all() and (b[:, 1] + PATCH <= 700).all()
    # the breast sits against the left edge (chest wall): no patch lies wholly in the empty right side
    assert b[:, 0].min() == 0 and b[:, 0].max() < 500 - PATCH
    pixels = ingest.load_model_pixels(ws, catalog_row(ws, image_id))
    crops = torch.from_numpy(np.stack([pixels[y:y + h, x:x + w] for x, y, w, h in b])[:, None].copy())
    np.testing.assert_allclose(read.scores, small_model.predict_proba(crops).numpy(), rtol=1e-4, atol=1e-6)
    with torch.no_grad(), capture(small_model.model, "features.29") as tap:
        small_model.model(small_model.preprocess(crops))
    assert read.maps.dtype == np.float16 and read.maps.shape == (len(b), 128, PATCH // 16, PATCH // 16)
    np.testing.assert_allclose(read.maps.astype(np.float32), tap.output.numpy(), rtol=2e-3, atol=2e-3)
    assert read.image_score == pytest.approx(float(read.scores.max()))
    assert set(read.suspicious) == set(np.flatnonzero(read.scores >= 0.5))

    row = open_catalog(ws).execute("SELECT score, n_patches, n_suspicious, operating_point, cache_path "
                                   "FROM image_reads WHERE image_id = ? AND model_digest = ?",
                                   [image_id, small_model.digest]).fetchone()
    assert row[1] == len(b) and row[2] == len(read.suspicious) and row[3] == 0.5
    assert (ws.root / row[4]).is_file() and row[0] == pytest.approx(read.image_score)

    again = read_mammogram(ws, image_id, small_model)
    assert again.cached and again.seconds < read.seconds
    np.testing.assert_array_equal(again.boxes, read.boxes)
    np.testing.assert_array_equal(again.scores, read.scores)
    np.testing.assert_array_equal(np.asarray(again.maps), read.maps)


def test_overlapping_stride_and_reads_without_maps(ws, small_model):
    image_id, _ = _register(ws, "b", (400, 300), seed=2)
    plain = read_mammogram(ws, image_id, small_model, keep_maps=False)
    assert plain.maps is None
    overlapping = read_mammogram(ws, image_id, small_model, stride=64)
    assert len(overlapping.boxes) > len(plain.boxes) and overlapping.maps is not None
    assert overlapping.cache_path != plain.cache_path
    # a read cached without maps is recomputed when maps are wanted
    with_maps = read_mammogram(ws, image_id, small_model)
    assert not with_maps.cached and with_maps.maps.shape[0] == len(plain.boxes)
    with pytest.raises(ModelError, match="stride"):
        read_mammogram(ws, image_id, small_model, stride=PATCH + 1)


def test_bad_input_gets_one_clear_error_and_batches_go_on(ws, small_model):
    good, _ = _register(ws, "good", (300, 260), seed=3)
    tiny, _ = _register(ws, "tiny", (96, 64), seed=4)
    broken, path = _register(ws, "broken", (300, 260), seed=5)
    path.write_bytes(path.read_bytes()[:400])  # cut the file after import
    with pytest.raises(CatalogError, match="no image 'I-nope'"):
        read_mammogram(ws, "I-nope", small_model)
    with pytest.raises(ModelError, match="smaller than the model's 128 x 128 patch"):
        read_mammogram(ws, tiny, small_model)
    with pytest.raises(MammoError, match="broken"):
        read_mammogram(ws, broken, small_model)
    summary = read_many(ws, [tiny, good, broken], small_model)
    assert [r.image_id for r in summary.reads] == [good]
    assert [e[0] for e in summary.errors] == [tiny, broken]


def test_mammo_read_command_reads_all_images(ws, small_model, capsys):
    from workspace.app.cli import main

    first, _ = _register(ws, "c1", (300, 260), seed=6)
    second, _ = _register(ws, "c2", (300, 260), seed=7)
    code = main(["read", "--all", "--model", str(small_model.path), "--workspace", str(ws.root), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and first in out and second in out and "2 read, 0 failed" in out
    main(["read", first, "--model", str(small_model.path), "--workspace", str(ws.root), "--device", "cpu"])
    assert "cached" in capsys.readouterr().out
    assert main(["read", "I-missing", "--model", str(small_model.path), "--workspace", str(ws.root)]) == 1
