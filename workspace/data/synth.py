"""A synthetic screening cohort that looks like mammograms, written as real MG DICOM files.

Real cohorts cannot be downloaded here, so the demo and the tests use patients made by this
module. Each patient has four images (L/R x CC/MLO). An image is drawn in the NORMALISED frame
(chest wall on the left, pectoral muscle top-left on MLO), then mirrored to the orientation a
detector would store (right breasts face the other way) and written with pydicom.

What an image holds:
- a breast outline (CC: a rounded half-superellipse on the chest wall; MLO: a taller, asymmetric
  outline reaching the top edge, with the pectoral muscle triangle), a compressed-breast thickness
  fall-off near the skin and a brighter skin line;
- anatomical texture: power-law noise (amplitude spectrum 1/f^(beta/2), power 1/f^beta with beta
  about 3) thresholded against a fibroglandular prior into a glandular fraction whose share of the
  breast is set by the density class A-D, plus ducts, vessels and Cooper ligaments (curvilinear);
- findings with exact masks: circumscribed and spiculated masses, microcalcification clusters and
  architectural distortion (BI-RADS 0 images), and benign findings (small circumscribed masses,
  coarse or vascular calcifications) on some BI-RADS 2 images, so that "any blob" is no perfect cue;
- an acquisition look: 12-14 bits stored, 0.07-0.1 mm pixels, quantum and electronic noise, blur.

Patient ``k`` of seed ``s`` depends only on ``(s, k)`` (own random generators), so any subset of a
cohort can be rebuilt alone and gives the same bytes.

Reader-path variants (seeded, per image): MONOCHROME1, JPEG 2000 lossless, a mirrored field of view
(``FieldOfViewHorizontalFlip`` and ``PatientOrientation`` say so), a SIGMOID VOI LUT function.

For every BI-RADS 0 image a low-resolution annotated copy (about 1/8 size, windowed, with WHITE
ellipses around the findings, as in the paper's data) is written; :func:`detect_ellipses` finds
those ellipses again and :func:`synthesize` records them as lesions (``source="annotated_copy"``)
beside the exact masks (``source="ground_truth"``).

Ellipse geometry (catalog JSON): ``{"cx", "cy", "rx", "ry", "angle"}`` in pixels; ``angle`` in
degrees in [0, 180), the direction of the ``rx`` axis measured from +x towards +y (image axes,
y down).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi
from PIL import Image
from skimage.draw import line_aa, polygon

from workspace.base.config import Workspace
from workspace.base.errors import MammoError
from workspace.base.progress import progress
from workspace.data.dicom_io import flip_array

FULL_SHAPE = (3328, 2560)          # rows x cols of a full-size image
ANNOTATED_ROWS = 416               # the annotated copy is about this tall (1/8 of a full-size image)
LOW_RES_ROWS = 832                 # anatomy is drawn on a grid about this tall, then upsampled
DATASET = "synthetic"
DENSITY_FRACTIONS = {"A": (0.08, 0.2), "B": (0.2, 0.4), "C": (0.4, 0.62), "D": (0.62, 0.82)}
VARIANTS = ("monochrome1", "jpeg2000", "flipped", "sigmoid")
VARIANT_PROBABILITY = 0.12
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}

_GIVEN = ("Anna", "Maria", "Jane", "Sofia", "Emma", "Laura", "Ines", "Clara", "Nora", "Greta", "Lucia",
          "Hanna", "Elena", "Paula", "Rosa", "Vera", "Alice", "Marta", "Julia", "Irene")
_FAMILY = ("Smith", "Garcia", "Muller", "Rossi", "Dubois", "Novak", "Silva", "Jansen", "Kowalski",
           "Berg", "Moreau", "Costa", "Fischer", "Larsen", "Horvat", "Weber", "Lopez", "Ricci")


class SynthError(MammoError):
    """A synthetic cohort request that cannot be met (bad size, bad count)."""


# ---------------------------------------------------------------------------------------------
# Plans: what a patient has, drawn from (seed, k) only
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FindingSpec:
    """One finding of a breast, shared by its CC and MLO views (each view places it anew)."""

    subtype: str          # circumscribed | spiculated | calcification_cluster | distortion |
                          # benign_mass | benign_calcifications | vascular_calcification
    kind: str             # mass | calcification | distortion (the catalog's lesions.kind)
    pathology: str        # malignant | benign
    size_mm: float        # characteristic radius
    contrast: float       # peak added signal (signal range 0..1)
    seed: int


@dataclass(frozen=True)
class PatientPlan:
    seed: int
    index: int
    patient_id: str       # a fake medical record number (an identifier: stays in the catalog)
    patient_name: str
    birth_date: str
    study_date: str
    density: str
    birads: dict[str, str]                # per laterality: "0" | "1" | "2"
    findings: dict[str, tuple[FindingSpec, ...]]
    bits_stored: int
    spacing_mm: float                     # at full size
    variants: dict[str, tuple[str, ...]]  # per image key "LCC", "RMLO"...: variant names
    vertical_flip: dict[str, bool]        # the "flipped" variant also mirrors top/bottom here


IMAGE_KEYS = ("LCC", "LMLO", "RCC", "RMLO")
# Bump whenever the same (seed, patient) draws different pixels, so that a model's recorded split can
# tell it was drawn by another generator (models.data.rebuild_recorded_split refuses it).
# 1: the first generator; 2: denser malignant findings (2026-11-26, models/README.md "The synthetic task").
GENERATOR_VERSION = 2


def _finding_spec(rng: np.random.Generator, malignant: bool) -> FindingSpec:
    if malignant:
        subtype = rng.choice(["circumscribed", "spiculated", "calcification_cluster", "distortion"],
                             p=[0.3, 0.3, 0.25, 0.15])
        size = {"circumscribed": rng.uniform(3.0, 9.0), "spiculated": rng.uniform(2.5, 6.0),
                "calcification_cluster": rng.uniform(2.5, 7.0), "distortion": rng.uniform(6.0, 14.0)}[subtype]
        # Malignant findings are denser than the benign masses below ("high density" is a BI-RADS descriptor
        # of suspicion) and stand out of dense tissue; with version 1's fainter ranges (0.035-0.085 for a
        # circumscribed mass) a lesion in a dense breast could not be seen (models/README.md).
        contrast = {"circumscribed": rng.uniform(0.09, 0.18), "spiculated": rng.uniform(0.1, 0.18),
                    "calcification_cluster": rng.uniform(0.14, 0.28), "distortion": rng.uniform(0.06, 0.1)}[subtype]
    else:
        subtype = rng.choice(["benign_mass", "benign_calcifications", "vascular_calcification"], p=[0.45, 0.4, 0.15])
        size = {"benign_mass": rng.uniform(2.5, 6.0), "benign_calcifications": rng.uniform(0.4, 1.1),
                "vascular_calcification": rng.uniform(8.0, 20.0)}[subtype]
        contrast = {"benign_mass": rng.uniform(0.04, 0.09), "benign_calcifications": rng.uniform(0.12, 0.3),
                    "vascular_calcification": rng.uniform(0.06, 0.14)}[subtype]
    kind = {"circumscribed": "mass", "spiculated": "mass", "benign_mass": "mass", "distortion": "distortion"}.get(
        subtype, "calcification")
    return FindingSpec(subtype=str(subtype), kind=kind, pathology="malignant" if malignant else "benign",
                       size_mm=float(size), contrast=float(contrast), seed=int(rng.integers(2**31)))


def plan_patient(seed: int, index: int, *, birads0_fraction: float = 0.5, variants: bool = True) -> PatientPlan:
    """Everything random about patient ``index`` of cohort ``seed`` (pixels are drawn later, also seeded)."""
    rng = np.random.default_rng([seed, index, 0x5EED])
    density = str(rng.choice(list("ABCD"), p=[0.12, 0.4, 0.36, 0.12]))
    positive = rng.random() < birads0_fraction
    affected = str(rng.choice(["L", "R"]))
    birads, findings = {}, {}
    for side in "LR":
        if positive and side == affected:
            n = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
            specs = [_finding_spec(rng, True) for _ in range(n)]
            birads[side] = "0"
        elif rng.random() < 0.4:
            specs = [_finding_spec(rng, False) for _ in range(1 if rng.random() < 0.7 else 2)]
            birads[side] = "2"
        else:
            specs = []
            birads[side] = "1"
        findings[side] = tuple(specs)
    chosen: dict[str, tuple[str, ...]] = {}
    vflip: dict[str, bool] = {}
    for key in IMAGE_KEYS:
        draws = rng.random(len(VARIANTS))
        chosen[key] = tuple(v for v, d in zip(VARIANTS, draws, strict=True) if variants and d < VARIANT_PROBABILITY)
        vflip[key] = bool(rng.random() < 0.3)
    year = int(rng.integers(1945, 1980))
    return PatientPlan(
        seed=seed, index=index,
        patient_id=f"{int(rng.integers(10**7, 10**8))}",
        patient_name=f"{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}",
        birth_date=f"{year:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        study_date=f"{int(rng.integers(2015, 2024)):04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        density=density, birads=birads, findings=findings,
        bits_stored=int(rng.choice([12, 13, 14], p=[0.4, 0.2, 0.4])),
        spacing_mm=float(rng.choice([0.07, 0.085, 0.1])),
        variants=chosen, vertical_flip=vflip,
    )


# ---------------------------------------------------------------------------------------------
# Drawing one view in the normalised frame
# ---------------------------------------------------------------------------------------------

@dataclass
class Finding:
    """A finding as drawn: its exact mask (a crop in NORMALISED full-resolution pixels)."""

    spec: FindingSpec
    x0: int
    y0: int
    mask: np.ndarray      # bool, crop whose top-left is (x0, y0)

    def full_mask(self, shape: tuple[int, int]) -> np.ndarray:
        out = np.zeros(shape, bool)
        h, w = self.mask.shape
        out[self.y0:self.y0 + h, self.x0:self.x0 + w] = self.mask
        return out


@dataclass
class View:
    """One drawn view: signal in [0, 1] (dense tissue bright), normalised frame, and its findings."""

    laterality: str
    view: str
    signal: np.ndarray            # float32 (rows, cols)
    findings: list[Finding]
    breast_low: np.ndarray        # bool, breast on the low-resolution grid
    scale_low: int
    spacing_mm: float             # pixel spacing of this image (mm)
    timings: dict[str, float] = field(default_factory=dict)


def power_law_noise(rng: np.random.Generator, shape: tuple[int, int], beta: float = 3.0,
                    cutoff: float | None = None, highcut: float | None = 0.12) -> np.ndarray:
    """Zero-mean, unit-variance noise with power spectrum ~ 1/f^beta (float32).

    ``cutoff`` (cycles/pixel) suppresses structures larger than about ``1/cutoff``; ``highcut``
    rolls off the finest ones (the field is drawn on a coarse grid and upsampled: no pixel grain).
    """
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** (-beta / 2.0)
    if cutoff is not None:  # suppress structures larger than 1/cutoff pixels
        amp *= 1.0 - np.exp(-(f / cutoff) ** 2)
    if highcut is not None:
        amp *= np.exp(-(f / highcut) ** 2)
    amp[0, 0] = 0.0
    spec = (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape)) * amp
    out = np.fft.irfft2(spec, s=shape).astype(np.float32)
    out -= out.mean()
    out /= out.std() + 1e-12
    return out


def _radial_streaks(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, nipple: tuple[float, float],
                    depth: float, scale: int) -> np.ndarray:
    """Texture elongated along lines that converge on the nipple (trabeculae, ducts), unit variance.

    Anisotropic power-law noise drawn on a (distance, angle) grid around the nipple, then sampled
    at every pixel.
    """
    n_r, n_a = 256, 512
    fr = np.fft.fftfreq(n_r)[:, None]
    fa = np.fft.rfftfreq(n_a)[None, :]
    f = np.sqrt((fr * 5.0) ** 2 + fa ** 2)  # slow along the distance axis: streaks point at the nipple
    f[0, 0] = 1.0
    amp = f ** -1.4
    amp[0, 0] = 0.0
    spec = (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape)) * amp
    field = np.fft.irfft2(spec, s=(n_r, n_a)).astype(np.float32)
    field = (field - field.mean()) / (field.std() + 1e-12)
    dist = np.hypot(xs - nipple[0], ys - nipple[1]) / (1.6 * depth) * (n_r - 1)
    ang = (np.arctan2(ys - nipple[1], xs - nipple[0]) % (2 * math.pi)) / (2 * math.pi) * n_a
    out = ndi.map_coordinates(field, [np.broadcast_to(dist, ang.shape), ang], order=1, mode="wrap")
    fade = np.clip(dist / (0.12 * n_r), 0, 1)  # no star at the nipple itself
    return (out * fade).astype(np.float32)


def _upsample(low: np.ndarray, scale: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling by an integer factor (pixel centres aligned), cropped to ``shape``."""
    if scale == 1:
        return low[:shape[0], :shape[1]].astype(np.float32)
    import torch

    t = torch.from_numpy(np.ascontiguousarray(low, dtype=np.float32))[None, None]
    up = torch.nn.functional.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False)
    return up[0, 0, :shape[0], :shape[1]].numpy()


