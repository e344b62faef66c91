"""Whether an image looks like the images a model was trained on (the per-image domain check).

An image's *domain features* are computed once, at import, from what the model sees (raw intensities in
[0, 1], normalised orientation) and the breast foreground, and kept in the catalog (``images.domain_features``;
:func:`features_of` fills them in for images imported before): the film or detector background level (the
image's 1st percentile), the 5th, 50th and 95th percentiles of the foreground (the breast), the pixel spacing and the stored
bit depth.

A model's *training domain* (``meta["training_domain"]``, :func:`domain_profile` of its training images,
written by ``mammo train``) keeps, per feature, the range over the training images, the spacings, bit depths
and data sets seen. :func:`check_domain` calls an image outside the domain when a feature lies outside that
range widened by a margin (half the range, at least :data:`MIN_MARGIN`), when its pixel spacing or bit depth
was never seen in training, or when it comes from a data set the model never saw; each reason is one
sentence for the reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workspace.base.modality import modality_of

DOMAIN_FEATURES = ("background", "foreground_p05", "foreground_p50", "foreground_p95")
PERCENTILE_NAMES = {"foreground_p05": "5th percentile", "foreground_p50": "median", "foreground_p95": "95th percentile"}
MIN_MARGIN = {"background": 0.01, "foreground_p05": 0.03, "foreground_p50": 0.03, "foreground_p95": 0.03}
SPACING_MARGIN_MM = 0.01
_SAMPLE_STEP = 4  # features are read off every 4th pixel of each axis: ~1/16 of the image is plenty


def mean_spacing(row_mm: float | None, col_mm: float | None) -> float | None:
    """One pixel spacing (mm) for the domain check: the mean of row and column spacing, None when absent."""
    return float(row_mm + col_mm) / 2 if row_mm and col_mm else None


def image_features(model_pixels: np.ndarray, foreground: np.ndarray, *, pixel_spacing: float | None = None,
                   bits_stored: int | None = None) -> dict[str, Any]:
    """The domain features of one image: ``model_pixels`` float (rows, cols) in [0, 1] and its
    ``foreground`` (the breast, or the body) (bool, same shape or a block-downsampled one)."""
    step = _SAMPLE_STEP
    pixels = np.asarray(model_pixels)[::step, ::step]
    fg = np.asarray(foreground, dtype=bool)
    if fg.shape != np.asarray(model_pixels).shape:
        from workspace.data.dicom_io import upsample_mask

        fg = upsample_mask(fg, *np.asarray(model_pixels).shape)
    fg = fg[::step, ::step]
    region = pixels[fg]
    features: dict[str, Any] = {"pixel_spacing_mm": pixel_spacing, "bits_stored": bits_stored}
    # the darkest 1 % of the image: the film base or the detector's empty field, whatever the mask found
    features["background"] = float(np.quantile(pixels, 0.01))
    if region.size:
        p05, p50, p95 = np.quantile(region, [0.05, 0.5, 0.95])
        features.update(foreground_p05=float(p05), foreground_p50=float(p50), foreground_p95=float(p95))
    else:
        features.update(foreground_p05=None, foreground_p50=None, foreground_p95=None)
    return features


def domain_profile(features: list[dict[str, Any]], datasets: list[str]) -> dict[str, Any]:
    """The training-domain profile of the training images' :func:`image_features` and data sets (stored as
    ``meta["training_domain"]``)."""
    if not features:
        raise ValueError("a domain profile needs at least one image")
    ranges = {}
    for name in DOMAIN_FEATURES:
        values = [f[name] for f in features if f.get(name) is not None]
        if values:
            ranges[name] = {"low": float(min(values)), "high": float(max(values))}
    spacings = [f["pixel_spacing_mm"] for f in features if f.get("pixel_spacing_mm")]
    return {"images": len(features), "features": ranges,
            "pixel_spacing_mm": {"low": min(spacings), "high": max(spacings)} if spacings else None,
            "spacing_missing": any(not f.get("pixel_spacing_mm") for f in features),
            "bits_stored": sorted({int(f["bits_stored"]) for f in features if f.get("bits_stored")}),
            "datasets": sorted(set(datasets))}


@dataclass
class DomainVerdict:
    """Whether an image is like the training images; ``reasons`` say why not, one sentence each."""

    checked: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def outside(self) -> bool:
        return bool(self.reasons)

    def warning(self) -> str | None:
        """The reader's warning, or None when the image is inside the domain (or it cannot be checked)."""
        if not self.reasons:
            return None
        return ("Outside the model's training domain: " + "; ".join(self.reasons)
                + ". Treat the scores as unvalidated for this image.")

    def to_dict(self) -> dict:
        return {"checked": self.checked, "outside": self.outside, "reasons": list(self.reasons),
                "warning": self.warning()}

    @classmethod
    def from_dict(cls, d: dict | None) -> DomainVerdict:
        d = d or {}
        return cls(checked=bool(d.get("checked")), reasons=list(d.get("reasons") or []))


