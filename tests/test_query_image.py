"""ROIs on full mammograms: overlapping patches, ROIs across borders and larger than a patch, against a
brute-force reference of the documented aggregation (pixel ownership by nearest patch centre, summed
intersections over summed unions); then the real whole-mammogram read and `mammo query`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workspace.base.config import Workspace
from workspace.base.errors import QueryError
from workspace.dissect.dissection import unit_masks
from workspace.dissect.query import ImageMasks, query_image, roi_from_box

SHAPE = (70, 90)
SIZE = 24


def _boxes() -> np.ndarray:
    """Overlapping patches (stride 16), one flush with the right edge, and a hole with no patch."""
    boxes = [[x, y, SIZE, SIZE] for y in (0, 16, 32) for x in (0, 16, 32, 48) if not (x == 48 and y == 32)]
    boxes.append([90 - SIZE, 0, SIZE, SIZE])
    boxes.append([10, 46, SIZE, SIZE])
    return np.array(boxes)


def reference(boxes, maps, thresholds, roi):
    """Ownership per pixel by a plain loop, stitched masks, IoU over the covering patches' pixels."""
    owner = np.full(SHAPE, -1)
    for y in range(SHAPE[0]):
        for x in range(SHAPE[1]):
            best = None
            for p, (bx, by, w, h) in enumerate(boxes):
                if bx <= x < bx + w and by <= y < by + h:
                    d = (x + 0.5 - (bx + w / 2)) ** 2 + (y + 0.5 - (by + h / 2)) ** 2
                    if best is None or d < best:
                        best, owner[y, x] = d, p
    units = maps.shape[1]
    stitched = np.zeros((units, *SHAPE), bool)
    for p, (bx, by, w, h) in enumerate(boxes):
        masks = unit_masks(maps[p].astype(np.float32), thresholds, SIZE)
        ys, xs = np.nonzero(owner[by:by + h, bx:bx + w] == p)
        stitched[:, by + ys, bx + xs] = masks[:, ys, xs]
    covering = sorted(set(owner[roi & (owner >= 0)].tolist()))
    domain = np.isin(owner, covering)
    a = roi & domain
    m = stitched & domain
    inter = (m & a).sum(axis=(1, 2))
    union = (m | a).sum(axis=(1, 2))
    return inter / union, covering, m, int((roi & ~(owner >= 0)).sum())


@pytest.fixture(scope="module")
def image_case():
    rng = np.random.default_rng(4)
    boxes = _boxes()
    maps = (np.maximum(rng.standard_normal((len(boxes), 7, 4, 4)), 0) * 2).astype(np.float16)
    thresholds = np.quantile(maps.astype(np.float32).transpose(1, 0, 2, 3).reshape(7, -1), 0.8, axis=1).astype(np.float32)
    return boxes, maps, thresholds


@pytest.mark.parametrize("box", [(5, 5, 8, 8), (20, 10, 30, 25), (0, 0, 90, 70), (50, 30, 25, 25), (70, 2, 20, 10)])
def test_image_query_equals_the_reference_aggregation(image_case, box):
    boxes, maps, thresholds = image_case
    images = ImageMasks(boxes, maps, thresholds, SHAPE)
    roi = roi_from_box(box, SHAPE)
    result = images.query(roi)
    iou, covering, stitched, outside = reference(boxes, maps, thresholds, roi)
    np.testing.assert_array_equal(result.iou, iou)
    assert sorted(result.patches) == covering
    assert result.roi_pixels_outside == outside and result.roi_area == int(roi.sum()) - outside
    for unit in range(7):
        np.testing.assert_array_equal(result.mask_of(unit), stitched[unit])
    peak = maps[covering].astype(np.float32).reshape(len(covering), 7, -1).max(axis=(0, 2))
    assert result.most_activated == int(np.argmax(peak))
    assert result.map_of(result.most_activated).shape == SHAPE


