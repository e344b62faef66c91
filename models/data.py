"""What training and evaluation read: labelled patches with their split and patient.

:class:`PatchData` wraps a workspace patch set (``workspace.patches.open_patch_set``) or plain arrays
(tests, notebooks) behind one small interface: ``labels``, ``splits``, ``groups`` (patient ids) and
``patch_ids`` per position, and ``batch(positions) -> float32 (B, 1, S, S)`` intensities in [0, 1].
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from workspace.errors import MammoError


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
        try:
            from workspace import patches
        except ImportError:  # pragma: no cover - until the patch extractor lands
            raise MammoError("this workspace has no patch extractor (workspace/patches.py)") from None
        from workspace.catalog import open_catalog

        patch_set = patches.open_patch_set(ws, name)
        rows = sorted(patch_set.rows, key=lambda r: r["array_index"])
        if not rows:
            raise MammoError(f"patch set {name!r} is empty")
        db = open_catalog(ws)
        patient_of = {r["image_id"]: r["patient_id"]
                      for r in db.query("SELECT image_id, patient_id FROM images")}
        info_row = next(db.query("SELECT * FROM patch_sets WHERE patch_set = ?", [name]), None)
        array_index = np.array([r["array_index"] for r in rows], dtype=np.int64)

        def fetch(positions: np.ndarray) -> torch.Tensor:
            return patch_set.batch(array_index[positions])

        digest = getattr(patch_set, "digest", None) or (info_row or {}).get("digest", "")
        info = {"patch_set": name, "image_ids": sorted({r["image_id"] for r in rows})}
        synthetic = _synthetic_range(db)
        if synthetic:
            info["synthetic"] = synthetic
        return cls(name=name, digest=str(digest), size=int(patch_set.pixels.shape[-1]),
                   labels=np.array([r["label"] for r in rows], dtype=np.int64),
                   splits=np.array([r["split"] for r in rows]).astype(str),
                   groups=np.array([patient_of.get(r["image_id"], r["image_id"]) for r in rows]).astype(str),
                   patch_ids=np.array([r["patch_id"] for r in rows], dtype=np.int64), fetch=fetch, info=info)


def _synthetic_range(db: Any) -> dict | None:
    """The synthetic cohort's generator arguments, when the workspace recorded them (else None)."""
    try:
        from workspace import synth
    except ImportError:  # pragma: no cover
        return None
    describe = getattr(synth, "describe_cohort", None)
    return describe(db) if describe else None


__all__ = ["PatchData"]
