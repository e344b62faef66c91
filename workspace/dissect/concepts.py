"""The concept store: medical concepts, the neuron labels that tie units to them, ROI queries, history.

SQLite (the workspace's ``catalog.sqlite``, tables of migration 3 in :mod:`workspace.base.schema`) is the
single source of truth that the Label Studio backend, the FiftyOne plugin and the CLI all read and
write, each from its own process. Every :class:`ConceptStore` holds its own connection.

Product decisions (keep them consistent everywhere):

- **One concept per unit.** A unit of a (model, layer) carries at most one concept. Labelling an
  already-labelled unit with another concept is a *relabel* (recorded in the history); labelling it
  with the concept it already has changes no label, and is recorded as a *confirm* only when it is a
  reader's first say for that concept on the unit (so agreement counts a second reader who agrees:
  :mod:`workspace.dissect.agreement`). Which label reports use when readers disagree is the team's
  **label rule** (:meth:`ConceptStore.rule`): the latest label (default) or the majority's.
- **Names are unique ignoring case and whitespace.** The key of a name is its words joined by one
  space, case-folded: ``" Mass "``, ``"mass"`` and ``"MASS"`` are one concept. Creating a concept
  whose key exists returns the existing concept unchanged (a merge, never an error): the first
  spelling, description and colour win.
- **Labels belong to (model_digest, layer).** Another model's (or layer's) unit 7 is another unit.
- **History is append-only** (``label_events``, guarded by triggers): every add, relabel and remove,
  with who, when, from which source and ROI query. :meth:`ConceptStore.labels_at` replays it to show
  the labels as they were at any moment; replaying up to now gives :meth:`ConceptStore.labels`.

Writes are single ``BEGIN IMMEDIATE`` transactions (a group label is all or nothing), with SQLite's
busy timeout and a bounded retry on ``SQLITE_BUSY``, so two processes labelling at once lose nothing
and a user never sees "database is locked" (after the retry budget a :class:`ConceptError` says the
store was busy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from workspace.base.config import Workspace
from workspace.base.errors import ConceptError
from workspace.base.schema import connect, utc_now

T = TypeVar("T")

SOURCES = ("labelstudio", "fiftyone", "cli", "api")
ACTIONS = ("add", "relabel", "remove", "confirm")

# Okabe & Ito's colour-blind-safe palette (black left out: it reads as "no colour" on a chart),
# ordered so that neighbours differ in lightness as well as hue.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#f0e442", "#999999")

MAX_NAME_LENGTH = 80
DEFAULT_BUSY_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 8

_COLOUR_RE = re.compile(r"^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")


# ----------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Concept:
    """A concept row; ``n_units`` is filled by :meth:`ConceptStore.list_concepts` (labelled units)."""

    concept_id: int
    name: str
    description: str | None
    colour: str
    created_by: str
    created_at: str
    n_units: int = 0

    @property
    def key(self) -> str:
        return concept_key(self.name)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NeuronLabel:
    """One current label with its provenance."""

    model_digest: str
    layer: str
    unit: int
    concept: Concept
    run_id: str | None
    labelled_by: str
    labelled_at: str
    source: str
    query_id: int | None


_PROPOSAL_COLUMNS = ("proposal_id, model_digest, layer, run_id, unit, concept, attribute, value, iou, evidence, "
                     "n_lesions, status, proposed_at, decided_by, decided_at, decided_source")


@dataclass(frozen=True)
class ProposalRow:
    """A stored concept proposal (:meth:`ConceptStore.proposals`)."""

    proposal_id: int
    model_digest: str
    layer: str
    run_id: str
    unit: int
    concept: str
    attribute: str
    value: str
    iou: float
    evidence: dict
    n_lesions: int
    status: str
    proposed_at: str
    decided_by: str | None
    decided_at: str | None
    decided_source: str | None

    def evidence_text(self) -> str:
        from workspace.dissect.proposals import evidence_text

        return evidence_text(self.iou, self.n_lesions)

    def to_text(self) -> str:
        return f"unit {self.unit}: probably {self.concept} ({self.evidence_text()})"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LabelEvent:
    """One row of the append-only history. Concepts are given by id and by name (names resolved now)."""

    event_id: int
    model_digest: str
    layer: str
    unit: int
    action: str                      # add | relabel | remove
    concept_before: int | None
    concept_after: int | None
    name_before: str | None
    name_after: str | None
    actor: str
    at: str
    query_id: int | None
    source: str
    note: str | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RoiQuery:
    """A recorded ROI query: what was asked (image, patch box, ROI geometry) and what came back."""

    query_id: int
    image_id: str | None
    patch_box: Any
    roi: dict
    model_digest: str
    layer: str
    run_id: str | None
    iou_threshold: float
    ranking: list[tuple[int, float]]   # (unit, IoU), best first
    aligned: list[int]
    asked_by: str
    asked_at: str
    source: str

    def iou_array(self, n_units: int) -> np.ndarray:
        """IoU per unit as a dense (n_units,) float32 array (units missing from the ranking: 0)."""
        iou = np.zeros(n_units, dtype=np.float32)
        for unit, value in self.ranking:
            if 0 <= unit < n_units:
                iou[unit] = value
        return iou


@dataclass(frozen=True)
class _Scope:
    model_digest: str
    layer: str
    run_id: str | None
    n_units: int | None


# ----------------------------------------------------------------------------------------- helpers
def concept_key(name: str) -> str:
    """The identity of a concept name: words joined by one space, case-folded."""
    return " ".join(str(name).split()).casefold()


def clean_name(name: Any) -> str:
    """The display form of a name (surrounding and repeated spaces removed), validated."""
    if not isinstance(name, str):
        raise ConceptError(f"a concept name must be text, not {type(name).__name__}")
    cleaned = " ".join(name.split())
    if not cleaned:
        raise ConceptError("a concept name cannot be empty")
    if len(cleaned) > MAX_NAME_LENGTH:
        raise ConceptError(f"a concept name has at most {MAX_NAME_LENGTH} characters ({len(cleaned)} given)")
    if any(ord(c) < 32 for c in cleaned):
        raise ConceptError("a concept name cannot contain control characters")
    return cleaned


def normalise_colour(colour: str) -> str:
    """``#rgb`` or ``#rrggbb`` as lower-case ``#rrggbb``."""
    if not isinstance(colour, str) or not _COLOUR_RE.match(colour.strip()):
        raise ConceptError(f"a colour is written #rrggbb (e.g. #0072b2), not {colour!r}")
    hex_part = colour.strip()[1:].lower()
    if len(hex_part) == 3:
        hex_part = "".join(c * 2 for c in hex_part)
    return "#" + hex_part