def test_a_freeform_roi_across_borders(image_case):
    boxes, maps, thresholds = image_case
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    roi = (yy - 30) ** 2 / 400 + (xx - 40) ** 2 / 900 <= 1           # an ellipse over many patches
    result = ImageMasks(boxes, maps, thresholds, SHAPE).query(roi, iou_threshold=0.1)
    iou = reference(boxes, maps, thresholds, roi)[0]
    np.testing.assert_array_equal(result.iou, iou)
    assert list(result.aligned) == [u for u in result.ranking if iou[u] >= 0.1]


def test_image_roi_errors(image_case):
    boxes, maps, thresholds = image_case
    images = ImageMasks(boxes, maps, thresholds, SHAPE)
    hole = roi_from_box((60, 52, 20, 10), SHAPE)                        # where no patch lies
    with pytest.raises(QueryError, match="no pixel inside any patch"):
        images.query(hole)
    with pytest.raises(QueryError, match="empty"):
        images.query(np.zeros(SHAPE, bool))
    with pytest.raises(QueryError, match="image's shape"):
        images.query(np.ones((10, 10), bool))


# -- the real read ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dissected(small_cohort, tmp_path_factory):
    from models.checkpoint import base_meta, load_checkpoint, save_checkpoint
    from models.vgg import build_vgg
    from workspace.dissect.dissect_run import run_dissection

    root = tmp_path_factory.mktemp("query") / "ws"
    shutil.copytree(small_cohort.ws.root, root)
    ws = Workspace.open(root)
    torch.manual_seed(1)
    path = root / "slim.pt"
    save_checkpoint(path, build_vgg("vgg16_slim").eval(), base_meta("vgg16_slim", input_size=small_cohort.patch_size))
    loaded = load_checkpoint(path, "cpu")
    run = run_dissection(ws, loaded, split=None, top_k=4)
    return ws, path, loaded, run


def _an_image(ws: Workspace) -> dict:
    from workspace.base.catalog import open_catalog

    return dict(next(iter(open_catalog(ws).query("SELECT * FROM images ORDER BY image_id LIMIT 1"))))


def test_query_on_a_read_reuses_its_maps_without_a_second_forward_pass(dissected):
    from models.inference import read_mammogram
    from workspace.dissect.query import patch_maps

    ws, _path, loaded, run = dissected
    image = _an_image(ws)
    read = read_mammogram(ws, image["image_id"], loaded, keep_maps=True)
    calls = []
    handle = loaded.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        x, y = int(read.boxes[0][0]), int(read.boxes[0][1])
        roi = roi_from_box((x + 100, y + 20, 90, 150), (image["rows"], image["cols"]))   # across a border
        result = query_image(ws, image["image_id"], roi, loaded, run)
    finally:
        handle.remove()
    assert calls == []                                   # the cached read's maps were used
    assert len(result.patches) >= 2
    # a caller holding the read (reports) gets the masks already built, not a rebuild
    from workspace.dissect.query import image_masks_for

    assert image_masks_for(ws, image["image_id"], loaded, run, read=read) is result.image
    # the same numbers from the brute-force definition on the read's own maps
    expect_inter = np.zeros(run.n_units)
    expect_union = np.zeros(run.n_units)
    images = ImageMasks(read.boxes, read.maps, run.thresholds, read.shape)
    for p in result.patches:
        bx, by, s, _ = read.boxes[p]
        own = images.owned(p)
        a = roi[by:by + s, bx:bx + s] & own
        m = unit_masks(np.asarray(read.maps[p], np.float32), run.thresholds, s) & own
        expect_inter += (m & a).sum(axis=(1, 2))
        expect_union += (m | a).sum(axis=(1, 2))
    np.testing.assert_array_equal(result.iou, expect_inter / expect_union)
    # the read's float16 maps are the model's maps at that patch (to float16 rounding)
    bx, by, s, _ = read.boxes[result.patches[0]]
    from workspace.data.ingest import load_model_pixels

    pixels = load_model_pixels(ws, image)
    fresh = patch_maps(loaded, torch.from_numpy(np.ascontiguousarray(pixels[by:by + s, bx:bx + s])))
    np.testing.assert_allclose(np.asarray(read.maps[result.patches[0]], np.float32), fresh, rtol=2e-3, atol=2e-3)


