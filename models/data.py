"""What training and evaluation read: labelled patches with their split and patient.

:class:`PatchData` wraps a workspace patch set (``workspace.data.patches.open_patch_set``) or plain arrays
(tests, notebooks) behind one small interface: ``labels``, ``splits``, ``groups`` (patient ids) and
``patch_ids`` per position, and ``batch(positions) -> float32 (B, 1, S, S)`` intensities in [0, 1].
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workspace.base.errors import MammoError


@dataclass
class PatchData:
    name: str
    digest: str
    size: int
    labels: np.ndarray  # (N,) int64: 1 lesion ("possibly malignant"), 0 normal
    splits: np.ndarray  # (N,) str: train | val | test
    groups: np.ndarray  # (N,) str: patient ids (bootstrap clusters)
    patch_ids: np.ndarray  # (N,) int64
    fetch: Callable[[np.ndarray], torch.Tensor] = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)
    boxes: np.ndarray | None = None  # (N, 3) int: x, y, size in the source image (normalised orientation)
    origins: list[tuple[int, int, str] | None] | None = None  # synthetic (seed, patient, image key) or None

    def __len__(self) -> int:
        return len(self.labels)

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def batch(self, positions: np.ndarray) -> torch.Tensor:
        """float32 (B, 1, S, S) in [0, 1] for the given positions (in that order)."""
        return self.fetch(np.asarray(positions, dtype=np.int64))

    def split_counts(self) -> dict[str, dict[str, int]]:
        """Patients and patches (lesion / normal) per split: recorded in the checkpoint."""
        out = {}
        for split in ("train", "val", "test"):
            idx = self.indices(split)
            out[split] = {"patches": int(len(idx)), "lesion": int(self.labels[idx].sum()),
                          "normal": int(len(idx) - self.labels[idx].sum()),
                          "patients": int(len(np.unique(self.groups[idx])))}
        return out

    @classmethod
    def from_arrays(cls, pixels: np.ndarray, labels: Any, splits: Any, groups: Any = None, *,
                    name: str = "memory", info: dict | None = None) -> PatchData:
        """Patches in memory: ``pixels`` (N, S, S) float in [0, 1] or uint16 (scaled by 65535)."""
        pixels = np.asarray(pixels)
        if pixels.ndim != 3 or pixels.shape[1] != pixels.shape[2]:
            raise MammoError(f"patch pixels must be (N, S, S), got {pixels.shape}")
        n = len(pixels)
        groups = np.arange(n).astype(str) if groups is None else np.asarray(groups).astype(str)
        digest = hashlib.sha1(pixels.tobytes() + np.asarray(labels).tobytes()).hexdigest()[:16]

        def fetch(positions: np.ndarray) -> torch.Tensor:
            x = pixels[positions]
            x = x.astype(np.float32) / 65535.0 if x.dtype == np.uint16 else x.astype(np.float32)
            return torch.from_numpy(x[:, None])

        return cls(name=name, digest=digest, size=int(pixels.shape[1]),
                   labels=np.asarray(labels, dtype=np.int64), splits=np.asarray(splits).astype(str),
                   groups=groups, patch_ids=np.arange(n, dtype=np.int64), fetch=fetch, info=info or {})

    @classmethod
    def from_patch_set(cls, ws: Any, name: str = "default") -> PatchData:
        """A workspace patch set (``mammo patches``), with each patch's patient from the catalog."""
        from workspace.base.catalog import open_catalog
        from workspace.data import patches

        patch_set = patches.open_patch_set(ws, name)
        rows = sorted(patch_set.rows, key=lambda r: r["array_index"])
        if not rows:
            raise MammoError(f"patch set {name!r} is empty")
        if any(r["label"] not in (0, 1) for r in rows):
            raise MammoError(f"patch set {name!r} holds unlabelled patches (a tissue grid): it serves dissection, "
                             "not training or evaluation; build a labelled one with `mammo patches`")
        db = open_catalog(ws)
        images = {r["image_id"]: r for r in db.query("SELECT image_id, patient_id, source_path, rows, cols, dataset "
                                                     "FROM images")}
        array_index = np.array([r["array_index"] for r in rows], dtype=np.int64)

        def fetch(positions: np.ndarray) -> torch.Tensor:
            return patch_set.batch(array_index[positions])

        origins = [synthetic_origin(images[r["image_id"]]["source_path"]) for r in rows]
        shapes = {tuple(images[r["image_id"]][k] for k in ("rows", "cols")) for r in rows}
        info: dict[str, Any] = {"patch_set": name, "image_shape": list(shapes.pop()) if len(shapes) == 1 else None,
                                "datasets": sorted({images[r["image_id"]]["dataset"] for r in rows})}
        known = [o for o in origins if o is not None]
        if known:
            info["synthetic"] = {"seeds": sorted({o[0] for o in known}),
                                 "patients": [min(o[1] for o in known), max(o[1] for o in known) + 1]}
        return cls(name=name, digest=str(patch_set.digest), size=int(patch_set.size),
                   labels=np.array([r["label"] for r in rows], dtype=np.int64),
                   splits=np.array([r["split"] for r in rows]).astype(str),
                   groups=np.array([images[r["image_id"]]["patient_id"] for r in rows]).astype(str),
                   patch_ids=np.array([r["patch_id"] for r in rows], dtype=np.int64), fetch=fetch, info=info,
                   boxes=np.array([[r["x"], r["y"], r["size"]] for r in rows], dtype=np.int64), origins=origins)

    def recorded_split(self, split: str = "test") -> dict | None:
        """How to rebuild ``split`` elsewhere: the synthetic image of each patch and its box, plus a digest of
        the pixels; None unless every patch of the split comes from the synthetic generator."""
        idx = self.indices(split)
        if self.origins is None or self.boxes is None or len(idx) == 0:
            return None
        if any(self.origins[i] is None for i in idx):
            return None
        seeds = {self.origins[i][0] for i in idx}
        if len(seeds) != 1:
            return None
        patches = [[int(self.origins[i][1]), self.origins[i][2], int(self.boxes[i][0]), int(self.boxes[i][1]),
                    int(self.labels[i])] for i in idx]
        from workspace.data.synth import GENERATOR_VERSION

        return {"split": split, "generator": "workspace.data.synth", "generator_version": GENERATOR_VERSION,
                "seed": seeds.pop(), "size": self.size,
                "image_shape": self.info.get("image_shape"),
                "columns": ["patient", "image_key", "x", "y", "label"], "patches": patches,
                "pixel_digest": pixel_digest(self, idx),
                "pixel_fingerprint": encode_fingerprint(pixel_fingerprint(self, idx))}