def parse_units(spec: str | int | Iterable[Any]) -> list[int]:
    """Unit indices from ints or text such as ``"3,5,10-12"``; sorted, without duplicates.

    Rejects negatives, non-integers and booleans with a :class:`ConceptError`.
    """
    if isinstance(spec, str):
        units: list[int] = []
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not match:
                raise ConceptError(f"cannot read unit {part!r}: write units as 3,5,10-12")
            low = int(match.group(1))
            high = int(match.group(2)) if match.group(2) else low
            if high < low:
                raise ConceptError(f"unit range {part!r} runs backwards")
            units.extend(range(low, high + 1))
        return sorted(set(units))
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        spec = [spec]
    units = []
    for value in spec:  # type: ignore[union-attr]
        if isinstance(value, (bool, np.bool_)):
            raise ConceptError(f"unit {value!r} is not an index")
        if isinstance(value, (int, np.integer)):
            unit = int(value)
        elif isinstance(value, (float, np.floating)) and float(value).is_integer():
            unit = int(value)
        else:
            raise ConceptError(f"unit {value!r} is not an index")
        if unit < 0:
            raise ConceptError(f"unit {unit} is negative")
        units.append(unit)
    return sorted(set(units))


def _as_time(when: str | datetime) -> str:
    """A moment in the format of the time columns (ISO 8601 UTC, milliseconds, ``Z``)."""
    if isinstance(when, datetime):
        moment = when if when.tzinfo else when.replace(tzinfo=UTC)
    else:
        try:
            moment = datetime.fromisoformat(str(when).strip().replace("Z", "+00:00"))
        except ValueError as error:
            raise ConceptError(f"cannot read the time {when!r}: use ISO 8601, e.g. 2024-05-01T12:00:00Z") from error
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _is_busy(error: BaseException) -> bool:
    if isinstance(error, sqlite3.OperationalError):
        text = str(error).lower()
        return "locked" in text or "busy" in text
    return False