def check_domain(profile: dict | None, features: dict[str, Any], dataset: str | None = None,
                 modality: str | None = None) -> DomainVerdict:
    """Compare one image's :func:`image_features` (and the data set it comes from, and its DICOM modality for
    the wording) with a training-domain profile; unchecked when the model has no profile."""
    region = modality_of(modality)
    if not profile:
        return DomainVerdict(checked=False)
    reasons = []
    trained_sets = profile.get("datasets") or []
    if trained_sets and dataset and dataset not in trained_sets:
        reasons.append(f"it comes from data set '{dataset}', the model saw only "
                       + ", ".join(f"'{d}'" for d in trained_sets))
    for name, bounds in (profile.get("features") or {}).items():
        value = features.get(name)
        if value is None:
            continue
        low, high = float(bounds["low"]), float(bounds["high"])
        margin = max(0.5 * (high - low), MIN_MARGIN.get(name, 0.0))
        if not low - margin <= value <= high + margin:
            label = region.region_intensity(PERCENTILE_NAMES[name]) if name in PERCENTILE_NAMES else "background level"
            reasons.append(f"{label} {value:.3f}, training images {low:.3f}-{high:.3f}")
    spacing, trained_spacing = features.get("pixel_spacing_mm"), profile.get("pixel_spacing_mm")
    if trained_spacing:
        low, high = float(trained_spacing["low"]), float(trained_spacing["high"])
        if not spacing and not profile.get("spacing_missing"):
            reasons.append(f"no pixel spacing in the file (training images {low:g}-{high:g} mm)")
        elif spacing and not low - SPACING_MARGIN_MM <= spacing <= high + SPACING_MARGIN_MM:
            reasons.append(f"pixel spacing {spacing:g} mm, training images {low:g}-{high:g} mm")
    bits = features.get("bits_stored")
    if bits and profile.get("bits_stored") and int(bits) not in profile["bits_stored"]:
        reasons.append(f"{bits}-bit pixels, training images " + "/".join(map(str, profile["bits_stored"])) + "-bit")
    return DomainVerdict(checked=True, reasons=reasons)


def features_of(ws: Any, row: dict, *, db: Any = None, pixels: np.ndarray | None = None,
                foreground: np.ndarray | None = None) -> dict[str, Any]:
    """The catalog's domain features of an image (a row of ``images``). Images imported before the
    features existed get them now (from ``pixels`` and ``foreground`` when the caller has them, else
    loaded) and stored, so each image is measured once."""
    stored = row.get("domain_features")
    if stored:
        return json.loads(stored)
    from workspace.base.catalog import open_catalog
    from workspace.data import ingest

    if pixels is None:
        pixels = ingest.load_model_pixels(ws, row)
    if foreground is None:
        foreground = ingest.load_foreground(ws, row)
    features = image_features(pixels, foreground, bits_stored=row.get("bits_stored"),
                              pixel_spacing=mean_spacing(row.get("pixel_spacing_row"), row.get("pixel_spacing_col")))
    own = db is None
    db = open_catalog(ws) if own else db
    try:
        db.execute("UPDATE images SET domain_features = ? WHERE image_id = ?", [json.dumps(features), row["image_id"]])
    finally:
        if own:
            db.conn.close()
    return features


def domain_of(ws: Any, row: dict, profile: dict | None, **options: Any) -> DomainVerdict:
    """:func:`check_domain` of a catalog image against a model's ``training_domain``."""
    if not profile:
        return DomainVerdict(checked=False)
    return check_domain(profile, features_of(ws, row, **options), dataset=row.get("dataset"),
                        modality=row.get("modality"))


__all__ = ["DOMAIN_FEATURES", "DomainVerdict", "mean_spacing", "image_features", "domain_profile", "check_domain",
           "features_of", "domain_of"]
