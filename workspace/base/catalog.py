"""The workspace catalog: open it, and the small helpers every importer and reader shares.

The schema itself lives in :mod:`workspace.base.schema`; this module adds pseudonyms and common lookups.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import sqlite_utils

from workspace.base.config import Workspace
from workspace.base.errors import CatalogError
from workspace.base.schema import connect, utc_now

SPLITS = ("train", "val", "test")


def open_catalog(ws: Workspace) -> sqlite_utils.Database:
    """The workspace's catalog, schema up to date."""
    return connect(ws.catalog_path)


def json_default(value: Any, *, lenient: bool = False) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays (anything with ``tolist()``); other types
    raise, or become text when ``lenient`` (for storing raw events whatever a client sent)."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    if lenient:
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


PSEUDONYM_KEY_ENV = "MAMMO_PSEUDONYM_KEY"


def _secret(ws: Workspace) -> bytes:
    """A per-workspace key for pseudonyms, so ids cannot be reversed by hashing known identifiers.

    Made once, when the workspace's first pseudonym is: random, or ``$MAMMO_PSEUDONYM_KEY`` where a site
    wants the same pseudonyms in several workspaces (and tests want the same ids on every run). A key
    already written is never replaced: every id in the catalog depends on it."""
    path = ws.root / ".pseudonym-key"
    if not path.exists():
        site_key = os.environ.get(PSEUDONYM_KEY_ENV)
        if site_key is not None and len(site_key.strip()) < 16:
            raise CatalogError(f"${PSEUDONYM_KEY_ENV} must be at least 16 characters (a secret, not a label)")
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(site_key.strip().encode() if site_key else os.urandom(32).hex().encode())
        os.replace(tmp, path)
    return path.read_bytes()


def pseudonym(ws: Workspace, kind: str, *parts: str, length: int = 12) -> str:
    """A stable pseudonymous id such as ``P-3f9a1c0b2d4e`` (kind ``P``) for identifying text parts."""
    digest = hmac.new(_secret(ws), "\x1f".join([kind, *parts]).encode(), hashlib.sha256).hexdigest()
    return f"{kind}-{digest[:length]}"


def split_for(patient_id: str, ratios: tuple[int, int, int] = (8, 1, 1), salt: str = "") -> str:
    """The 8:1:1 patient-level split, a pure function of the pseudonym (stable as patients are added)."""
    h = int(hashlib.sha256(f"{salt}{patient_id}".encode()).hexdigest()[:8], 16) % sum(ratios)
    if h < ratios[0]:
        return "train"
    if h < ratios[0] + ratios[1]:
        return "val"
    return "test"


def geometry_key(kind: str, geometry_type: str, geometry: Any) -> str:
    blob = json.dumps([kind, geometry_type, geometry], sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def file_sha1(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def get_image(db: sqlite_utils.Database, image_id: str) -> dict:
    """One image row, or a :class:`CatalogError` naming the unknown id."""
    rows = list(db.query("SELECT * FROM images WHERE image_id = ?", [image_id]))
    if not rows:
        raise CatalogError(f"no image {image_id!r} in the catalog (see `mammo images` for the ids)")
    return rows[0]


def complete_runs(db: sqlite_utils.Database, model_digest: str | None = None,
                  layer: str | None = None) -> list[dict]:
    """Complete dissection runs (optionally of one model and layer), newest first: the one rule every
    caller (backend, FiftyOne, reports, concepts, CLI) uses for "the newest run"."""
    sql, params = "SELECT * FROM dissection_runs WHERE status = 'complete'", []
    if model_digest:
        sql, params = sql + " AND model_digest = ?", [*params, model_digest]
    if layer:
        sql, params = sql + " AND layer = ?", [*params, layer]
    return list(db.query(sql + " ORDER BY COALESCE(finished_at, created_at) DESC, run_id", params))


def lesions_of(db: sqlite_utils.Database, image_id: str) -> list[dict]:
    rows = db.query("SELECT * FROM lesions WHERE image_id = ? ORDER BY lesion_id", [image_id])
    return [dict(r, geometry=json.loads(r["geometry"])) for r in rows]


__all__ = ["SPLITS", "PSEUDONYM_KEY_ENV", "json_default", "open_catalog", "pseudonym", "split_for", "geometry_key", "file_sha1",
           "get_image", "lesions_of", "complete_runs", "utc_now"]
