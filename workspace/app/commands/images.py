"""``mammo images``: list the images in the catalog (pseudonymous ids only)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the CLI imports its heavy parts late
    import sqlite_utils

ORDER = 22

COLUMNS = ("image_id", "dataset", "laterality", "view", "size", "split", "label")

INFERRED_MARK = "*"
INFERRED_NOTE = f"{INFERRED_MARK} inferred from the file's text (no ViewPosition/ImageLaterality)"


def _label(row: dict) -> str:
    parts = []
    if row["birads"] is not None:
        parts.append(f"BI-RADS {row['birads']}")
    if row["label"] is not None:
        parts.append("possibly malignant" if row["label"] == 1 else "normal/benign")
    return ", ".join(parts) or "-"


def image_table(db: sqlite_utils.Database, *, dataset: str | None = None, split: str | None = None, limit: int | None = None) -> list[dict]:
    """The rows ``mammo images`` prints, as dicts with the keys of :data:`COLUMNS` and ``inferred`` (the
    columns whose value was read from the file's text; they carry :data:`INFERRED_MARK`, e.g. ``CC*``)."""
    where, params = [], []
    if dataset:
        where.append("dataset = ?")
        params.append(dataset)
    if split:
        where.append("split = ?")
        params.append(split)
    sql = ("SELECT image_id, dataset, laterality, view, inferred, rows, cols, split, birads, label FROM images"
           + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY dataset, created_at, image_id")
    if limit:
        sql += f" LIMIT {int(limit)}"
    rows = []
    for r in db.query(sql, params):
        inferred = sorted(k for k in json.loads(r["inferred"] or "{}") if k in ("laterality", "view") and r[k])
        rows.append({"image_id": r["image_id"], "dataset": r["dataset"],
                     **{k: (r[k] or "-") + (INFERRED_MARK if k in inferred else "") for k in ("laterality", "view")},
                     "size": f"{r['cols']}x{r['rows']}", "split": r["split"] or "-", "label": _label(r),
                     "inferred": inferred})
    return rows


def _run(args: argparse.Namespace) -> int:
    from workspace.base.catalog import open_catalog
    from workspace.base.config import Workspace

    ws = Workspace.open(args.workspace)
    rows = image_table(open_catalog(ws), dataset=args.dataset, split=args.split, limit=args.limit)
    if not rows:
        print("no images in the catalog (add some with `mammo import PATH` or `mammo synth`)")
        return 0
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in COLUMNS).rstrip())
    print(f"{len(rows)} image(s)")
    if any(r["inferred"] for r in rows):
        print(INFERRED_NOTE)
    return 0


def add_parser(subparsers, parents) -> None:
    parser = subparsers.add_parser("images", parents=parents, help="list the images in the catalog",
                                   description="List catalog images: id, dataset, laterality, view, size "
                                               "(columns x rows), split and label.")
    parser.add_argument("--dataset", metavar="NAME", help="only this dataset")
    parser.add_argument("--split", choices=("train", "val", "test"), help="only this split")
    parser.add_argument("--limit", type=int, metavar="N", help="at most N rows")
    parser.set_defaults(func=_run)
