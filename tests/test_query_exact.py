"""The fast patch query equals the brute-force definition: a per-pixel bilinear (align_corners=False)
reference written out with loops, thresholded and counted; on the numpy (bit-packed) and torch paths,
near the threshold, with float16 maps; and bad ROIs are clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workspace.base.errors import QueryError
from workspace.dissect.dissection import ALIGN_CORNERS, MASK_RULE, roi_iou, unit_masks, upsample_maps
from workspace.dissect.query import PatchMasks, query_patch, roi_from_box

F = np.float32


def reference_upsample(maps: np.ndarray, size: int) -> np.ndarray:
    """Per-pixel bilinear interpolation, align_corners=False, written the plain way."""
    units, h, w = maps.shape

    def neighbours(n_in: int, j: int):
        src = F(n_in) / F(size) * (F(j) + F(0.5)) - F(0.5)
        src = max(src, F(0.0))
        i0 = min(int(np.floor(src)), n_in - 1)
        l1 = min(max(F(src - F(i0)), F(0.0)), F(1.0))
        return i0, (i0 + 1 if i0 < n_in - 1 else i0), F(1.0) - l1, l1

    out = np.zeros((units, size, size), dtype=np.float32)
    for y in range(size):
        a0, a1, h0, h1 = neighbours(h, y)
        for x in range(size):
            b0, b1, w0, w1 = neighbours(w, x)
            for u in range(units):
                m = maps[u]
                out[u, y, x] = h0 * (w0 * m[a0, b0] + w1 * m[a0, b1]) + h1 * (w0 * m[a1, b0] + w1 * m[a1, b1])
    return out


def reference_iou(maps: np.ndarray, thresholds: np.ndarray, roi: np.ndarray) -> np.ndarray:
    masks = reference_upsample(maps, roi.shape[0]) > thresholds[:, None, None]
    inter = np.array([np.count_nonzero(m & roi) for m in masks])
    union = np.array([np.count_nonzero(m | roi) for m in masks])
    return inter / union


def test_upsampling_equals_the_per_pixel_reference_and_torch_within_an_ulp():
    rng = np.random.default_rng(0)
    for h, w, size in ((4, 4, 16), (3, 5, 13), (8, 8, 24), (2, 7, 9)):
        maps = rng.standard_normal((3, h, w)).astype(np.float32)
        fast = upsample_maps(maps, size)
        np.testing.assert_array_equal(fast, reference_upsample(maps, size))
        np.testing.assert_array_equal(upsample_maps(torch.from_numpy(maps), size).numpy(), fast)
        torch_ref = torch.nn.functional.interpolate(torch.from_numpy(maps)[None], size=(size, size),
                                                    mode="bilinear", align_corners=ALIGN_CORNERS)[0].numpy()
        np.testing.assert_allclose(fast, torch_ref, rtol=0, atol=4e-7 * np.abs(maps).max())


def _cases(rng: np.random.Generator):
    """(maps, thresholds): ReLU-like blobs, ties, and thresholds placed exactly on upsampled values."""
    yy, xx = np.mgrid[0:6, 0:6]
    blobs = np.stack([np.exp(-((yy - rng.integers(0, 6)) ** 2 + (xx - rng.integers(0, 6)) ** 2) / 3.0)
                      * rng.uniform(0.2, 2.0) for _ in range(10)]).astype(np.float32)
    yield blobs, np.full(10, 0.7, np.float32)
    noise = np.maximum(rng.standard_normal((12, 6, 6)), 0).astype(np.float32)
    yield noise, np.quantile(noise.reshape(12, -1), 0.9, axis=1).astype(np.float32)
    # thresholds equal to an interpolated value (strictly above: that pixel is OUT) and to the map's own max
    up = reference_upsample(noise, 24)
    exact = np.array([up[u].reshape(-1)[rng.integers(0, 24 * 24)] for u in range(12)], np.float32)
    exact[0] = noise[0].max()
    yield noise, exact
    yield np.zeros((4, 6, 6), np.float32), np.zeros(4, np.float32)       # all ties at the threshold
    signed = rng.standard_normal((6, 6, 6)).astype(np.float32) * 100
    yield signed, np.array([-50, 0, 50, 150, -500, 1e6], np.float32)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_fast_query_equals_the_brute_force_reference(backend):
    rng = np.random.default_rng(1)
    size = 24
    rois = [roi_from_box(b, (size, size)) for b in ((0, 0, 24, 24), (3, 4, 5, 9), (20, 0, 4, 1), (7, 7, 1, 1))]
    free = rng.random((size, size)) > 0.6
    rois.append(free)
    for maps, thresholds in _cases(rng):
        pm = PatchMasks.from_maps(maps, thresholds, size, backend=backend)
        dense = unit_masks(maps, thresholds, size)
        np.testing.assert_array_equal(dense, reference_upsample(maps, size) > thresholds[:, None, None])
        np.testing.assert_array_equal(pm.areas, dense.sum(axis=(1, 2)))
        for u in range(maps.shape[0]):
            np.testing.assert_array_equal(pm.mask(u), dense[u])
        for roi in rois:
            result = query_patch(pm, roi)
            expect = reference_iou(maps, thresholds, roi)
            np.testing.assert_array_equal(result.iou, expect)
            np.testing.assert_array_equal(result.iou, roi_iou(dense, roi))
            assert list(result.ranking) == sorted(range(len(expect)), key=lambda u: (-expect[u], u))
            assert list(result.aligned) == [u for u in result.ranking if expect[u] >= 0.2]
            assert result.most_activated == int(np.argmax(maps.reshape(len(maps), -1).max(axis=1)))
            if expect.max() > 0:
                assert result.most_aligned == result.ranking[0] and expect[result.most_aligned] == expect.max()
            else:
                assert result.most_aligned is None


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_value_equal_to_the_threshold_is_outside_the_mask(backend):
    """The mask rule is strictly above (MASK_RULE ">"): on every path a pixel whose upsampled value
    equals T[i] is out, a map equal to T everywhere has an empty mask, and a silent (all-zero) unit
    under T = 0 has an empty mask, not the whole patch."""
    size = 16
    maps = np.zeros((4, 4, 4), np.float32)
    maps[0] = 2.0                                   # constant at T: every pixel equals T
    maps[1, 1:3, 1:3] = 3.0                         # plateau: its interior pixels equal 3.0 exactly
    maps[3, 2, 2] = 0.5                             # fires a little, T = 0: only where it fires
    thresholds = np.array([2.0, 3.0, 0.0, 0.0], np.float32)
    up = upsample_maps(maps, size)
    assert (up[0] == 2.0).all() and (up[1] == 3.0).any() and (up[1] <= 3.0).all()
    dense = unit_masks(maps, thresholds, size)
    pm = PatchMasks.from_maps(maps, thresholds, size, backend=backend)
    assert MASK_RULE == ">"
    for u in (0, 1, 2):
        assert not dense[u].any() and pm.areas[u] == 0 and not pm.mask(u).any(), u
    np.testing.assert_array_equal(dense[3], up[3] > 0)
    assert 0 < pm.areas[3] < size * size and pm.areas[3] == dense[3].sum()
    np.testing.assert_array_equal(pm.mask(3), dense[3])
    # one ulp above T is in: the rule is not "> T + something"
    above = np.nextafter(np.float32(3.0), np.float32(4.0))
    maps[1, 1, 1] = above
    pm = PatchMasks.from_maps(maps, thresholds, size, backend=backend)
    assert pm.areas[1] > 0 and pm.mask(1).sum() == unit_masks(maps, thresholds, size)[1].sum()
    # a whole-patch ROI is aligned with no unit that merely sits at its threshold
    result = query_patch(pm, np.ones((size, size), bool))
    assert 0 not in result.aligned and 2 not in result.aligned and result.iou[0] == 0.0


def test_wide_patches_pack_across_words_and_float16_maps_are_widened_exactly():
    rng = np.random.default_rng(2)
    size = 130                                       # three 64-bit words per row, the last one partial
    maps16 = (np.maximum(rng.standard_normal((5, 5, 5)), 0) * 3).astype(np.float16)
    thresholds = np.array([1.0, 2.0, 0.5, 9.0, 0.0], np.float32)
    pm = PatchMasks.from_maps(maps16, thresholds, size)
    maps32 = maps16.astype(np.float32)
    for box in ((60, 10, 70, 100), (0, 0, 130, 130), (64, 64, 1, 66), (127, 3, 3, 3)):
        roi = roi_from_box(box, (size, size))
        np.testing.assert_array_equal(query_patch(pm, roi).iou, roi_iou(unit_masks(maps32, thresholds, size), roi))
    assert pm.areas[3] == 0 and 3 not in pm.stored_units          # never reaches its threshold: skipped
    np.testing.assert_array_equal(pm.upsampled(1), upsample_maps(maps32[1:2], size)[0])


def test_a_query_result_gives_maps_and_masks_of_its_units():
    maps = np.zeros((3, 4, 4), np.float32)
    maps[1, 1, 1] = 5.0
    maps[2, 3, 3] = 9.0
    pm = PatchMasks.from_maps(maps, np.array([1.0, 1.0, 1.0], np.float32), 16)
    result = query_patch(pm, roi_from_box((2, 2, 6, 6), (16, 16)))
    assert result.most_aligned == 1 and result.most_activated == 2
    assert result.mask_of(1).any() and not result.mask_of(0).any()
    np.testing.assert_array_equal(result.map_of(2), upsample_maps(maps[2:3], 16)[0])
    assert result.map_of(2)[15, 15] == 9.0           # the corner cell's value reaches the corner pixels
    assert result.to_dict()["ranking"][0][0] == 1


def test_bad_rois_and_units_are_clear_errors():
    pm = PatchMasks.from_maps(np.ones((2, 4, 4), np.float32), np.ones(2, np.float32), 16)
    with pytest.raises(QueryError, match="empty"):
        query_patch(pm, np.zeros((16, 16), bool))
    with pytest.raises(QueryError, match="16 x 16"):
        query_patch(pm, np.ones((8, 8), bool))
    with pytest.raises(QueryError, match="no pixel inside"):
        roi_from_box((20, 20, 5, 5), (16, 16))
    with pytest.raises(QueryError, match="empty"):
        roi_from_box((2, 2, 0, 5), (16, 16))
    clipped = roi_from_box((-4, 10, 10, 100), (16, 16))
    assert clipped.sum() == 6 * 6                   # the part inside the patch
    with pytest.raises(QueryError, match="no unit 7"):
        pm.mask(7)
    with pytest.raises(QueryError, match="thresholds"):
        PatchMasks.from_maps(np.ones((2, 4, 4), np.float32), np.ones(3, np.float32), 16)