def _draw_polyline(canvas: np.ndarray, pts: np.ndarray, weights: np.ndarray) -> None:
    """Anti-aliased polyline (x, y points) added into ``canvas`` with per-segment weights."""
    h, w = canvas.shape
    for (xa, ya), (xb, yb), wt in zip(pts[:-1], pts[1:], weights, strict=False):
        rr, cc, val = line_aa(int(round(ya)), int(round(xa)), int(round(yb)), int(round(xb)))
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        np.maximum.at(canvas, (rr[ok], cc[ok]), (val[ok] * wt).astype(canvas.dtype))


def _random_walk(rng: np.random.Generator, start: tuple[float, float], heading: float, n: int,
                 step: float, wiggle: float) -> np.ndarray:
    pts = [start]
    x, y = start
    for _ in range(n):
        heading += rng.normal(0, wiggle)
        x += step * math.cos(heading)
        y += step * math.sin(heading)
        pts.append((x, y))
    return np.asarray(pts)


def _effective_spacing(plan: PatientPlan, shape: tuple[int, int]) -> float:
    """Smaller test images are the same anatomy with coarser pixels."""
    return plan.spacing_mm * FULL_SHAPE[0] / shape[0]


def render_view(plan: PatientPlan, laterality: str, view: str,
                image_shape: tuple[int, int] = FULL_SHAPE) -> View:
    """Draw one view of ``plan`` in the normalised frame (chest wall left). Deterministic."""
    t0 = time.perf_counter()
    rows, cols = image_shape
    rng = np.random.default_rng([plan.seed, plan.index, IMAGE_KEYS.index(laterality + view) + 1])
    spacing = _effective_spacing(plan, image_shape)
    scale = max(1, int(round(rows / LOW_RES_ROWS)))
    h, w = -(-rows // scale), -(-cols // scale)
    # Full-resolution coordinates of the low-resolution pixel centres.
    ys = ((np.arange(h, dtype=np.float32) + 0.5) * scale - 0.5)[:, None]
    xs = ((np.arange(w, dtype=np.float32) + 0.5) * scale - 0.5)[None, :]
    mm = 1.0 / spacing  # pixels per mm

    # -- outline ---------------------------------------------------------------------------
    depth = cols * rng.uniform(0.55, 0.8)
    expo = rng.uniform(2.0, 2.6)
    if view == "CC":
        yc = rows * rng.uniform(0.46, 0.54)
        a_up = a_down = rows * rng.uniform(0.33, 0.44)
    else:
        yc = rows * rng.uniform(0.5, 0.6)
        a_up = yc * rng.uniform(1.15, 1.35)
        a_down = min(rows * 0.97, yc + rows * rng.uniform(0.3, 0.4)) - yc
    dy = ys - yc
    ay = np.where(dy < 0, a_up, a_down)
    theta = np.arctan2(dy / ay, np.maximum(xs, 0) / depth)
    wobble = (1 + 0.025 * np.sin(2 * theta + rng.uniform(0, 6.3)) + 0.015 * np.sin(3 * theta + rng.uniform(0, 6.3)))
    rho = ((np.abs(xs) / depth) ** expo + np.abs(dy / ay) ** expo) ** (1 / expo) / wobble
    breast = rho < 1.0
    # Distance to the skin in mm (the image borders, chest wall included, are not skin).
    dist_skin = (ndi.distance_transform_edt(breast) * (scale / mm)).astype(np.float32)
    edge_mm = rng.uniform(6.0, 12.0)
    thick = np.sqrt(np.clip(1 - (1 - np.minimum(dist_skin / edge_mm, 1.0)) ** 2, 0, 1)) * breast

    # -- pectoral muscle (MLO) ---------------------------------------------------------------
    muscle = np.zeros((h, w), np.float32)
    muscle_edge = None
    if view == "MLO":
        top_w = min(cols * rng.uniform(0.22, 0.38), depth * 0.55)
        mh = rows * rng.uniform(0.35, 0.6)
        gamma = rng.uniform(0.75, 1.15)
        edge_x = top_w * np.clip(1 - ys / mh, 0, 1) ** gamma
        muscle_edge = (top_w, mh, gamma)
        muscle = np.clip((edge_x - xs) / (1.5 * mm) + 0.5, 0, 1).astype(np.float32) * breast

    # -- fibroglandular tissue ---------------------------------------------------------------
    u = np.clip(xs / depth, 0, 1.2)
    v = dy / ay
    prior = (np.exp(-(v / rng.uniform(0.45, 0.7)) ** 2)
             * np.clip((u - 0.04) / 0.15, 0, 1) * np.clip((1.0 - u) / 0.25, 0, 1)
             * (1 - np.exp(-dist_skin / rng.uniform(4.0, 10.0))))
    prior = prior * (1 - muscle)
    tex_big = power_law_noise(rng, (h, w), beta=3.0)
    tex_mid = power_law_noise(rng, (h, w), beta=2.6, cutoff=0.03, highcut=0.25)
    streaks = _radial_streaks(rng, ys, xs, (depth * 1.02, yc), depth, scale)
    g_raw = 1.5 * prior + 0.5 * tex_big + 0.3 * streaks + 0.15 * tex_mid
    lo, hi = DENSITY_FRACTIONS[plan.density]
    frac = rng.uniform(lo, hi)
    inside = breast & (muscle < 0.5)
    thr = np.quantile(g_raw[inside], 1 - frac) if inside.any() else 0.0
    gland = 1.0 / (1.0 + np.exp(-(g_raw - thr) / 0.22))
    gland = (gland * inside).astype(np.float32)

    # -- curvilinear structures ----------------------------------------------------------------
    lines = np.zeros((h, w), np.float32)
    nipple = (depth * 0.97, yc)
    for _ in range(int(rng.integers(12, 26))):  # ducts: from behind the nipple towards the chest wall
        start = (nipple[0] / scale - rng.uniform(2, 8) * mm / scale, nipple[1] / scale + rng.normal(0, 4) * mm / scale)
        heading = math.pi + rng.normal(0, 0.35)
        pts = _random_walk(rng, start, heading, int(rng.integers(15, 40)), 2.5 * mm / scale, 0.12)
        _draw_polyline(lines, pts, np.linspace(rng.uniform(0.5, 1.0), 0.15, len(pts) - 1))
    for _ in range(int(rng.integers(2, 5))):    # vessels: long, smooth, brighter
        start = (rng.uniform(0.05, 0.3) * depth / scale, (yc + rng.uniform(-0.8, 0.8) * a_up) / scale)
        heading = rng.normal(0, 0.3) + (rng.uniform(-0.3, 0.3))
        pts = _random_walk(rng, start, heading, int(rng.integers(30, 70)), 2.0 * mm / scale, 0.06)
        _draw_polyline(lines, pts, np.full(len(pts) - 1, rng.uniform(0.9, 1.4)))
    cooper = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(25, 50))):  # Cooper ligaments: short arcs in the subcutaneous fat
        ang = rng.uniform(-1.3, 1.3)
        r = rng.uniform(0.55, 0.95)
        cx0 = r * depth * math.cos(ang)
        cy0 = yc + r * (a_up if ang < 0 else a_down) * math.sin(ang)
        heading = ang + rng.choice([-1, 1]) * math.pi / 2 + rng.normal(0, 0.4)
        pts = _random_walk(rng, (cx0 / scale, cy0 / scale), heading, int(rng.integers(4, 10)), 1.5 * mm / scale, 0.25)
        _draw_polyline(cooper, pts, np.full(len(pts) - 1, rng.uniform(0.4, 0.9)))
    lines = ndi.gaussian_filter(lines, max(0.5, 0.35 * mm / scale))
    cooper = ndi.gaussian_filter(cooper, max(0.5, 0.25 * mm / scale))

    # -- signal on the low-resolution grid ---------------------------------------------------
    fat_tex = power_law_noise(rng, (h, w), beta=2.8)
    striation = power_law_noise(rng, (h, w), beta=2.2)
    background = 0.02
    fat = 0.26 + 0.025 * fat_tex
    dense = 0.3 * gland * (1 + 0.1 * tex_mid + 0.08 * streaks)
    tissue = fat + dense + 0.07 * lines + 0.05 * cooper * (1 - gland)
    muscle_level = 0.5 + 0.08 * np.clip(1 - (xs / (0.4 * cols) + ys / (0.6 * rows)), 0, 1)
    tissue = tissue * (1 - muscle) + muscle * (muscle_level + 0.02 * striation + 0.015 * tex_big)
    skin = 0.09 * np.exp(-dist_skin / 0.9) * breast
    low = background + breast * (thick * (tissue - background) + skin)
    low = low.astype(np.float32)
    timings = {"anatomy_s": time.perf_counter() - t0}

    # -- full resolution, findings, noise ----------------------------------------------------
    t1 = time.perf_counter()
    signal = _upsample(low, scale, image_shape)
    findings = _place_findings(rng, plan.findings[laterality], signal, breast, gland, muscle, dist_skin,
                               scale, mm, image_shape, muscle_edge)
    # detector: quantum noise ~ sqrt(signal) plus electronic noise, slightly correlated (blur)
    noise = rng.standard_normal(image_shape, dtype=np.float32)
    sm = noise.copy()
    sm[1:] += noise[:-1]
    sm[:-1] += noise[1:]
    sm[:, 1:] += noise[:, :-1]
    sm[:, :-1] += noise[:, 1:]
    sm *= np.float32(1 / math.sqrt(5.0))
    signal += (np.float32(0.004) + np.float32(0.012) * np.sqrt(np.maximum(signal, 0))) * sm
    np.clip(signal, 0, 1, out=signal)
    timings["findings_noise_s"] = time.perf_counter() - t1
    return View(laterality, view, signal, findings, breast, scale, spacing, timings)