ORIGIN_PATTERN = re.compile(r"(?:^|/)synthetic/seed(\d+)/patient(\d+)/([A-Z]+)\.dcm$")


def synthetic_origin(source_path: str) -> tuple[int, int, str] | None:
    """(seed, patient index, image key) of a file written by ``workspace.data.synth``, else None."""
    match = ORIGIN_PATTERN.search(str(source_path).replace("\\", "/"))
    return (int(match.group(1)), int(match.group(2)), match.group(3)) if match else None


def pixel_digest(data: PatchData, positions: np.ndarray) -> str:
    """sha1 (16 hex) of the patches' uint16 pixels, in the given order."""
    h = hashlib.sha1()
    for start in range(0, len(positions), 32):
        x = data.batch(positions[start:start + 32]).numpy()
        h.update(np.rint(x * 65535).astype(np.uint16).tobytes())
    return h.hexdigest()[:16]


# A redrawn patch is "the same" when every 32 x 32 block's mean is within one grey level (of 65535) of the
# recorded one. Not bit equality: the generator's float32 transcendentals (numpy's exp/sin/arctan...) take
# CPU-specific SIMD paths, so on another x86-64 CPU a few pixels in 100,000 land one stored grey level apart
# (measured with numpy's AVX-512 switched off: 0.002-0.005 % of pixels, 1/4095 each). Any real change of
# what the generator draws moves some block by far more than one grey level.
FINGERPRINT_BLOCK = 32
FINGERPRINT_TOLERANCE = 1.0  # grey levels (of 65535) of a block mean


