"""The dissection definitions: the one place every caller (CLI, backend, plugin, reports) takes them from.

For one layer with units i = 0..U-1 and a patch set j = 0..n-1 (design, Data flow items 4 and 5):

- ``a[i, j]`` = max over spatial positions of unit i's activation on patch j (:func:`max_activations`).
- ``T[i]`` = ``numpy.quantile(v_i, q)`` (method "linear", the numpy default; float32 values, so numpy's
  own float32 rank arithmetic) where ``v_i`` holds unit i's activation at every position of every
  patch at the layer's native resolution; ``q`` = :data:`DEFAULT_QUANTILE`.
- Unit i's mask on a patch: its map upsampled bilinearly to the patch size (:func:`upsample_maps`)
  and thresholded: ``M_i = up(S_i) > T[i]`` (:func:`unit_masks`). Strictly above: a unit whose
  quantile is 0 (a ReLU unit silent on more than 1 - q of all positions) then has the mask of where it
  fires, not the whole patch (with ``>=`` such a unit would look aligned with any large ROI).
- For an ROI ``A`` (pixels of the patch): ``IoU_i = |A & M_i| / |A | M_i|`` (:func:`roi_iou`); units
  with ``IoU_i >= DEFAULT_IOU_THRESHOLD`` are "aligned".
- The neuron embedding: PCA of ``a`` with units as rows, 2 components (:func:`pca_embedding`).

Upsampling uses ``align_corners=False`` (:data:`ALIGN_CORNERS`): it treats each activation as the
value at the centre of its receptive-field cell (the cell covering ``size / h`` pixels), which is what
a strided conv stack computes, and it is PyTorch's and scikit-image's default; ``align_corners=True``
would stretch the corner cells' centres onto the patch corners and shift every mask by up to half a
cell (8 pixels at 32 -> 512). The interpolation is written out here (PyTorch's formulas: source
``x = (j + 0.5) * in / out - 0.5`` clamped at 0, neighbours ``floor(x)`` and the next one clamped to
the edge) with a fixed float32 operation order ``h0 * (w0 * v00 + w1 * v01) + h1 * (w0 * v10 + w1 * v11)``,
so the fast mask path and the brute-force reference in the tests produce bit-identical values.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

DEFAULT_QUANTILE = 0.99
DEFAULT_TOP_K = 16
DEFAULT_IOU_THRESHOLD = 0.2
ALIGN_CORNERS = False
MASK_RULE = ">"   # M_i = upsampled map > T[i]


def bilinear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: (i0, i1) source neighbours (int64) and weights (w0, w1) float32,
    bilinear with align_corners=False (PyTorch's rule, computed in float32 as PyTorch does)."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0)).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    w0 = (np.float32(1) - w1).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, w0, w1


def _upsample_torch(maps: torch.Tensor, size: int) -> torch.Tensor:
    units, h, w = maps.shape
    dev = maps.device
    r0, r1, h0, h1 = (torch.from_numpy(t).to(dev) for t in bilinear_weights(h, size))
    c0, c1, w0, w1 = (torch.from_numpy(t).to(dev) for t in bilinear_weights(w, size))
    # along columns first on the native rows (cheap), then along rows: the per-pixel op order is
    # h0 * (w0 * v00 + w1 * v01) + h1 * (w0 * v10 + w1 * v11), each op rounded to float32.
    across = w0 * maps[:, :, c0] + w1 * maps[:, :, c1]                        # (units, h, size)
    return h0[:, None] * across[:, r0, :] + h1[:, None] * across[:, r1, :]     # (units, size, size)


def upsample_maps(maps: np.ndarray | torch.Tensor, size: int) -> np.ndarray | torch.Tensor:
    """Bilinear (align_corners=False) upsampling of (units, h, w) maps to (units, size, size) float32.

    Returns the same kind as given (numpy array or torch tensor on the same device). Memory is
    ``units * size * size * 4`` bytes; callers with many units work in chunks (see query.PatchMasks).
    """
    if isinstance(maps, torch.Tensor):
        return _upsample_torch(maps.float(), size)
    return _upsample_torch(torch.from_numpy(np.asarray(maps, dtype=np.float32)), size).numpy()


def unit_masks(maps: np.ndarray | torch.Tensor, thresholds: np.ndarray | torch.Tensor,
               size: int) -> np.ndarray | torch.Tensor:
    """(units, size, size) bool: ``upsample_maps(maps, size)[i] > thresholds[i]``."""
    up = upsample_maps(maps, size)
    if isinstance(up, torch.Tensor):
        t = torch.as_tensor(thresholds, dtype=torch.float32, device=up.device)
        return up > t[:, None, None]
    return up > np.asarray(thresholds, dtype=np.float32)[:, None, None]


def roi_iou(masks: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """IoU of every unit's mask with the ROI: (units,) float64, ``|A & M_i| / |A | M_i|``.

    masks: (units, H, W) bool; roi: (H, W) bool, not empty (the union is then never empty).
    This is the definition, on dense masks; query.PatchMasks computes the same numbers fast.
    """
    masks = np.asarray(masks, dtype=bool)
    roi = np.asarray(roi, dtype=bool)
    inter = np.logical_and(masks, roi).sum(axis=(1, 2))
    union = np.logical_or(masks, roi).sum(axis=(1, 2))
    return inter / np.maximum(union, 1)


def max_activations(maps: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """(..., units, h, w) -> (..., units): the max over positions (``a[i, j]`` for one patch)."""
    if isinstance(maps, torch.Tensor):
        return maps.flatten(-2).amax(dim=-1)
    return np.asarray(maps).reshape(*np.shape(maps)[:-2], -1).max(axis=-1)


def relative_activation(activations: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Activations divided by their unit's threshold ``T`` (units comparable: 1.0 = at the threshold); NaN for a
    unit with ``T <= 0`` (never active at the threshold quantile: it has no scale). ``activations`` has the
    units on its first axis, ``thresholds`` is (units,)."""
    acts = np.asarray(activations, dtype=np.float64)
    thr = np.asarray(thresholds, dtype=np.float64).reshape((-1,) + (1,) * (acts.ndim - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(thr > 0, acts / np.where(thr > 0, thr, 1.0), np.nan)


def pca_embedding(a: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of ``a`` (units x patches, units as samples): (coords (units, n_components),
    explained_variance (n_components,), explained_variance_ratio (n_components,)).

    Same quantities as scikit-learn's ``PCA(n_components).fit_transform(a)``, ``explained_variance_``
    and ``explained_variance_ratio_``, computed from the smaller Gram matrix of the centred data in
    float64. Sign convention (deterministic): in each component, the unit with the largest absolute
    coordinate has a positive coordinate (the first such unit on ties). Components beyond the rank
    of the data are zero.
    """
    x = np.asarray(a, dtype=np.float64)
    units, patches = x.shape
    coords = np.zeros((units, n_components))
    variance = np.zeros(n_components)
    ratio = np.zeros(n_components)
    if units < 2 or patches < 1:
        return coords, variance, ratio
    x = x - x.mean(axis=0, keepdims=True)
    total = float(np.einsum("ij,ij->", x, x))
    gram = x @ x.T if units <= patches else x.T @ x
    top = min(n_components, gram.shape[0])
    # only the top eigenpairs are needed: LAPACK's subset driver is ~10x faster than a full eigh
    eigval, eigvec = scipy.linalg.eigh(gram, subset_by_index=[gram.shape[0] - top, gram.shape[0] - 1])
    eigval, eigvec = np.clip(eigval[::-1], 0.0, None), eigvec[:, ::-1]
    scores = eigvec * np.sqrt(eigval) if units <= patches else x @ eigvec
    k = scores.shape[1]
    # numerically null components (beyond the data's rank) are zeroed, not left as noise
    keep = eigval > max(total, 1e-300) * 1e-12
    scores[:, ~keep] = 0.0
    eigval = np.where(keep, eigval, 0.0)
    for c in range(k):
        col = scores[:, c]
        pivot = int(np.argmax(np.abs(col)))
        if col[pivot] < 0:
            scores[:, c] = -col
    coords[:, :k] = scores
    variance[:k] = eigval / (units - 1)
    ratio[:k] = eigval / total if total > 0 else 0.0
    return coords, variance, ratio


__all__ = ["DEFAULT_QUANTILE", "DEFAULT_TOP_K", "DEFAULT_IOU_THRESHOLD", "ALIGN_CORNERS", "MASK_RULE",
           "bilinear_weights", "upsample_maps", "unit_masks", "roi_iou", "max_activations", "relative_activation",
           "pca_embedding"]