# ---------------------------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------------------------

def _extent_mm(spec: FindingSpec) -> float:
    """Radius (mm) that holds the whole finding, spicules included."""
    return {"spiculated": spec.size_mm * 3.2, "distortion": spec.size_mm * 1.1,
            "calcification_cluster": spec.size_mm * 1.2, "benign_calcifications": 25.0,
            "vascular_calcification": spec.size_mm * 0.6}.get(spec.subtype, spec.size_mm * 1.3)


def _place_findings(rng, specs, signal, breast, gland, muscle, dist_skin, scale, mm, shape, muscle_edge):
    rows, cols = shape
    placed: list[tuple[float, float, float]] = []
    out: list[Finding] = []
    allowed_base = breast & (muscle < 0.01)
    for spec in specs:
        extent = _extent_mm(spec) * mm
        if spec.subtype == "benign_calcifications":
            extent = 0  # scattered: each calcification is placed on its own below
        margin_mm = _extent_mm(spec) + 3.0 if spec.subtype != "benign_calcifications" else 4.0
        allowed = allowed_base & (dist_skin > margin_mm)
        if muscle_edge is not None:  # keep clear of the pectoral muscle edge
            top_w, mh, gamma = muscle_edge
            yy = (np.arange(allowed.shape[0]) + 0.5) * scale - 0.5
            edge = top_w * np.clip(1 - yy / mh, 0, 1) ** gamma
            xx = (np.arange(allowed.shape[1]) + 0.5) * scale - 0.5
            allowed &= xx[None, :] > edge[:, None] + extent + 3 * mm
        ys, xs = np.nonzero(allowed)
        if len(ys) == 0:
            continue
        weights = 0.35 + gland[ys, xs]  # findings favour (and hide in) glandular tissue
        for _attempt in range(60):
            i = rng.choice(len(ys), p=weights / weights.sum())
            cx = (xs[i] + rng.uniform(0, 1)) * scale - 0.5
            cy = (ys[i] + rng.uniform(0, 1)) * scale - 0.5
            if not (extent + 2 < cx < cols - extent - 2 and extent + 2 < cy < rows - extent - 2):
                continue
            if all(math.hypot(cx - px, cy - py) > extent + pe + 12 * mm for px, py, pe in placed):
                break
        else:
            continue
        placed.append((cx, cy, extent))
        frng = np.random.default_rng([spec.seed, int(cx), int(cy)])
        drawn = _DRAW[spec.subtype](frng, spec, cx, cy, mm, signal, allowed, scale)
        out.extend(drawn)
    return out


