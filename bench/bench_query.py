"""ROI query latency (fast bit-packed path vs naive full-resolution upsampling) and PCA (ours vs sklearn).

    .venv/bin/python bench/bench_query.py [--units 512] [--size 512] [--queries 50] [--device cpu]

Maps are (units, 32, 32) ReLU'd smooth random fields (activation-like blobs); thresholds are each
unit's 0.99 quantile over 40 such patches (the realistic case: most units' masks are empty or
small on a given patch), and, as a worst case, 0.5 quantiles (every unit has a large mask).
For each ROI size, random positions; fast = ``query_patch`` on precomputed ``PatchMasks``;
naive = upsample every map to full size (``torch.nn.functional.interpolate``), threshold, count.
Exactness is checked on the way (fast IoU == the definition on dense masks).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workspace.dissect.dissection import pca_embedding, roi_iou, unit_masks  # noqa: E402
from workspace.dissect.query import PatchMasks, query_patch, roi_from_box  # noqa: E402


def activation_like(n: int, units: int, rng: np.random.Generator) -> np.ndarray:
    noise = torch.from_numpy(rng.standard_normal((n * units, 1, 32, 32)).astype(np.float32))
    kernel = torch.ones(1, 1, 5, 5) / 25
    smooth = torch.nn.functional.conv2d(noise, kernel, padding=2)
    return torch.relu(smooth).reshape(n, units, 32, 32).numpy()


def naive_iou(maps: torch.Tensor, thresholds: torch.Tensor, roi: torch.Tensor, size: int) -> np.ndarray:
    up = torch.nn.functional.interpolate(maps[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    masks = up > thresholds[:, None, None]
    inter = (masks & roi).sum(dim=(1, 2))
    union = (masks | roi).sum(dim=(1, 2))
    return (inter / union).cpu().numpy()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=512)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--naive-repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pca-patches", type=int, default=10_000)
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}, numpy {np.__version__}")
    rng = np.random.default_rng(0)
    size, units = args.size, args.units
    patches = activation_like(40, units, rng)
    maps = patches[0]
    cases = {"q=0.99 (realistic)": np.quantile(patches.transpose(1, 0, 2, 3).reshape(units, -1), 0.99, axis=1),
             "q=0.50 (worst case)": np.quantile(patches.transpose(1, 0, 2, 3).reshape(units, -1), 0.50, axis=1)}
    roi_sizes = [8, 64, 256, size]
    for label, thresholds in cases.items():
        thresholds = thresholds.astype(np.float32)
        pre = timed(lambda t=thresholds: PatchMasks.from_maps(maps, t, size, device=device), 3, device)
        pm = PatchMasks.from_maps(maps, thresholds, size, device=device)
        print(f"\n{label}: {units} units at {size}x{size}; {len(pm.stored_units)} non-empty masks; "
              f"precompute median {np.median(pre) * 1000:.0f} ms; masks {pm.nbytes / 2**20:.1f} MB")
        dense = unit_masks(maps, thresholds, size)
        tm = torch.from_numpy(maps).to(device)
        tt = torch.from_numpy(thresholds).to(device)
        print(f"{'ROI':>10}  {'fast median':>11}  {'fast p95':>9}  {'naive median':>12}  {'speed-up':>8}")
        for r in roi_sizes + ["ellipse"]:
            rois = []
            for _ in range(args.queries):
                if r == "ellipse":
                    yy, xx = np.mgrid[0:size, 0:size]
                    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
                    rois.append((yy - cy) ** 2 / (size / 5) ** 2 + (xx - cx) ** 2 / (size / 3) ** 2 <= 1)
                else:
                    x, y = rng.integers(0, size - r + 1, 2)
                    rois.append(roi_from_box((x, y, r, r), (size, size)))
            fast = []
            for roi in rois:
                _sync(device)
                t = time.perf_counter()
                query_patch(pm, roi)
                _sync(device)
                fast.append(time.perf_counter() - t)
            assert np.array_equal(query_patch(pm, rois[0]).iou, roi_iou(dense, rois[0])), "fast path != definition"
            troi = torch.from_numpy(rois[0]).to(device)
            naive = timed(lambda troi=troi, tm=tm, tt=tt: naive_iou(tm, tt, troi, size), args.naive_repeats, device)
            fm, fp, nm = np.median(fast), np.percentile(fast, 95), np.median(naive)
            label_r = f"{r}x{r}" if r != "ellipse" else "ellipse"
            print(f"{label_r:>10}  {fm * 1000:9.2f}ms  {fp * 1000:7.2f}ms  {nm * 1000:10.0f}ms  {nm / fm:7.0f}x")

    from sklearn.decomposition import PCA

    a = (rng.random((units, 8)) @ rng.random((8, args.pca_patches))
         + 0.1 * rng.random((units, args.pca_patches))).astype(np.float32)
    ours = timed(lambda: pca_embedding(a), 3, torch.device("cpu"))
    theirs = timed(lambda: PCA(2).fit_transform(a), 3, torch.device("cpu"))
    full = timed(lambda: PCA(2, svd_solver="full").fit_transform(a), 1, torch.device("cpu"))
    coords, variance, _ = pca_embedding(a)
    ref = PCA(2, svd_solver="full").fit(a.astype(np.float64))
    default = PCA(2).fit(a)
    print(f"\nPCA of {units} x {args.pca_patches}: ours median {np.median(ours) * 1000:.0f} ms, sklearn PCA(2) "
          f"default ({default._fit_svd_solver}) {np.median(theirs) * 1000:.0f} ms, speed-up "
          f"{np.median(theirs) / np.median(ours):.1f}x; sklearn full SVD {full[0] * 1000:.0f} ms "
          f"({full[0] / np.median(ours):.1f}x ours)")
    print(f"  explained variance vs sklearn full SVD (float64): max rel diff "
          f"{np.max(np.abs(variance - ref.explained_variance_) / ref.explained_variance_):.1e}; "
          f"coords max |diff| up to sign {np.max(np.abs(np.abs(coords) - np.abs(ref.transform(a.astype(np.float64))))):.1e}")
    print(f"  sklearn default vs full: explained variance max rel diff "
          f"{np.max(np.abs(default.explained_variance_ - ref.explained_variance_) / ref.explained_variance_):.1e}")


if __name__ == "__main__":
    main()