def pixel_fingerprint(data: PatchData, positions: np.ndarray, block: int = FINGERPRINT_BLOCK) -> np.ndarray:
    """Sums of the patches' uint16 pixels over ``block x block`` blocks: uint64 (N, S/block, S/block)."""
    n, size = len(positions), data.size
    if size % block:
        raise ValueError(f"patch size {size} is not a multiple of the fingerprint block {block}")
    sums = np.zeros((n, size // block, size // block), dtype=np.uint64)
    for start in range(0, n, 32):
        x = np.rint(data.batch(positions[start:start + 32]).numpy()[:, 0] * 65535).astype(np.uint64)
        sums[start:start + len(x)] = x.reshape(len(x), size // block, block, size // block, block).sum((2, 4))
    return sums


def encode_fingerprint(sums: np.ndarray, block: int = FINGERPRINT_BLOCK) -> dict:
    """A fingerprint as JSON: block size, shape and the sums (uint32, zlib, base64)."""
    raw = zlib.compress(np.ascontiguousarray(sums, dtype="<u4").tobytes(), 9)
    return {"block": block, "shape": list(sums.shape), "sums": base64.b64encode(raw).decode("ascii")}


def decode_fingerprint(encoded: dict) -> np.ndarray:
    raw = zlib.decompress(base64.b64decode(encoded["sums"]))
    return np.frombuffer(raw, dtype="<u4").reshape(encoded["shape"]).astype(np.uint64)


def compare_to_recorded(data: PatchData, positions: np.ndarray, recorded: dict) -> dict:
    """Whether redrawn patches are the recorded ones: ``accepted`` by the fingerprint rule above (by the
    digest alone when the record has no fingerprint), ``bit_identical``, ``max_block_difference`` (grey
    levels) and ``blocks_differing`` (share)."""
    result = {"bit_identical": pixel_digest(data, positions) == recorded["pixel_digest"],
              "max_block_difference": None, "blocks_differing": None}
    encoded = recorded.get("pixel_fingerprint")
    if encoded is None:
        return {**result, "accepted": result["bit_identical"], "rule": "pixel digest (no fingerprint recorded)"}
    block = int(encoded["block"])
    ours = pixel_fingerprint(data, positions, block)
    theirs = decode_fingerprint(encoded)
    if ours.shape != theirs.shape:
        return {**result, "accepted": False, "rule": f"shape {list(ours.shape)} != recorded {list(theirs.shape)}"}
    diff = np.abs(ours.astype(np.int64) - theirs.astype(np.int64)) / float(block * block)
    result.update(max_block_difference=float(diff.max()), blocks_differing=float((diff > 0).mean()))
    return {**result, "accepted": result["max_block_difference"] <= FINGERPRINT_TOLERANCE,
            "rule": f"every {block} x {block} block mean within {FINGERPRINT_TOLERANCE:g} grey level of 65535"}


def rebuild_recorded_split(recorded: dict, *, birads0_fraction: float = 0.5, variants: bool = True,
                           folder: str | os.PathLike | None = None) -> PatchData:
    """Rebuild a recorded synthetic split (see :meth:`PatchData.recorded_split`) from the generator alone.

    Only the images that hold a recorded patch are drawn (patient ``k`` depends only on (seed, k)); each is
    written as a DICOM file (in ``folder``, default a temporary one; the JPEG 2000 variant uncompressed, as its
    compression is lossless) and read back through :func:`workspace.data.dicom_io.read_dicom` in its normalised
    orientation, as ingest reads it; the patches are cut from those model pixels, in the recorded order and all
    in ``recorded["split"]``.
    :func:`compare_to_recorded` tells whether the generator still draws the recorded pixels.
    """
    import tempfile

    from workspace.base.progress import progress
    from workspace.data import dicom_io, synth

    version = int(recorded.get("generator_version", 1))
    if version != synth.GENERATOR_VERSION:
        raise MammoError(f"the split was recorded with synthetic generator version {version}; this one is "
                         f"version {synth.GENERATOR_VERSION} and draws other pixels, so it cannot be rebuilt")
    seed, size, shape = int(recorded["seed"]), int(recorded["size"]), recorded.get("image_shape")
    by_image: dict[tuple[int, str], list[int]] = {}
    for i, (patient, key, *_rest) in enumerate(recorded["patches"]):
        by_image.setdefault((int(patient), str(key)), []).append(i)
    n = len(recorded["patches"])
    pixels = np.zeros((n, size, size), dtype=np.uint16)
    groups = np.empty(n, dtype=object)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for (patient, key), members in progress(sorted(by_image.items()), desc="rebuilding images", unit="image"):
            plan = synth.plan_patient(seed, patient, birads0_fraction=birads0_fraction, variants=variants)
            image = synth.make_image(plan, key, tuple(shape) if shape else synth.FULL_SHAPE)
            path = Path(tmp) / f"{patient}-{key}.dcm"
            synth.write_dicom(path, plan, image, compress=False)
            model = dicom_io.read_dicom(path, orientation=(image.flip_h, image.flip_v)).model_pixels()
            path.unlink()
            for i in members:
                x, y = int(recorded["patches"][i][2]), int(recorded["patches"][i][3])
                if not (0 <= x <= model.shape[1] - size and 0 <= y <= model.shape[0] - size):
                    raise MammoError(f"recorded patch {i} at x={x}, y={y} does not fit the {model.shape[0]} x "
                                     f"{model.shape[1]} image {patient}-{key}")
                pixels[i] = np.rint(np.clip(model[y:y + size, x:x + size], 0, 1) * 65535).astype(np.uint16)
                groups[i] = f"seed{seed}-patient{patient}"
    labels = np.array([int(p[4]) for p in recorded["patches"]], dtype=np.int64)
    return PatchData.from_arrays(pixels, labels, [recorded["split"]] * n, groups.astype(str),
                                 name=f"recorded-{recorded['split']}", info={"rebuilt_from": "recorded split",
                                                                              "seed": seed})


__all__ = ["PatchData", "synthetic_origin", "pixel_digest", "pixel_fingerprint", "encode_fingerprint",
           "decode_fingerprint", "compare_to_recorded", "rebuild_recorded_split", "FINGERPRINT_BLOCK",
           "FINGERPRINT_TOLERANCE"]