def _crop_box(cx: float, cy: float, radius: float, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    r = int(math.ceil(radius)) + 2
    x0, y0 = max(0, int(cx) - r), max(0, int(cy) - r)
    x1, y1 = min(shape[1], int(cx) + r + 1), min(shape[0], int(cy) + r + 1)
    return x0, y0, x1, y1


def _add(signal: np.ndarray, box, delta: np.ndarray) -> None:
    x0, y0, x1, y1 = box
    signal[y0:y1, x0:x1] += delta.astype(np.float32)


def _mass_profile(rng, cx, cy, r_mm, mm, box, lobulation: float, elong: float):
    """A lobulated ellipse-like mass: sphere-like thickness profile and its exact mask."""
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    ang = rng.uniform(0, math.pi)
    dx, dy = xx - cx, yy - cy
    u = dx * math.cos(ang) + dy * math.sin(ang)
    v = (-dx * math.sin(ang) + dy * math.cos(ang)) * elong
    th = np.arctan2(v, u)
    radius = np.ones_like(th)
    for k in range(2, 6):
        radius += lobulation * rng.uniform(0.2, 1.0) / k * np.cos(k * th + rng.uniform(0, 6.3))
    rho = np.sqrt(u * u + v * v) / (r_mm * mm * radius)
    return rho


def _draw_circumscribed(rng, spec, cx, cy, mm, signal, allowed, scale, benign=False):
    r = spec.size_mm * mm
    box = _crop_box(cx, cy, r * 1.4, signal.shape)
    rho = _mass_profile(rng, cx, cy, spec.size_mm, mm, box, 0.05 if benign else 0.12, rng.uniform(1.0, 1.5))
    mask = rho <= 1.0
    profile = np.sqrt(np.clip(1 - rho ** 2, 0, 1)) ** 0.6
    edge_sigma = (0.12 if benign else rng.uniform(0.25, 0.6)) * mm  # margin sharpness
    profile = ndi.gaussian_filter(profile, edge_sigma)
    _add(signal, box, spec.contrast * profile)
    return [Finding(spec, box[0], box[1], mask)]


def _spicules(rng, canvas, cx, cy, x0, y0, r_in, r_out, n, mm, width_mm):
    for _ in range(n):
        a = rng.uniform(0, 2 * math.pi)
        length = rng.uniform(r_in * 1.1, r_out)
        start = r_in * rng.uniform(0.3, 0.8)
        pts = _random_walk(rng, (cx - x0 + start * math.cos(a), cy - y0 + start * math.sin(a)), a,
                           8, (length - start) / 8, 0.05)
        _draw_polyline(canvas, pts, np.linspace(1.0, 0.35, len(pts) - 1))
    sigma = max(0.6, width_mm * mm)
    return ndi.gaussian_filter(canvas, sigma) * (sigma * 2.5)


def _draw_spiculated(rng, spec, cx, cy, mm, signal, allowed, scale):
    r = spec.size_mm * mm
    r_out = r * rng.uniform(2.2, 3.0)
    box = _crop_box(cx, cy, r_out + 4, signal.shape)
    rho = _mass_profile(rng, cx, cy, spec.size_mm, mm, box, 0.2, rng.uniform(1.0, 1.3))
    core = ndi.gaussian_filter(np.sqrt(np.clip(1 - rho ** 2, 0, 1)) ** 0.5, 0.5 * mm)
    canvas = np.zeros(rho.shape, np.float32)
    spic = np.clip(_spicules(rng, canvas, cx, cy, box[0], box[1], r, r_out, int(rng.integers(10, 24)), mm, 0.18), 0, 1)
    delta = spec.contrast * np.maximum(core, 0.55 * spic)
    _add(signal, box, delta)
    mask = (rho <= 1.0) | (spic > 0.2)
    return [Finding(spec, box[0], box[1], mask)]


def _draw_distortion(rng, spec, cx, cy, mm, signal, allowed, scale):
    r = spec.size_mm * mm
    box = _crop_box(cx, cy, r * 1.1 + 4, signal.shape)
    canvas = np.zeros((box[3] - box[1], box[2] - box[0]), np.float32)
    n = int(rng.integers(14, 28))
    spic = np.clip(_spicules(rng, canvas, cx, cy, box[0], box[1], 0.12 * r, r, n, mm, 0.14), 0, 1)
    yy, xx = np.mgrid[box[1]:box[3], box[0]:box[2]].astype(np.float32)
    dcen = np.hypot(xx - cx, yy - cy)
    lucent = np.exp(-(dcen / (0.3 * r)) ** 2)  # retracted fat at the centre
    _add(signal, box, spec.contrast * (spic - 0.5 * lucent))
    # The distorted region: everything the spicules reach (their star-shaped hull).
    support = spic > 0.15
    ang = np.arctan2(yy - cy, xx - cx)
    bins = ((ang + math.pi) / (2 * math.pi) * 64).astype(int) % 64
    reach = np.zeros(64, np.float32)
    np.maximum.at(reach, bins[support], dcen[support])
    reach = np.maximum(reach, 0.3 * r)
    reach = ndi.maximum_filter1d(reach, 3, mode="wrap")
    mask = dcen <= reach[bins]
    return [Finding(spec, box[0], box[1], mask)]


def _calc_blob(signal, x, y, radius_px, contrast):
    box = _crop_box(x, y, radius_px * 2 + 3, signal.shape)
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = np.hypot(xx - x, yy - y)
    core = np.clip(radius_px + 0.5 - d, 0, 1)  # anti-aliased disk
    blob = ndi.gaussian_filter(core, 0.7)      # detector blur
    _add(signal, box, contrast * blob)
    return box, d <= max(radius_px, 0.75)


def _draw_cluster(rng, spec, cx, cy, mm, signal, allowed, scale):
    r = spec.size_mm * mm
    n = int(rng.integers(5, 22))
    ang = rng.uniform(0, 2 * math.pi, n)
    rad = r * np.sqrt(rng.uniform(0, 1, n))
    elong = rng.uniform(0.5, 1.0)
    pts = np.stack([cx + rad * np.cos(ang), cy + elong * rad * np.sin(ang)], 1)
    box = _crop_box(cx, cy, r * 1.2 + 0.8 * mm, signal.shape)
    dots = np.zeros((box[3] - box[1], box[2] - box[0]), bool)
    for x, y in pts:
        cr = rng.uniform(0.08, 0.28) * mm
        b, m = _calc_blob(signal, x, y, cr, spec.contrast * rng.uniform(0.6, 1.2))
        _paste(dots, box, b, m)
    # The cluster region: convex hull of the calcifications, grown by 0.6 mm.
    hull = _convex_hull_mask(pts - [box[0], box[1]], dots.shape)
    mask = ndi.distance_transform_edt(~(hull | dots)) <= 0.6 * mm
    return [Finding(spec, box[0], box[1], mask)]


def _paste(dst: np.ndarray, dst_box, src_box, src: np.ndarray) -> None:
    dx0, dy0, dx1, dy1 = dst_box
    sx0, sy0, sx1, sy1 = src_box
    ix0, iy0, ix1, iy1 = max(dx0, sx0), max(dy0, sy0), min(dx1, sx1), min(dy1, sy1)
    if ix0 >= ix1 or iy0 >= iy1:
        return
    dst[iy0 - dy0:iy1 - dy0, ix0 - dx0:ix1 - dx0] |= src[iy0 - sy0:iy1 - sy0, ix0 - sx0:ix1 - sx0]


def _convex_hull_mask(pts: np.ndarray, shape) -> np.ndarray:
    out = np.zeros(shape, bool)
    if len(pts) < 3:
        return out
    from scipy.spatial import ConvexHull, QhullError

    try:
        hull = ConvexHull(pts)
    except QhullError:
        return out
    rr, cc = polygon(pts[hull.vertices, 1], pts[hull.vertices, 0], shape)
    out[rr, cc] = True
    return out


def _draw_benign_mass(rng, spec, cx, cy, mm, signal, allowed, scale):
    return _draw_circumscribed(rng, spec, cx, cy, mm, signal, allowed, scale, benign=True)


def _draw_benign_calcs(rng, spec, cx, cy, mm, signal, allowed, scale):
    """Coarse scattered round calcifications (each its own finding), anywhere in the breast."""
    ys, xs = np.nonzero(allowed)
    out = []
    for _ in range(int(rng.integers(1, 5))):
        i = rng.integers(len(ys))
        x = (xs[i] + rng.uniform(0, 1)) * scale - 0.5
        y = (ys[i] + rng.uniform(0, 1)) * scale - 0.5
        r = rng.uniform(0.6, 1.6) * spec.size_mm * mm
        box, m = _calc_blob(signal, x, y, r, spec.contrast * rng.uniform(0.7, 1.3))
        out.append(Finding(spec, box[0], box[1], m))
    return out


def _draw_vascular(rng, spec, cx, cy, mm, signal, allowed, scale):
    """Tram-track vessel wall calcification: two parallel dashed bright lines."""
    r = spec.size_mm * mm * 0.5
    box = _crop_box(cx, cy, r + 4 * mm, signal.shape)
    canvas = np.zeros((box[3] - box[1], box[2] - box[0]), np.float32)
    a = rng.uniform(0, math.pi)
    off = 0.6 * mm
    for side in (-1, 1):
        ox, oy = -math.sin(a) * off * side, math.cos(a) * off * side
        start = (cx - box[0] - r * math.cos(a) + ox, cy - box[1] - r * math.sin(a) + oy)
        pts = _random_walk(rng, start, a, 12, 2 * r / 12, 0.02)
        wts = (rng.random(len(pts) - 1) < 0.75).astype(np.float32)
        _draw_polyline(canvas, pts, wts)
    blur = ndi.gaussian_filter(canvas, max(0.7, 0.12 * mm)) * max(0.7, 0.12 * mm) * 2.5
    _add(signal, box, spec.contrast * np.clip(blur, 0, 1))
    return [Finding(spec, box[0], box[1], blur > 0.15)]


_DRAW = {"circumscribed": _draw_circumscribed, "spiculated": _draw_spiculated,
         "calcification_cluster": _draw_cluster, "distortion": _draw_distortion,
         "benign_mass": _draw_benign_mass, "benign_calcifications": _draw_benign_calcs,
         "vascular_calcification": _draw_vascular}


# ---------------------------------------------------------------------------------------------
# From the normalised frame to the stored file
# ---------------------------------------------------------------------------------------------

def stored_flips(plan: PatientPlan, key: str) -> tuple[bool, bool]:
    """(horizontal, vertical) mirrors from the normalised frame to the pixels as stored.

    Right breasts are stored facing the other way (chest wall on the right), as detectors do;
    the "flipped" variant mirrors the field of view once more (and sometimes top/bottom too).
    """
    flip_h = key[0] == "R"
    flip_v = False
    if "flipped" in plan.variants[key]:
        flip_h = not flip_h
        flip_v = plan.vertical_flip[key]
    return flip_h, flip_v


def patient_orientation(laterality: str, view: str, flip_h: bool, flip_v: bool) -> list[str]:
    """DICOM PatientOrientation (row direction, column direction) of the stored pixels."""
    row = "P" if flip_h else "A"   # chest wall on the left: columns run towards the nipple (anterior)
    if view == "MLO":
        col = "H" if flip_v else "F"
    else:                           # CC: lateral at the top of the normalised frame
        down = "R" if laterality == "L" else "L"
        col = ({"R": "L", "L": "R"}[down]) if flip_v else down
    return [row, col]


def ellipse_around(mask: np.ndarray, x0: int, y0: int, *, margin: float, min_axis: float) -> dict[str, float]:
    """The smallest moment-aligned ellipse holding every pixel of ``mask`` (crop at x0, y0), grown by ``margin``."""
    yy, xx = np.nonzero(mask)
    xs, ys = xx + float(x0), yy + float(y0)
    cx, cy = float(xs.mean()), float(ys.mean())
    cov = np.cov(np.stack([xs - cx, ys - cy])) if len(xs) > 1 else np.eye(2) * 0.1
    evals, evecs = np.linalg.eigh(cov)
    major = evecs[:, 1]
    angle = math.degrees(math.atan2(major[1], major[0])) % 180.0
    a = 2 * math.sqrt(max(evals[1], 0) + 1 / 12)
    b = 2 * math.sqrt(max(evals[0], 0) + 1 / 12)
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    u = (xs - cx) * ca + (ys - cy) * sa
    v = -(xs - cx) * sa + (ys - cy) * ca
    s = float(np.sqrt((u / a) ** 2 + (v / b) ** 2).max()) if len(xs) else 1.0
    rx, ry = max(a * s + margin, min_axis), max(b * s + margin, min_axis)
    return {"cx": cx, "cy": cy, "rx": rx, "ry": ry, "angle": angle}


def draw_ellipse_ring(rgb: np.ndarray, e: dict[str, float], half_width: float = 0.8) -> None:
    """Draw a white ring (about 2 pixels wide) along ellipse ``e`` (pixel coordinates of ``rgb``)."""
    h, w = rgb.shape[:2]
    r = max(e["rx"], e["ry"]) + 3
    x0, x1 = max(0, int(e["cx"] - r)), min(w, int(e["cx"] + r) + 2)
    y0, y1 = max(0, int(e["cy"] - r)), min(h, int(e["cy"] + r) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    ca, sa = math.cos(math.radians(e["angle"])), math.sin(math.radians(e["angle"]))
    u = (xx - e["cx"]) * ca + (yy - e["cy"]) * sa
    v = -(xx - e["cx"]) * sa + (yy - e["cy"]) * ca
    rho = np.sqrt((u / e["rx"]) ** 2 + (v / e["ry"]) ** 2)
    grad = np.sqrt((u / e["rx"] ** 2) ** 2 + (v / e["ry"] ** 2) ** 2) / np.maximum(rho, 1e-9)
    ring = np.abs(rho - 1) / np.maximum(grad, 1e-9) <= half_width
    rgb[y0:y1, x0:x1][ring] = 255


def detect_ellipses(image: np.ndarray, *, white: int = 250, min_pixels: int = 12) -> list[dict[str, float]]:
    """White ellipses drawn on an annotated copy (grey or RGB uint8), in that image's pixel coordinates.

    A white component counts as an ellipse when it is a closed ring (it encloses a hole at least half
    its own area). Centre and angle come from the moments of the filled ring; the axes are the mean of
    the outer (filled) and inner (hole) ellipses, i.e. the ring's mid-line.
    """
    img = np.asarray(image)
    bright = (img.min(axis=2) if img.ndim == 3 else img) >= white
    labels, n = ndi.label(bright, structure=np.ones((3, 3), bool))
    found = []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        ring = labels[sl] == i
        if ring.sum() < min_pixels:
            continue
        filled = ndi.binary_fill_holes(ring)
        hole = filled & ~ring
        if hole.sum() < 0.5 * ring.sum():
            continue
        outer, inner = _moment_ellipse(filled), _moment_ellipse(hole)
        if outer is None or inner is None:
            continue
        found.append({"cx": outer["cx"] + sl[1].start, "cy": outer["cy"] + sl[0].start,
                      "rx": (outer["rx"] + inner["rx"]) / 2, "ry": (outer["ry"] + inner["ry"]) / 2,
                      "angle": outer["angle"]})
    return found


def _moment_ellipse(region: np.ndarray) -> dict[str, float] | None:
    yy, xx = np.nonzero(region)
    if len(xx) < 3:
        return None
    cx, cy = xx.mean(), yy.mean()
    evals, evecs = np.linalg.eigh(np.cov(np.stack([xx - cx, yy - cy])))
    angle = math.degrees(math.atan2(evecs[1, 1], evecs[0, 1])) % 180.0
    # a filled ellipse of semi-axis a has variance a^2/4 along it (+1/12 for pixel quantisation)
    return {"cx": float(cx), "cy": float(cy), "rx": 2 * math.sqrt(max(evals[1] - 1 / 12, 0)),
            "ry": 2 * math.sqrt(max(evals[0] - 1 / 12, 0)), "angle": angle}


def copy_to_full(e: dict[str, float], factor: int) -> dict[str, float]:
    """An ellipse on an annotated copy reduced ``factor`` times, in full-resolution pixels."""
    return {"cx": (e["cx"] + 0.5) * factor - 0.5, "cy": (e["cy"] + 0.5) * factor - 0.5,
            "rx": e["rx"] * factor, "ry": e["ry"] * factor, "angle": e["angle"] % 180.0}


def full_to_copy(e: dict[str, float], factor: int) -> dict[str, float]:
    return {"cx": (e["cx"] + 0.5) / factor - 0.5, "cy": (e["cy"] + 0.5) / factor - 0.5,
            "rx": e["rx"] / factor, "ry": e["ry"] / factor, "angle": e["angle"]}


def annotated_factor(rows: int) -> int:
    return max(1, int(round(rows / ANNOTATED_ROWS)))


# ---------------------------------------------------------------------------------------------
# One image, ready to write
# ---------------------------------------------------------------------------------------------

@dataclass
class SynthImage:
    """One image as stored: pixels, header facts, findings in ORIGINAL (stored) coordinates."""

    key: str
    laterality: str
    view: str
    stored: np.ndarray                 # uint16 as written (MONOCHROME1 already inverted)
    photometric: str
    bits_stored: int
    spacing_mm: float
    window: tuple[float, float]        # centre, width (stored values)
    voi_function: str
    flip_h: bool
    flip_v: bool
    variants: tuple[str, ...]
    birads: str
    findings: list[Finding]            # masks mirrored into stored orientation
    ellipses: list[dict[str, float]]   # white ellipses drawn on the annotated copy, full resolution
    annotated: np.ndarray | None       # RGB uint8 copy (BI-RADS 0 only)
    annotated_factor: int
    timings: dict[str, float]


def make_image(plan: PatientPlan, key: str, image_shape: tuple[int, int] = FULL_SHAPE) -> SynthImage:
    """Draw image ``key`` ("LCC", "RMLO"...) of ``plan`` and put it into its stored form."""
    lat, view = key[0], key[1:]
    drawn = render_view(plan, lat, view, image_shape)
    t0 = time.perf_counter()
    maxval = 2 ** plan.bits_stored - 1
    flip_h, flip_v = stored_flips(plan, key)
    signal = flip_array(drawn.signal, flip_h, flip_v)
    values = np.rint(signal * maxval).astype(np.uint16)  # MONOCHROME2 values, dense tissue bright
    sample = drawn.signal[::8, ::8]
    tissue = sample[sample > 0.12]
    lo, hi = (np.quantile(tissue, [0.01, 0.999]) * [1.0, 1.06] if tissue.size else (0.1, 0.9))
    wc, ww = float(round((lo + hi) / 2 * maxval)), float(round((hi - lo) * 1.08 * maxval))
    findings = []
    rows, cols = image_shape
    for f in drawn.findings:
        h, w = f.mask.shape
        x0 = cols - (f.x0 + w) if flip_h else f.x0
        y0 = rows - (f.y0 + h) if flip_v else f.y0
        findings.append(Finding(f.spec, x0, y0, flip_array(f.mask, flip_h, flip_v)))
    birads = plan.birads[lat]
    ellipses, annotated = [], None
    factor = annotated_factor(rows)
    if birads == "0":
        disp = np.clip((values.astype(np.float32) - (wc - ww / 2)) / ww, 0, 1) * 235.0
        small = np.asarray(Image.fromarray(disp.astype(np.uint8)).reduce(factor))
        annotated = np.repeat(small[:, :, None], 3, axis=2).copy()
        for f in findings:
            if f.spec.pathology != "malignant":
                continue
            # drawn loosely, as a reader would: 3 mm beyond the finding
            e = ellipse_around(f.mask, f.x0, f.y0, margin=3.0 / drawn.spacing_mm, min_axis=5.0 * factor)
            ellipses.append(e)
            draw_ellipse_ring(annotated, full_to_copy(e, factor))
    photometric = "MONOCHROME1" if "monochrome1" in plan.variants[key] else "MONOCHROME2"
    stored = (maxval - values) if photometric == "MONOCHROME1" else values
    if photometric == "MONOCHROME1":
        wc = maxval - wc
    timings = dict(drawn.timings, store_s=time.perf_counter() - t0)
    return SynthImage(key=key, laterality=lat, view=view, stored=np.ascontiguousarray(stored),
                      photometric=photometric, bits_stored=plan.bits_stored, spacing_mm=drawn.spacing_mm,
                      window=(wc, ww), voi_function="SIGMOID" if "sigmoid" in plan.variants[key] else "LINEAR",
                      flip_h=flip_h, flip_v=flip_v, variants=plan.variants[key], birads=birads,
                      findings=findings, ellipses=ellipses, annotated=annotated, annotated_factor=factor,
                      timings=timings)


def _uid(plan: PatientPlan, *parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["mammo-dissect-synthetic", str(plan.seed), str(plan.index), *parts]))


def write_dicom(path: str | Path, plan: PatientPlan, image: SynthImage, *, compress: bool = True) -> int:
    """Write ``image`` as an MG DICOM file (deterministic bytes); returns the file size in bytes.
    ``compress=False`` leaves the ``jpeg2000`` variant uncompressed: its compression is lossless, so a caller
    that only reads the pixel values back gets the same values without the encode and decode."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import JPEG2000Lossless

    from workspace.data.dicom_io import grayscale_dataset, save_dicom

    ds = grayscale_dataset(image.stored, sop_class_uid=MG_FOR_PRESENTATION,
                           sop_instance_uid=_uid(plan, image.key, "sop"), photometric=image.photometric,
                           bits_stored=image.bits_stored)
    ds.StudyInstanceUID = _uid(plan, "study")
    ds.SeriesInstanceUID = _uid(plan, image.key[0] + "series")
    ds.Modality = "MG"
    ds.Manufacturer = "mammo-dissect synthetic"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientName = plan.patient_name
    ds.PatientID = plan.patient_id
    ds.PatientBirthDate = plan.birth_date
    ds.PatientSex = "F"
    ds.StudyDate = plan.study_date
    ds.SeriesDate = plan.study_date
    ds.StudyID = f"{plan.index:06d}"
    ds.AccessionNumber = plan.patient_id[::-1]
    ds.SeriesNumber = 1 if image.laterality == "L" else 2
    ds.InstanceNumber = IMAGE_KEYS.index(image.key) + 1
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = image.laterality
    ds.Laterality = image.laterality
    ds.ViewPosition = image.view
    code, meaning = VIEW_CODES[image.view]
    view_code = Dataset()
    view_code.CodeValue = code
    view_code.CodingSchemeDesignator = "SCT"
    view_code.CodeMeaning = meaning
    ds.ViewCodeSequence = Sequence([view_code])
    ds.PatientOrientation = patient_orientation(image.laterality, image.view, image.flip_h, image.flip_v)
    ds.FieldOfViewHorizontalFlip = "YES" if "flipped" in image.variants else "NO"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.BreastImplantPresent = "NO"
    ds.PixelSpacing = [f"{image.spacing_mm:.4g}", f"{image.spacing_mm:.4g}"]
    ds.ImagerPixelSpacing = [f"{image.spacing_mm:.4g}", f"{image.spacing_mm:.4g}"]
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{image.window[0]:.1f}"
    ds.WindowWidth = f"{image.window[1]:.1f}"
    ds.VOILUTFunction = image.voi_function
    if compress and "jpeg2000" in image.variants:
        ds.compress(JPEG2000Lossless, image.stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return save_dicom(ds, path).stat().st_size


# ---------------------------------------------------------------------------------------------
# A cohort in a workspace
# ---------------------------------------------------------------------------------------------

@dataclass
class SynthSummary:
    """What :func:`synthesize` did, with the measured costs."""

    patients: int = 0
    images: int = 0
    skipped: int = 0                   # already in the catalog from an earlier run
    birads0_images: int = 0
    lesions_ground_truth: int = 0
    lesions_annotated: int = 0
    ellipses_missed: int = 0           # drawn on a copy but not found again (should stay 0)
    variants: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    seconds: dict[str, float] = field(default_factory=dict)   # totals per stage

    def to_dict(self) -> dict[str, Any]:
        per_image = {k: v / self.images for k, v in self.seconds.items()} if self.images else {}
        return {"patients": self.patients, "images": self.images, "skipped": self.skipped,
                "birads0_images": self.birads0_images, "lesions_ground_truth": self.lesions_ground_truth,
                "lesions_annotated": self.lesions_annotated, "ellipses_missed": self.ellipses_missed,
                "variants": dict(self.variants), "bytes_written": self.bytes_written,
                "mean_bytes_per_image": self.bytes_written / self.images if self.images else 0,
                "seconds_per_image": per_image}

    def to_text(self) -> str:
        d = self.to_dict()
        per = ", ".join(f"{k} {v:.2f}" for k, v in d["seconds_per_image"].items())
        return (f"{self.patients} patients, {self.images} images written ({self.skipped} already there), "
                f"{self.birads0_images} BI-RADS 0 images; lesions: {self.lesions_ground_truth} ground truth, "
                f"{self.lesions_annotated} from annotated copies ({self.ellipses_missed} ellipses missed); "
                f"variants {d['variants'] or 'none'}; {self.bytes_written / 1e6:.1f} MB of DICOM "
                f"({d['mean_bytes_per_image'] / 1e6:.1f} MB/image); seconds per image: {per}")


def patient_split(seed: int, index: int) -> str:
    """The 8:1:1 split of patient ``index`` of cohort ``seed``: a function of (seed, index) only, so the
    test-split patients of a cohort can be rebuilt alone in any workspace."""
    from workspace.base.catalog import split_for

    return split_for(f"{seed}:{index}", salt="synthetic:")


def dicom_path(ws: Workspace, seed: int, index: int, key: str) -> Path:
    """Where patient ``index`` of cohort ``seed`` keeps image ``key`` (no identifiers in the path)."""
    return ws.dicom_dir / DATASET / f"seed{seed}" / f"patient{index:06d}" / f"{key}.dcm"


def _match(ellipses: list[dict], found: list[dict]) -> list[tuple[int, dict]]:
    """Pair each found ellipse with the nearest drawn one (greedy by centre distance)."""
    pairs, used = [], set()
    for f in found:
        best = min((i for i in range(len(ellipses)) if i not in used),
                   key=lambda i: math.hypot(ellipses[i]["cx"] - f["cx"], ellipses[i]["cy"] - f["cy"]), default=None)
        if best is not None:
            used.add(best)
            pairs.append((best, f))
    return pairs


def _continuous(e: dict[str, float]) -> dict[str, float]:
    """Pixel-index centre to the catalog's continuous coordinates (pixel i spans [i, i + 1))."""
    return {"cx": round(e["cx"] + 0.5, 2), "cy": round(e["cy"] + 0.5, 2), "rx": round(e["rx"], 2),
            "ry": round(e["ry"], 2), "angle": round(e["angle"] % 180.0, 2)}


def synthesize(ws: Workspace, n_patients: int, *, seed: int = 0, first_patient: int = 0,
               image_shape: tuple[int, int] | None = None, variants: bool = True,
               birads0_fraction: float = 0.5) -> SynthSummary:
    """Make patients ``first_patient .. first_patient + n_patients - 1`` of cohort ``seed`` in ``ws``.

    Writes MG DICOMs under ``ws.dicom_dir/synthetic/``, imports them with
    :func:`workspace.data.ingest.register_dicom` (dataset ``"synthetic"``), writes the exact masks
    (``derived/masks/<image_id>-<n>.png``, original orientation, full size) and, for BI-RADS 0 images,
    the annotated copy (``derived/annotated/<image_id>.png``), and records lesions: ``ground_truth``
    (every finding, benign ones included, geometry ``mask`` with its bbox) and ``annotated_copy``
    (each white ellipse found on the copy by :func:`detect_ellipses`, mapped to full resolution).
    Images already in the catalog are skipped, so a re-run is cheap.
    """
    from workspace.base.catalog import open_catalog
    from workspace.data import ingest

    if n_patients < 1:
        raise SynthError(f"--patients must be at least 1, got {n_patients}")
    if first_patient < 0:
        raise SynthError(f"--first-patient must be >= 0, got {first_patient}")
    shape = tuple(image_shape) if image_shape else FULL_SHAPE
    if len(shape) != 2 or shape[0] < 256 or shape[1] < 200:
        raise SynthError(f"image shape must be at least 256 x 200 (rows x cols), got {shape}")
    if not 0.0 <= birads0_fraction <= 1.0:
        raise SynthError(f"birads0_fraction must be within [0, 1], got {birads0_fraction}")
    ws.ensure()
    db = open_catalog(ws)
    summary = SynthSummary()
    seconds = summary.seconds
    for index in progress(range(first_patient, first_patient + n_patients), total=n_patients,
                          desc="synthetic patients", unit="patient"):
        plan = plan_patient(seed, index, birads0_fraction=birads0_fraction, variants=variants)
        summary.patients += 1
        for key in IMAGE_KEYS:
            path = dicom_path(ws, seed, index, key)
            if path.exists() and db.execute("SELECT 1 FROM images WHERE source_path = ?",
                                            [ingest.stored_path(ws, path)]).fetchone():
                summary.skipped += 1
                continue
            t = time.perf_counter()
            image = make_image(plan, key, shape)
            t1 = time.perf_counter()
            size = write_dicom(path, plan, image)
            t2 = time.perf_counter()
            image_id = ingest.register_dicom(ws, db, path, dataset=DATASET, patient_source_id=plan.patient_id,
                                             split=patient_split(seed, index), birads=image.birads,
                                             density=plan.density)  # label: ingest's BI-RADS rule
            t3 = time.perf_counter()
            _record_lesions(ws, db, image_id, image, summary)
            t4 = time.perf_counter()
            for name, dt in (("render", t1 - t), ("write_dicom", t2 - t1), ("register", t3 - t2),
                             ("lesions", t4 - t3)):
                seconds[name] = seconds.get(name, 0.0) + dt
            summary.images += 1
            summary.bytes_written += size
            summary.birads0_images += image.birads == "0"
            for v in image.variants:
                summary.variants[v] = summary.variants.get(v, 0) + 1
    return summary


def _record_lesions(ws: Workspace, db, image_id: str, image: SynthImage, summary: SynthSummary) -> None:
    from workspace.data import ingest

    rows, cols = image.stored.shape
    for n, f in enumerate(image.findings):
        full = f.full_mask((rows, cols))
        mask_file = ws.masks_dir / f"{image_id}-{n}.png"
        ingest.write_png(full, mask_file)
        ys, xs = np.nonzero(f.mask)
        bbox = [int(f.x0 + xs.min()), int(f.y0 + ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        ingest.add_lesion(db, image_id, kind=f.spec.kind, geometry_type="mask",
                          geometry={"bbox": bbox, "area": int(f.mask.sum())}, pathology=f.spec.pathology,
                          source="ground_truth", mask_path=mask_file,
                          attributes={"finding": f.spec.subtype, "index": n, "contrast": round(f.spec.contrast, 4),
                                      "size_mm": round(f.spec.size_mm, 2)})
        summary.lesions_ground_truth += 1
    if image.annotated is None:
        return
    copy_file = ws.annotated_dir / f"{image_id}.png"
    ingest.write_png(image.annotated, copy_file)
    db.execute("UPDATE images SET annotated_path = ? WHERE image_id = ?", [ingest.stored_path(ws, copy_file), image_id])
    malignant = [n for n, f in enumerate(image.findings) if f.spec.pathology == "malignant"]
    found = detect_ellipses(image.annotated)  # the copy as written (PNG is lossless)
    summary.ellipses_missed += max(0, len(image.ellipses) - len(found))
    for drawn_index, e in _match(image.ellipses, found):
        finding = image.findings[malignant[drawn_index]]
        geometry = _continuous(copy_to_full(e, image.annotated_factor))
        ingest.add_lesion(db, image_id, kind=finding.spec.kind, geometry_type="ellipse", geometry=geometry,
                          pathology="unknown", source="annotated_copy",
                          attributes={"copy_factor": image.annotated_factor, "copy_ellipse":
                                      {k: round(v, 2) for k, v in e.items()}})
        summary.lesions_annotated += 1


# ---------------------------------------------------------------------------------------------
# A picture of a few patients (docs, sanity checks)
# ---------------------------------------------------------------------------------------------

def cohort_picture(path: str | Path, patients: list[int], *, seed: int = 0,
                   image_shape: tuple[int, int] = FULL_SHAPE, reduce: int = 8) -> Path:
    """A PNG grid: one row per patient, views as hung (RCC LCC RMLO LMLO, as stored), windowed, with
    the exact finding outlines (red: malignant, green: benign) and the annotated-copy ellipses (yellow).

    ``docs/img/synthetic_cohort.png`` is ``cohort_picture("docs/img/synthetic_cohort.png", [3, 55, 5, 12])``."""
    from PIL import ImageDraw

    tiles = []
    for index in patients:
        plan = plan_patient(seed, index)
        for key in ("RCC", "LCC", "RMLO", "LMLO"):
            image = make_image(plan, key, image_shape)
            maxval = 2 ** image.bits_stored - 1
            values = image.stored.astype(np.float32)
            wc, ww = image.window
            if image.photometric == "MONOCHROME1":
                values, wc = maxval - values, maxval - wc
            grey = (np.clip((values - (wc - ww / 2)) / ww, 0, 1) * 255).astype(np.uint8)
            small = np.asarray(Image.fromarray(grey).reduce(reduce))
            rgb = np.repeat(small[:, :, None], 3, axis=2).copy()
            for f in image.findings:
                m = np.asarray(Image.fromarray(f.full_mask(image.stored.shape).astype(np.uint8) * 255).reduce(reduce)) > 0
                edge = ndi.binary_dilation(m, iterations=2) & ~m
                rgb[edge] = (255, 40, 40) if f.spec.pathology == "malignant" else (40, 220, 40)
            tile = Image.fromarray(rgb)
            draw = ImageDraw.Draw(tile)
            for e in image.ellipses:
                c = full_to_copy(e, reduce)
                box = [c["cx"] - c["rx"], c["cy"] - c["rx"], c["cx"] + c["rx"], c["cy"] + c["rx"]]
                draw.ellipse(box, outline=(255, 220, 0))
            subtypes = ",".join(sorted({f.spec.subtype for f in image.findings})) or "normal"
            draw.text((6, 6), f"patient {index} {key} BI-RADS {image.birads} density {plan.density}",
                      fill=(255, 255, 255))
            draw.text((6, 20), subtypes.replace("_", " "), fill=(255, 255, 255))
            tiles.append(tile)
    w, h = tiles[0].size
    sheet = Image.new("RGB", (w * 4 + 12, h * len(patients) + 4 * (len(patients) - 1)), (40, 40, 40))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % 4) * (w + 4), (i // 4) * (h + 4)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