def encode_roi(mask: np.ndarray) -> dict:
    """A boolean ROI mask as JSON-able geometry: shape, bounding box [x, y, w, h], area and a
    run-length code of the bounding box's pixels in row-major order (first run: zeros). Computed on the
    bounding box only: a full mammogram's mask is millions of pixels, an ROI a few thousand."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ConceptError(f"an ROI mask is 2-D, not of shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return {"type": "mask", "shape": list(mask.shape), "bbox": None, "area": 0, "rle": []}
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(mask[y0:y1].any(axis=0))
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    flat = mask[y0:y1, x0:x1].ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"type": "mask", "shape": list(mask.shape), "bbox": [x0, y0, x1 - x0, y1 - y0],
            "area": int(np.count_nonzero(flat)), "rle": runs}


def decode_roi(geometry: dict) -> np.ndarray:
    """The inverse of :func:`encode_roi` (a ``box`` geometry ``{"type": "box", "shape", "bbox"}`` too)."""
    shape = tuple(geometry["shape"])
    mask = np.zeros(shape, dtype=bool)
    bbox = geometry.get("bbox")
    if not bbox:
        return mask
    x, y, w, h = (int(v) for v in bbox)
    if geometry.get("type") == "box":
        mask[y:y + h, x:x + w] = True
        return mask
    values = np.zeros(w * h, dtype=bool)
    position, on = 0, False
    for run in geometry["rle"]:
        values[position:position + run] = on
        position += run
        on = not on
    mask[y:y + h, x:x + w] = values.reshape(h, w)
    return mask


def _concept_from_row(row: Sequence[Any], n_units: int = 0) -> Concept:
    return Concept(concept_id=row[0], name=row[1], description=row[2], colour=row[3],
                   created_by=row[4], created_at=row[5], n_units=n_units)


_CONCEPT_COLUMNS = "concept_id, name, description, colour, created_by, created_at"


# ------------------------------------------------------------------------------------------- store
class ConceptStore:
    """Concepts, neuron labels, ROI queries and the label history of one workspace.

    ``ConceptStore(ws)`` or ``ConceptStore(path_to_sqlite)``. Holds its own connection (open one
    store per process; a store may be shared by the threads of one process). ``busy_timeout_s`` is
    how long SQLite waits for another writer per attempt; ``retries`` bounds the further attempts
    (with a short random back-off) before a :class:`ConceptError` says the store is busy.
    """

    def __init__(self, where: Workspace | str | Path, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES):
        path = where.catalog_path if isinstance(where, Workspace) else Path(where)
        self.path = path
        self.busy_timeout_s = float(busy_timeout_s)
        self.retries = int(retries)
        self.db = self._open(path)
        self._conn = self.db.conn
        self._conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        self._lock = threading.RLock()

    def _open(self, path: Path):
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            try:
                return connect(path)
            except sqlite3.OperationalError as error:  # a migration racing another process
                if not _is_busy(error):
                    raise
                last = error
                time.sleep(0.05 * (attempt + 1))
        raise ConceptError(f"the concept store {path} stayed busy; try again ({last})")

    def close(self) -> None:
        """Close this store's connection (the store cannot be used afterwards)."""
        self._conn.close()

    def __enter__(self) -> ConceptStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- transactions ----------------------------------------------------------------------
    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one ``BEGIN IMMEDIATE`` transaction; retry the whole of it on SQLITE_BUSY."""
        with self._lock:
            for attempt in range(self.retries + 1):
                conn = self._conn
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as error:
                    if not _is_busy(error):
                        raise
                    if attempt == self.retries:
                        raise ConceptError(
                            f"the concept store is busy (another process kept it locked for more than "
                            f"{(self.retries + 1) * self.busy_timeout_s:.3g} s); nothing was written, "
                            "try again") from error
                    time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
                    continue
                try:
                    result = work(conn)
                    conn.execute("COMMIT")
                    return result
                except BaseException as error:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    if _is_busy(error) and attempt < self.retries:
                        time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
                        continue
                    if _is_busy(error):
                        raise ConceptError("the concept store is busy; nothing was written, try again") \
                            from error
                    raise
        raise AssertionError("unreachable")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            for attempt in range(self.retries + 1):
                try:
                    return self._conn.execute(sql, params).fetchall()
                except sqlite3.OperationalError as error:
                    if not _is_busy(error) or attempt == self.retries:
                        if _is_busy(error):
                            raise ConceptError("the concept store is busy; try again") from error
                        raise
                    time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")

    # -- concepts ----------------------------------------------------------------------------
    def _find(self, conn: sqlite3.Connection, name_or_id: str | int) -> Concept | None:
        if isinstance(name_or_id, Concept):
            name_or_id = name_or_id.concept_id
        if isinstance(name_or_id, (int, np.integer)) and not isinstance(name_or_id, bool):
            row = conn.execute(f"SELECT {_CONCEPT_COLUMNS} FROM concepts WHERE concept_id = ?",
                               [int(name_or_id)]).fetchone()
        else:
            row = conn.execute(f"SELECT {_CONCEPT_COLUMNS} FROM concepts WHERE name_key = ?",
                               [concept_key(clean_name(name_or_id))]).fetchone()
        return _concept_from_row(row) if row else None

    def _next_colour(self, conn: sqlite3.Connection) -> str:
        used = dict(conn.execute("SELECT colour, COUNT(*) FROM concepts GROUP BY colour").fetchall())
        return min(PALETTE, key=lambda c: (used.get(c, 0), PALETTE.index(c)))

    def _create(self, conn: sqlite3.Connection, name: str, by: str, description: str | None,
                colour: str | None) -> tuple[Concept, bool]:
        cleaned = clean_name(name)
        existing = self._find(conn, cleaned)
        if existing:
            return existing, False
        chosen = normalise_colour(colour) if colour else self._next_colour(conn)
        now = utc_now()
        cursor = conn.execute(
            "INSERT INTO concepts (name, name_key, description, colour, created_by, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [cleaned, concept_key(cleaned), description, chosen, _actor(by), now])
        return Concept(cursor.lastrowid, cleaned, description, chosen, _actor(by), now), True

    def create_concept(self, name: str, by: str, *, description: str | None = None,
                       colour: str | None = None) -> Concept:
        """Create a concept, or return the existing one with the same key (unchanged: a merge)."""
        clean_name(name)
        _actor(by)
        if colour:
            normalise_colour(colour)
        return self._write(lambda conn: self._create(conn, name, by, description, colour)[0])

    def get_concept(self, name_or_id: str | int) -> Concept:
        """A concept by name (any case/spacing) or id; :class:`ConceptError` when unknown."""
        with self._lock:
            found = self._find(self._conn, name_or_id)
        if found is None:
            known = [c.name for c in self.list_concepts()]
            hint = f" (known: {', '.join(known)})" if known else " (no concepts yet)"
            raise ConceptError(f"no concept {name_or_id!r}{hint}")
        return found

    def find_concept(self, name_or_id: str | int) -> Concept | None:
        """A concept by name (any case/spacing) or id, or None when there is none."""
        with self._lock:
            return self._find(self._conn, name_or_id)

    def list_concepts(self, model_digest: str | None = None, layer: str | None = None) -> list[Concept]:
        """All concepts (by name), ``n_units`` = labelled units (of that model/layer when given)."""
        where, params = [], []
        if model_digest is not None:
            where.append("l.model_digest = ?")
            params.append(model_digest)
        if layer is not None:
            where.append("l.layer = ?")
            params.append(layer)
        join_filter = (" AND " + " AND ".join(where)) if where else ""
        rows = self._read(
            f"SELECT c.concept_id, c.name, c.description, c.colour, c.created_by, c.created_at, "
            f"COUNT(l.unit) FROM concepts c LEFT JOIN neuron_labels l ON l.concept_id = c.concept_id"
            f"{join_filter} GROUP BY c.concept_id ORDER BY c.name_key", params)
        return [_concept_from_row(r[:6], n_units=r[6]) for r in rows]

    # -- scope: which model/layer, how many units --------------------------------------------
    def _scope(self, conn: sqlite3.Connection, model_digest: str | None, layer: str | None,
               run_id: str | None, n_units: int | None) -> _Scope:
        if run_id is not None:
            row = conn.execute("SELECT model_digest, layer, n_units FROM dissection_runs WHERE run_id = ?",
                               [run_id]).fetchone()
            if row is None:
                raise ConceptError(f"no dissection run {run_id!r} in this workspace (see `mammo runs`)")
            if model_digest is not None and model_digest != row[0]:
                raise ConceptError(f"run {run_id} dissected model {row[0]}, not {model_digest}")
            if layer is not None and layer != row[1]:
                raise ConceptError(f"run {run_id} dissected layer {row[1]}, not {layer}")
            return _Scope(row[0], row[1], run_id, int(n_units if n_units is not None else row[2]))
        if not model_digest or not layer:
            raise ConceptError("say which units: a dissection run, or a model digest and a layer")
        if n_units is None:
            row = conn.execute(
                "SELECT run_id, n_units FROM dissection_runs WHERE model_digest = ? AND layer = ? "
                "ORDER BY (status = 'complete') DESC, COALESCE(finished_at, created_at) DESC LIMIT 1",
                [model_digest, layer]).fetchone()
            if row is None:
                raise ConceptError(f"no dissection run of model {model_digest} layer {layer} is known, "
                                   "so unit indices cannot be checked: dissect it first or give n_units")
            return _Scope(model_digest, layer, row[0], int(row[1]))
        return _Scope(model_digest, layer, None, int(n_units))

    # -- labels ------------------------------------------------------------------------------
    def label_units(self, model_digest: str | None, layer: str | None, units: Iterable[int] | str | int,
                    concept: str | int | Concept, *, by: str, source: str, run_id: str | None = None,
                    query_id: int | None = None, n_units: int | None = None,
                    description: str | None = None, colour: str | None = None,
                    create: bool = True, note: str | None = None) -> int:
        """Label ``units`` of (model, layer) with one concept, all in one transaction.

        ``concept`` is a name (created when new and ``create``), an id or a :class:`Concept`. The
        units are checked against ``n_units`` (given, or the run's, or the latest run of that model
        and layer). Already carrying this concept: no-op; another concept: relabel. Any bad input
        (unknown unit, run, concept or query, empty name) raises :class:`ConceptError` and nothing is
        written. Returns how many units changed.
        """
        unit_list = parse_units(units)
        if not unit_list:
            raise ConceptError("no units given to label")
        actor = _actor(by)
        _check_source(source)
        if isinstance(concept, str):
            clean_name(concept)
        if colour:
            colour = normalise_colour(colour)

        def work(conn: sqlite3.Connection) -> int:
            scope = self._scope(conn, model_digest, layer, run_id, n_units)
            bad = [u for u in unit_list if scope.n_units is not None and u >= scope.n_units]
            if bad:
                shown = ", ".join(map(str, bad[:5])) + ("..." if len(bad) > 5 else "")
                raise ConceptError(f"unknown unit {shown}: layer {scope.layer} has units 0..{scope.n_units - 1}")
            if query_id is not None:
                asked = conn.execute("SELECT model_digest, layer FROM roi_queries WHERE query_id = ?",
                                     [query_id]).fetchone()
                if asked is None:
                    raise ConceptError(f"no ROI query {query_id}")
                if tuple(asked) != (scope.model_digest, scope.layer):
                    # a label must point to a query on the same units, or its provenance is false
                    raise ConceptError(f"ROI query {query_id} asked model {asked[0]} layer {asked[1]}, not "
                                       f"model {scope.model_digest} layer {scope.layer}")
            if isinstance(concept, str) and create:
                target, _ = self._create(conn, concept, actor, description, colour)
            else:
                target = self._find(conn, concept)
                if target is None:
                    raise ConceptError(f"no concept {concept!r} (create it first)")
            current = dict(conn.execute(
                f"SELECT unit, concept_id FROM neuron_labels WHERE model_digest = ? AND layer = ? "
                f"AND unit IN ({','.join('?' * len(unit_list))})",
                [scope.model_digest, scope.layer, *unit_list]).fetchall())
            now = utc_now()
            changed = 0
            said = self._votes_of(conn, scope, actor, unit_list)
            for unit in unit_list:
                before = current.get(unit)
                if before == target.concept_id:
                    if said.get(unit) != target.concept_id:   # another reader's label, agreed with: a vote
                        self._event(conn, scope, unit, "confirm", before, before, actor, now, query_id, source,
                                    note)
                    continue
                conn.execute(
                    "INSERT INTO neuron_labels (model_digest, layer, unit, concept_id, run_id, labelled_by, "
                    "labelled_at, query_id, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (model_digest, layer, unit) DO UPDATE SET concept_id = excluded.concept_id, "
                    "run_id = excluded.run_id, labelled_by = excluded.labelled_by, "
                    "labelled_at = excluded.labelled_at, query_id = excluded.query_id, source = excluded.source",
                    [scope.model_digest, scope.layer, unit, target.concept_id, scope.run_id, actor, now,
                     query_id, source])
                self._event(conn, scope, unit, "add" if before is None else "relabel", before,
                            target.concept_id, actor, now, query_id, source, note)
                changed += 1
            return changed

        return self._write(work)

    def remove_labels(self, model_digest: str | None, layer: str | None,
                      units: Iterable[int] | str | int | None = None, *, by: str, source: str,
                      concept: str | int | Concept | None = None, run_id: str | None = None,
                      note: str | None = None) -> int:
        """Remove the labels of ``units`` (or of every unit carrying ``concept``, or both filters);
        unlabelled units are skipped, but a unit the layer does not have (by its newest dissection run)
        is a :class:`ConceptError` and nothing is removed. One transaction; returns how many labels
        were removed."""
        if units is None and concept is None:
            raise ConceptError("say which labels to remove: units and/or a concept")
        unit_list = parse_units(units) if units is not None else None
        actor = _actor(by)
        _check_source(source)

        def work(conn: sqlite3.Connection) -> int:
            if run_id is not None or not (model_digest and layer):
                scope = self._scope(conn, model_digest, layer, run_id, None)
            else:
                try:  # the unit count of the newest run, when there is one, to refuse unknown units
                    scope = self._scope(conn, model_digest, layer, None, None)
                except ConceptError:  # no run known (labels given with n_units): nothing to check against
                    scope = _Scope(model_digest, layer, None, None)
            if unit_list and scope.n_units is not None and unit_list[-1] >= scope.n_units:
                labelled = {r[0] for r in conn.execute(
                    "SELECT unit FROM neuron_labels WHERE model_digest = ? AND layer = ? AND unit >= ?",
                    [scope.model_digest, scope.layer, scope.n_units]).fetchall()}
                bad = [u for u in unit_list if u >= scope.n_units and u not in labelled]
            else:
                bad = []
            if bad:  # a labelled unit can always be removed; an index the layer does not have is a typo
                raise ConceptError(f"unknown unit {', '.join(map(str, bad[:5]))}: layer {scope.layer} has units "
                                   f"0..{scope.n_units - 1}")
            sql = "SELECT unit, concept_id FROM neuron_labels WHERE model_digest = ? AND layer = ?"
            params: list[Any] = [scope.model_digest, scope.layer]
            if concept is not None:
                target = self._find(conn, concept)
                if target is None:
                    raise ConceptError(f"no concept {concept!r}")
                sql += " AND concept_id = ?"
                params.append(target.concept_id)
            if unit_list is not None:
                sql += f" AND unit IN ({','.join('?' * len(unit_list))})"
                params.extend(unit_list)
            rows = conn.execute(sql, params).fetchall()
            now = utc_now()
            for unit, before in rows:
                conn.execute("DELETE FROM neuron_labels WHERE model_digest = ? AND layer = ? AND unit = ?",
                             [scope.model_digest, scope.layer, unit])
                self._event(conn, scope, unit, "remove", before, None, actor, now, None, source, note)
            return len(rows)

        return self._write(work)

    @staticmethod
    def _votes_of(conn: sqlite3.Connection, scope: _Scope, actor: str, units: list[int]) -> dict[int, int | None]:
        """``actor``'s latest say on each of ``units`` that they said something about: a concept id, or None
        after their remove."""
        rows = conn.execute(
            "SELECT unit, action, concept_after FROM label_events e WHERE model_digest = ? AND layer = ? "
            f"AND actor = ? AND unit IN ({','.join('?' * len(units))}) AND event_id = (SELECT MAX(event_id) "
            "FROM label_events WHERE model_digest = e.model_digest AND layer = e.layer AND unit = e.unit "
            "AND actor = e.actor)", [scope.model_digest, scope.layer, actor, *units]).fetchall()
        return {int(unit): (None if action == "remove" else after) for unit, action, after in rows}

    @staticmethod
    def _event(conn: sqlite3.Connection, scope: _Scope, unit: int, action: str, before: int | None,
               after: int | None, actor: str, at: str, query_id: int | None, source: str,
               note: str | None) -> None:
        conn.execute(
            "INSERT INTO label_events (model_digest, layer, unit, action, concept_before, concept_after, "
            "actor, at, query_id, source, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [scope.model_digest, scope.layer, unit, action, before, after, actor, at, query_id, source, note])

    def _concepts_by_id(self) -> dict[int, Concept]:
        rows = self._read(f"SELECT {_CONCEPT_COLUMNS} FROM concepts")
        return {r[0]: _concept_from_row(r) for r in rows}

    def labels(self, model_digest: str, layer: str) -> dict[int, Concept]:
        """The labels of (model, layer) that reports use, by the team's :meth:`rule`: ``{unit: Concept}``,
        units ascending (``latest``: the current labels; ``majority``: each unit's majority concept)."""
        if self.rule() == "majority":
            return self._majority(model_digest, layer)[0]
        return self.current_labels(model_digest, layer)

    def current_labels(self, model_digest: str, layer: str) -> dict[int, Concept]:
        """The current labels of (model, layer), the last given: ``{unit: Concept}``, units ascending."""
        rows = self._read(
            f"SELECT l.unit, {', '.join('c.' + c.strip() for c in _CONCEPT_COLUMNS.split(','))} "
            "FROM neuron_labels l JOIN concepts c ON c.concept_id = l.concept_id "
            "WHERE l.model_digest = ? AND l.layer = ? ORDER BY l.unit", [model_digest, layer])
        return {r[0]: _concept_from_row(r[1:]) for r in rows}

    def label_rows(self, model_digest: str, layer: str) -> list[NeuronLabel]:
        """The current labels with their provenance (who, when, source, run, query)."""
        concepts = self._concepts_by_id()
        rows = self._read(
            "SELECT unit, concept_id, run_id, labelled_by, labelled_at, source, query_id FROM neuron_labels "
            "WHERE model_digest = ? AND layer = ? ORDER BY unit", [model_digest, layer])
        return [NeuronLabel(model_digest, layer, r[0], concepts[r[1]], r[2], r[3], r[4], r[5], r[6])
                for r in rows]

    def labellers(self, model_digest: str, layer: str) -> dict[int, str]:
        """Who gave each label :meth:`labels` returns: ``{unit: labelled_by}`` (by the majority rule, the
        readers who named the majority's concept, joined by ", ")."""
        return self.labels_and_labellers(model_digest, layer)[1]

    def labels_and_labellers(self, model_digest: str, layer: str) -> tuple[dict[int, Concept], dict[int, str]]:
        """:meth:`labels` and :meth:`labellers` from one read of the rule and the labels (or votes): what a
        report needs."""
        if self.rule() == "majority":
            return self._majority(model_digest, layer)
        rows = self.label_rows(model_digest, layer)
        return {r.unit: r.concept for r in rows}, {r.unit: r.labelled_by for r in rows}

    def votes(self, model_digest: str, layer: str) -> dict[int, dict[str, str]]:
        """Each reader's latest say on each unit of (model, layer): ``{unit: {reader: concept name}}``, a
        reader whose last word on a unit was a remove left out."""
        names = {cid: c.name for cid, c in self._concepts_by_id().items()}
        rows = self._read(
            "SELECT unit, actor, action, concept_after FROM label_events e WHERE model_digest = ? AND layer = ? "
            "AND event_id = (SELECT MAX(event_id) FROM label_events WHERE model_digest = e.model_digest AND "
            "layer = e.layer AND unit = e.unit AND actor = e.actor) ORDER BY unit, actor", [model_digest, layer])
        out: dict[int, dict[str, str]] = {}
        for unit, actor, action, after in rows:
            if action != "remove" and after in names:
                out.setdefault(int(unit), {})[actor] = names[after]
        return out

    def agreement(self, model_digest: str, layer: str):
        """Agreement between the readers of (model, layer): :func:`workspace.dissect.agreement.agreement`."""
        from workspace.dissect.agreement import agreement

        return agreement(self.votes(model_digest, layer), rule=self.rule())

    def _majority(self, model_digest: str, layer: str) -> tuple[dict[int, Concept], dict[int, str]]:
        from workspace.dissect.agreement import UnitVotes

        by_key = {c.key: c for c in self._concepts_by_id().values()}
        labels, by = {}, {}
        for unit, votes in sorted(self.votes(model_digest, layer).items()):
            name = UnitVotes(unit, votes).majority()
            if name is not None:
                labels[unit] = by_key[concept_key(name)]
                by[unit] = ", ".join(sorted(r for r, n in votes.items() if n == name))
        return labels, by

    # -- proposals ---------------------------------------------------------------------------
    def save_proposals(self, run_id: str, model_digest: str, layer: str, proposals: Iterable[Any], *,
                       evidence: dict | None = None) -> int:
        """Record a run's proposals (:mod:`workspace.dissect.proposals`): the layer's pending ones are replaced,
        a (unit, concept) already accepted or rejected is not proposed again. Returns how many are pending."""
        rows = list(proposals)

        def work(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM concept_proposals WHERE model_digest = ? AND layer = ? AND status = 'proposed'",
                         [model_digest, layer])
            now, added = utc_now(), 0
            for p in rows:
                extra = {"runner_up": p.runner_up, "runner_up_iou": p.runner_up_iou, **(evidence or {})}
                added += conn.execute(
                    "INSERT OR IGNORE INTO concept_proposals (model_digest, layer, run_id, unit, concept, attribute, "
                    "value, iou, n_lesions, evidence, status, proposed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                    "'proposed', ?)", [model_digest, layer, run_id, int(p.unit), clean_name(p.concept), p.attribute,
                                       p.value, float(p.iou), int(p.n_lesions), json.dumps(extra), now]).rowcount
            return added

        return self._write(work)

    def proposals(self, model_digest: str, layer: str, *, status: str | None = "proposed",
                  units: Iterable[int] | None = None) -> list[ProposalRow]:
        """The layer's proposals (``status`` None: all), best IoU first."""
        sql = (f"SELECT {_PROPOSAL_COLUMNS} FROM concept_proposals WHERE model_digest = ? AND layer = ?")
        params: list[Any] = [model_digest, layer]
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        wanted = None if units is None else {int(u) for u in units}
        return [ProposalRow(*r[:9], json.loads(r[9]), *r[10:]) for r in self._read(sql + " ORDER BY iou DESC, unit",
                                                                                     params)
                if wanted is None or r[4] in wanted]

    def decide_proposals(self, proposal_ids: Iterable[int], *, accept: bool, by: str, source: str) -> list[ProposalRow]:
        """Accept (label each unit with its proposed concept, the evidence in the label's note) or reject
        proposals; a decided proposal is left as it was. Returns the proposals decided now."""
        actor = _actor(by)
        _check_source(source)
        ids = [int(i) for i in proposal_ids]
        if not ids:
            raise ConceptError("no proposals given")
        rows = {r[0]: ProposalRow(*r[:9], json.loads(r[9]), *r[10:]) for r in self._read(
            f"SELECT {_PROPOSAL_COLUMNS} FROM concept_proposals WHERE proposal_id IN ({','.join('?' * len(ids))})",
            ids)}
        missing = [i for i in ids if i not in rows]
        if missing:
            raise ConceptError(f"no proposal {', '.join(map(str, missing[:5]))}")
        pending = [rows[i] for i in ids if rows[i].status == "proposed"]
        for row in pending if accept else []:   # the label first: accepting again is then a no-op
            self.label_units(row.model_digest, row.layer, [row.unit], row.concept, by=actor, source=source,
                             run_id=row.run_id, note=f"proposal #{row.proposal_id}: {row.evidence_text()}")
        status = "accepted" if accept else "rejected"
        now = utc_now()
        self._write(lambda conn: [conn.execute(
            "UPDATE concept_proposals SET status = ?, decided_by = ?, decided_at = ?, decided_source = ? "
            "WHERE proposal_id = ? AND status = 'proposed'", [status, actor, now, source, row.proposal_id])
            for row in pending])
        return [dataclasses.replace(row, status=status, decided_by=actor, decided_at=now, decided_source=source)
                for row in pending]

    # -- the team's rule ---------------------------------------------------------------------
    def rule(self) -> str:
        """The team's label rule: ``latest`` (default) or ``majority`` (:mod:`workspace.dissect.agreement`)."""
        from workspace.dissect.agreement import DEFAULT_RULE

        rows = self._read("SELECT value FROM team_settings WHERE key = 'label_rule'")
        return rows[0][0] if rows else DEFAULT_RULE

    def set_rule(self, rule: str, *, by: str) -> str:
        """Set the team's label rule (every surface's reports follow it from their next read)."""
        from workspace.dissect.agreement import RULES

        if rule not in RULES:
            raise ConceptError(f"label rule {rule!r}: expected one of {', '.join(RULES)}")
        actor = _actor(by)
        self._write(lambda conn: conn.execute(
            "INSERT INTO team_settings (key, value, set_by, set_at) VALUES ('label_rule', ?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, set_by = excluded.set_by, "
            "set_at = excluded.set_at", [rule, actor, utc_now()]))
        return rule

    def units_of(self, concept: str | int | Concept, model_digest: str, layer: str) -> list[int]:
        """The units of (model, layer) labelled with ``concept`` (ascending)."""
        target = concept if isinstance(concept, Concept) else self.get_concept(concept)
        rows = self._read("SELECT unit FROM neuron_labels WHERE model_digest = ? AND layer = ? "
                          "AND concept_id = ? ORDER BY unit", [model_digest, layer, target.concept_id])
        return [r[0] for r in rows]

    # -- history -----------------------------------------------------------------------------
    def history(self, model_digest: str | None = None, layer: str | None = None, *,
                unit: int | None = None, concept: str | int | Concept | None = None,
                until: str | datetime | None = None, limit: int | None = None) -> list[LabelEvent]:
        """Label events, oldest first (the last ``limit`` when given), optionally filtered."""
        where, params = [], []
        for column, value in (("model_digest", model_digest), ("layer", layer), ("unit", unit)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if concept is not None:
            target = concept if isinstance(concept, Concept) else self.get_concept(concept)
            where.append("(concept_before = ? OR concept_after = ?)")
            params.extend([target.concept_id, target.concept_id])
        if until is not None:
            where.append("at <= ?")
            params.append(_as_time(until))
        sql = ("SELECT event_id, model_digest, layer, unit, action, concept_before, concept_after, actor, at, "
               "query_id, source, note FROM label_events")
        if where:
            sql += " WHERE " + " AND ".join(where)
        if limit is not None:
            sql = f"SELECT * FROM ({sql} ORDER BY event_id DESC LIMIT {int(limit)})"
        sql += " ORDER BY event_id"
        names = {cid: c.name for cid, c in self._concepts_by_id().items()}
        return [LabelEvent(r[0], r[1], r[2], r[3], r[4], r[5], r[6], names.get(r[5]), names.get(r[6]),
                           r[7], r[8], r[9], r[10], r[11]) for r in self._read(sql, params)]

    def labels_at(self, model_digest: str, layer: str, when: str | datetime) -> dict[int, Concept]:
        """The labels of (model, layer) as they were at ``when``, rebuilt from the event history."""
        concepts = self._concepts_by_id()
        state: dict[int, int] = {}
        for event in self.history(model_digest, layer, until=when):
            if event.action == "remove":
                state.pop(event.unit, None)
            else:
                state[event.unit] = event.concept_after  # type: ignore[assignment]
        return {unit: concepts[state[unit]] for unit in sorted(state)}

    # -- ROI queries -------------------------------------------------------------------------
    def record_query(self, model_digest: str, layer: str, *, roi: dict | np.ndarray,
                     ranking: Sequence[tuple[int, float]] | np.ndarray, aligned: Iterable[int],
                     iou_threshold: float, asked_by: str, source: str, image_id: str | None = None,
                     patch_box: Any = None, run_id: str | None = None) -> int:
        """Record an ROI query and what it answered; returns its ``query_id``.

        ``roi``: JSON geometry, or a boolean mask (stored with :func:`encode_roi`). ``ranking``:
        (unit, IoU) pairs best first, or a dense (units,) IoU array (ranked here, zeros left out).
        """
        _check_source(source)
        actor = _actor(by=asked_by)
        geometry = encode_roi(roi) if isinstance(roi, np.ndarray) else dict(roi)
        if isinstance(ranking, np.ndarray):
            ranking = ranking_from_iou(ranking)
        pairs = [[int(u), round(float(v), 6)] for u, v in ranking]
        aligned_list = [int(u) for u in aligned]
        if isinstance(patch_box, np.ndarray):
            patch_box = patch_box.tolist()

        def work(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "INSERT INTO roi_queries (image_id, patch_box, roi, model_digest, layer, run_id, iou_threshold, "
                "ranking, aligned, asked_by, asked_at, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [image_id, json.dumps(patch_box) if patch_box is not None else None, json.dumps(geometry),
                 model_digest, layer, run_id, float(iou_threshold), json.dumps(pairs),
                 json.dumps(aligned_list), actor, utc_now(), source])
            return int(cursor.lastrowid)

        return self._write(work)

    def _query_from_row(self, r: Sequence[Any]) -> RoiQuery:
        return RoiQuery(query_id=r[0], image_id=r[1], patch_box=json.loads(r[2]) if r[2] else None,
                        roi=json.loads(r[3]), model_digest=r[4], layer=r[5], run_id=r[6],
                        iou_threshold=r[7], ranking=[(int(u), float(v)) for u, v in json.loads(r[8])],
                        aligned=json.loads(r[9]), asked_by=r[10], asked_at=r[11], source=r[12])

    _QUERY_COLUMNS = ("query_id, image_id, patch_box, roi, model_digest, layer, run_id, iou_threshold, "
                      "ranking, aligned, asked_by, asked_at, source")

    def get_query(self, query_id: int) -> RoiQuery:
        """A recorded ROI query by id; :class:`ConceptError` when unknown."""
        rows = self._read(f"SELECT {self._QUERY_COLUMNS} FROM roi_queries WHERE query_id = ?", [query_id])
        if not rows:
            raise ConceptError(f"no ROI query {query_id}")
        return self._query_from_row(rows[0])

    def latest_query(self, model_digest: str | None = None, layer: str | None = None,
                     image_id: str | None = None) -> RoiQuery | None:
        """The most recent ROI query (of that model/layer/image when given), or None."""
        where, params = [], []
        for column, value in (("model_digest", model_digest), ("layer", layer), ("image_id", image_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = f"SELECT {self._QUERY_COLUMNS} FROM roi_queries"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._read(sql + " ORDER BY query_id DESC LIMIT 1", params)
        return self._query_from_row(rows[0]) if rows else None


def ranking_from_iou(iou: np.ndarray, *, keep_zero: bool = False) -> list[tuple[int, float]]:
    """(unit, IoU) pairs best first (ties: lower unit first); zero IoUs left out unless asked."""
    iou = np.asarray(iou, dtype=np.float64).ravel()
    order = np.lexsort((np.arange(len(iou)), -iou))
    return [(int(u), float(iou[u])) for u in order if keep_zero or iou[u] > 0]


def _actor(by: Any) -> str:
    if not isinstance(by, str) or not by.strip():
        raise ConceptError("say who is labelling (by=...): it is kept with every label")
    return by.strip()


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ConceptError(f"unknown label source {source!r}: one of {', '.join(SOURCES)}")


def default_actor() -> str:
    """Who runs this process (for the CLI's ``--by`` default)."""
    for variable in ("MAMMO_USER", "USER", "LOGNAME", "USERNAME"):
        if os.environ.get(variable):
            return os.environ[variable]
    return "cli-user"


# ---------------------------------------------------------------------------------- demo seeding
SEED_ACTOR = "demo-seed"


@dataclass
class SeedSummary:
    concepts: dict[str, list[int]] = field(default_factory=dict)   # concept name -> units labelled now
    evidence: dict[int, dict] = field(default_factory=dict)         # unit -> the numbers behind it


def seed_example_concepts(ws: Workspace | ConceptStore, run: Any, *, per_concept: int = 6,
                          min_lesion_share: float = 0.75, max_lesion_share: float = 0.25,
                          min_effect: float = 1.0) -> SeedSummary:
    """Label a few units of a dissection run from real evidence, so a newcomer sees a non-empty report.

    Evidence per unit: the share of lesion patches among its top-k patches, and the difference of its
    mean max activation on lesion and on normal patches of the run (in units of its pooled standard
    deviation, the effect size). Units with a lesion share >= ``min_lesion_share`` and an effect size
    >= ``min_effect`` become "lesion-like texture" (strongest first); units with a share <=
    ``max_lesion_share`` and an effect size <= ``-min_effect`` become "fibroglandular tissue". Only unlabelled units are touched,
    so seeding again (or after people relabelled) changes nothing people did. ``labelled_by`` is
    ``demo-seed``. ``run`` is a :class:`workspace.dissect.dissect_run.DissectionRun` (``run_id``,
    ``model_digest``, ``layer``, ``patch_ids``, ``max_activations``, ``top_k``).
    """
    if not isinstance(ws, ConceptStore):
        with ConceptStore(ws) as own:  # a store made here is closed here
            return seed_example_concepts(own, run, per_concept=per_concept, min_lesion_share=min_lesion_share,
                                         max_lesion_share=max_lesion_share, min_effect=min_effect)
    store = ws
    patch_ids = np.asarray(run.patch_ids).astype(np.int64)
    acts = np.asarray(run.max_activations, dtype=np.float64)          # (units, patches)
    top_k = np.asarray(run.top_k).astype(np.int64)                      # (units, k) patch ids
    label_of: dict[int, int] = {}
    ids = [int(p) for p in np.unique(np.concatenate([patch_ids, top_k.ravel()]))]
    for start in range(0, len(ids), 900):
        chunk = ids[start:start + 900]
        label_of.update(store._read(
            f"SELECT patch_id, label FROM patches WHERE patch_id IN ({','.join('?' * len(chunk))})", chunk))
    patch_labels = np.array([label_of.get(int(p), -1) for p in patch_ids])
    lesion, normal = patch_labels == 1, patch_labels == 0
    summary = SeedSummary()
    if lesion.sum() < 2 or normal.sum() < 2:
        return summary
    top_labels = np.vectorize(lambda p: label_of.get(int(p), -1))(top_k)
    known = (top_labels >= 0).sum(axis=1)
    share = np.where(known > 0, (top_labels == 1).sum(axis=1) / np.maximum(known, 1), 0.5)
    pooled = np.sqrt(0.5 * (acts[:, lesion].var(axis=1) + acts[:, normal].var(axis=1))) + 1e-9
    effect = (acts[:, lesion].mean(axis=1) - acts[:, normal].mean(axis=1)) / pooled
    already = set(store.labels(run.model_digest, run.layer))
    rules = [
        ("lesion-like texture", "Demo seed: units whose top-activated patches are mostly lesion patches "
         "and that fire more on lesion than on normal patches.", (share >= min_lesion_share) & (effect >= min_effect),
         -effect),
        ("fibroglandular tissue", "Demo seed: units most active on normal (lesion-free) tissue patches.",
         (share <= max_lesion_share) & (effect <= -min_effect), effect),
    ]
    for name, description, eligible, order_key in rules:
        candidates = [int(u) for u in np.argsort(order_key, kind="stable")
                      if eligible[u] and int(u) not in already][:per_concept]
        if not candidates:
            continue
        store.label_units(run.model_digest, run.layer, candidates, name, by=SEED_ACTOR, source="api",
                          run_id=run.run_id, n_units=acts.shape[0], description=description,
                          note="seeded from dissection evidence")
        summary.concepts[name] = candidates
        for unit in candidates:
            summary.evidence[unit] = {"lesion_share_top_k": round(float(share[unit]), 3),
                                      "effect_size": round(float(effect[unit]), 3)}
        already.update(candidates)
    return summary