def test_the_mask_cache_keeps_what_fits_its_memory_budget(dissected, monkeypatch):
    """The images' patch masks are kept up to ``MAMMO_MASK_CACHE_MB``, least recently asked dropped first,
    counted in bytes as they grow (lazily built patches included); the image asked last always stays."""
    from workspace.base.catalog import open_catalog
    from workspace.dissect import query

    ws, _path, loaded, run = dissected
    ids = [r["image_id"] for r in open_catalog(ws).query("SELECT image_id FROM images ORDER BY image_id")][:3]
    monkeypatch.setattr(query, "_IMAGE_CACHE", type(query._IMAGE_CACHE)())
    built = []
    for image_id in ids:
        masks = query.image_masks_for(ws, image_id, loaded, run)
        for p in range(len(masks.boxes)):
            masks.patch(p)
            masks.owned(p)
        built.append(masks)
    sizes = [m.nbytes for m in built]
    assert all(size > 0 for size in sizes)
    assert sizes[0] == sum(pm.nbytes for pm in built[0]._patch.values()) + sum(o.nbytes for o in built[0]._own.values())
    # room for the last two images only: asking again drops the first
    monkeypatch.setenv("MAMMO_MASK_CACHE_MB", str((sizes[1] + sizes[2] + 1) / 2**20))
    assert query.image_masks_for(ws, ids[2], loaded, run) is built[2]
    assert [query.still_cached(m) for m in built] == [False, True, True]
    # a budget smaller than one image keeps the image asked last
    monkeypatch.setenv("MAMMO_MASK_CACHE_MB", "0.001")
    assert query.image_masks_for(ws, ids[1], loaded, run) is built[1]
    assert [query.still_cached(m) for m in built] == [False, True, False]
    monkeypatch.setenv("MAMMO_MASK_CACHE_MB", "lots")
    with pytest.raises(QueryError, match="MAMMO_MASK_CACHE_MB"):
        query.image_masks_for(ws, ids[0], loaded, run)


def test_mammo_query_cli(dissected, tmp_path, capsys):
    from workspace.app.cli import main

    ws, path, loaded, run = dissected
    image = _an_image(ws)
    from models.inference import read_mammogram

    # an ROI that starts inside the first tissue patch of the read (the breast's place varies by image)
    bx, by = (int(v) + 8 for v in read_mammogram(ws, image["image_id"], loaded).boxes[0][:2])
    bx, by = min(bx, image["cols"] - 200), min(by, image["rows"] - 150)
    base = ["query", image["image_id"], "--workspace", str(ws.root), "--model", str(path)]
    assert main([*base, "--roi", f"{bx},{by},200,150"]) == 0
    out = capsys.readouterr().out
    assert run.run_id in out and "most activated unit" in out and "IoU" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 20

    mask = np.zeros((image["rows"], image["cols"]), np.uint8)
    mask[by:by + 150, bx:bx + 200] = 255
    Image.fromarray(mask).save(tmp_path / "roi.png")
    assert main([*base, "--roi-mask", str(tmp_path / "roi.png"), "--json", "--top", "5"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["roi_area"] + data["roi_pixels_outside"] == 150 * 200 and len(data["ranking"]) == 5 and data["run_id"] == run.run_id

    assert main([*base, "--roi", "0,0,0,10"]) == 1
    assert "empty" in capsys.readouterr().err
    assert main([*base, "--roi", "a,b"]) == 1
    assert "x,y,w,h" in capsys.readouterr().err
    Image.fromarray(mask[:10, :10]).save(tmp_path / "small.png")
    assert main([*base, "--roi-mask", str(tmp_path / "small.png")]) == 1
    assert "is 10x10" in capsys.readouterr().err
    other = Path(tmp_path / "other.pt")
    from models.checkpoint import base_meta, save_checkpoint
    from models.vgg import build_vgg

    save_checkpoint(other, build_vgg("vgg16_slim"), base_meta("vgg16_slim", input_size=128))
    assert main(["query", image["image_id"], "--workspace", str(ws.root), "--model", str(other),
                 "--roi", "1,1,5,5"]) == 1
    assert "run `mammo dissect` first" in capsys.readouterr().err
