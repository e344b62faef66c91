"""The one SQLite schema of a workspace (``catalog.sqlite``), as numbered migrations.

Every table of the project lives here: the catalog (patients, images, lesions, patches), the
dissection runs, the concept store (concepts, neuron labels, ROI queries, label history) and
what Label Studio sends back (reads). :func:`connect` opens the database in WAL mode with foreign
keys on and applies the migrations that have not run yet, each in its own transaction.

Conventions: ids are text where they are pseudonymous (``image_id``, ``patient_id``), integers
where they are row numbers; geometry and lists are JSON text; times are ISO 8601 UTC text.
Patient identifiers (names, source ids, birth dates) live only in ``patients``; nothing derived
from the catalog carries them.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import sqlite_utils

BUSY_TIMEOUT_MS = 30_000


M1_CATALOG = ("""
        CREATE TABLE patients (
            patient_id TEXT PRIMARY KEY,          -- pseudonym, safe to show
            dataset TEXT NOT NULL,
            source_patient_id TEXT,               -- identifiers: never leave this table
            patient_name TEXT,
            birth_date TEXT,
            split TEXT,                           -- train | val | test (8:1:1 by patient)
            created_at TEXT NOT NULL
        );
        CREATE UNIQUE INDEX patients_source ON patients(dataset, source_patient_id);

        CREATE TABLE images (
            image_id TEXT PRIMARY KEY,            -- pseudonym, safe to show
            patient_id TEXT NOT NULL REFERENCES patients(patient_id),
            dataset TEXT NOT NULL,
            source_path TEXT NOT NULL,
            source_sha1 TEXT NOT NULL,            -- content digest: re-import is idempotent
            sop_instance_uid TEXT,
            study_id TEXT,                        -- pseudonymous study key
            laterality TEXT,                      -- L | R
            view TEXT,                            -- CC | MLO | ML | LM | XCCL | ...
            rows INTEGER NOT NULL,
            cols INTEGER NOT NULL,
            pixel_spacing_row REAL,               -- mm
            pixel_spacing_col REAL,               -- mm
            photometric TEXT,                     -- MONOCHROME1 | MONOCHROME2
            bits_stored INTEGER,
            transfer_syntax TEXT,
            window_center REAL,
            window_width REAL,
            voi_function TEXT,                    -- LINEAR | LINEAR_EXACT | SIGMOID
            flip_horizontal INTEGER NOT NULL DEFAULT 0,  -- 1: mirrored so the chest wall is on the left
            flip_vertical INTEGER NOT NULL DEFAULT 0,
            split TEXT,
            birads TEXT,                          -- image-level label as given (e.g. "0", "1", "2")
            label INTEGER,                        -- 1: possibly malignant (BI-RADS 0), 0: BI-RADS 1/2
            density TEXT,                         -- A | B | C | D
            display_path TEXT,                    -- windowed PNG, normalised orientation (workspace-relative)
            foreground_path TEXT,                 -- breast mask PNG, normalised orientation
            annotated_path TEXT,                  -- low-resolution annotated copy, if any
            warnings TEXT,                        -- JSON list of import warnings
            created_at TEXT NOT NULL
        );
        CREATE UNIQUE INDEX images_sha1 ON images(dataset, source_sha1);
        CREATE INDEX images_patient ON images(patient_id);

        CREATE TABLE lesions (
            lesion_id INTEGER PRIMARY KEY,
            image_id TEXT NOT NULL REFERENCES images(image_id) ON DELETE CASCADE,
            kind TEXT NOT NULL,                   -- mass | calcification | distortion | asymmetry | other
            geometry_type TEXT NOT NULL,          -- mask | box | polygon | ellipse | circle | point
            geometry TEXT NOT NULL,               -- JSON, ORIGINAL pixel coordinates (x = column, y = row)
            mask_path TEXT,                       -- for geometry_type = mask (workspace-relative or absolute)
            pathology TEXT,                       -- malignant | benign | benign_without_callback | unknown
            source TEXT NOT NULL,                 -- ground_truth | annotated_copy | importer name
            attributes TEXT,                      -- JSON: dataset-specific extras (BI-RADS, shape, margins...)
            geometry_key TEXT NOT NULL,           -- digest of (kind, type, geometry): idempotent re-import
            created_at TEXT NOT NULL
        );
        CREATE UNIQUE INDEX lesions_unique ON lesions(image_id, source, geometry_key);

        CREATE TABLE patches (
            patch_id INTEGER PRIMARY KEY,
            patch_set TEXT NOT NULL,
            image_id TEXT NOT NULL REFERENCES images(image_id) ON DELETE CASCADE,
            x INTEGER NOT NULL,                   -- top-left, NORMALISED orientation (chest wall left)
            y INTEGER NOT NULL,
            size INTEGER NOT NULL,
            label INTEGER NOT NULL,               -- 1 lesion patch, 0 normal patch
            split TEXT NOT NULL,
            lesion_id INTEGER REFERENCES lesions(lesion_id) ON DELETE SET NULL,
            array_index INTEGER NOT NULL,         -- row in the patch set's pixel array
            thumb_path TEXT,
            created_at TEXT NOT NULL
        );
        CREATE UNIQUE INDEX patches_index ON patches(patch_set, array_index);
        CREATE INDEX patches_image ON patches(image_id);

        CREATE TABLE patch_sets (
            patch_set TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            step INTEGER NOT NULL,
            n_patches INTEGER NOT NULL,
            pixels_path TEXT NOT NULL,            -- memory-mapped uint16 array (N, size, size)
            digest TEXT NOT NULL,                 -- which patches (ids, boxes, pixels)
            params TEXT NOT NULL,                 -- JSON of the extraction rule
            created_at TEXT NOT NULL
        );
        """)


M2_RUNS = ("""
        CREATE TABLE models (
            model_digest TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            architecture TEXT NOT NULL,
            dissected_layer TEXT NOT NULL,
            path TEXT NOT NULL,
            metrics TEXT,                         -- JSON
            created_at TEXT NOT NULL
        );

        CREATE TABLE dissection_runs (
            run_id TEXT PRIMARY KEY,
            model_digest TEXT NOT NULL,
            layer TEXT NOT NULL,
            patch_set TEXT NOT NULL,
            patch_set_digest TEXT NOT NULL,
            quantile REAL NOT NULL,
            top_k INTEGER NOT NULL,
            n_units INTEGER NOT NULL,
            n_patches INTEGER NOT NULL,
            path TEXT NOT NULL,
            status TEXT NOT NULL,                 -- running | complete | failed
            manifest TEXT,                        -- JSON copy of manifest.json once complete
            created_at TEXT NOT NULL,
            finished_at TEXT
        );
        CREATE INDEX runs_model ON dissection_runs(model_digest, layer);

        CREATE TABLE image_reads (
            image_id TEXT NOT NULL REFERENCES images(image_id) ON DELETE CASCADE,
            model_digest TEXT NOT NULL,
            score REAL NOT NULL,                  -- image-level P(possibly malignant)
            n_patches INTEGER NOT NULL,
            n_suspicious INTEGER NOT NULL,
            operating_point REAL NOT NULL,
            cache_path TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (image_id, model_digest)
        );
        """)


M3_CONCEPTS = ("""
        CREATE TABLE concepts (
            concept_id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            name_key TEXT NOT NULL UNIQUE,        -- lower(strip(name)): names unique ignoring case and spaces
            description TEXT,
            colour TEXT NOT NULL,                 -- #rrggbb
            created_by TEXT NOT NULL,
            created_at TEXT NOT NULL
        );

        -- One concept per unit (a product decision: see workspace/dissect/concepts.py).
        CREATE TABLE neuron_labels (
            model_digest TEXT NOT NULL,
            layer TEXT NOT NULL,
            unit INTEGER NOT NULL,
            concept_id INTEGER NOT NULL REFERENCES concepts(concept_id),
            run_id TEXT REFERENCES dissection_runs(run_id),
            labelled_by TEXT NOT NULL,
            labelled_at TEXT NOT NULL,
            query_id INTEGER REFERENCES roi_queries(query_id),
            source TEXT NOT NULL,                 -- labelstudio | fiftyone | cli | api
            PRIMARY KEY (model_digest, layer, unit)
        );
        CREATE INDEX neuron_labels_concept ON neuron_labels(concept_id);

        CREATE TABLE roi_queries (
            query_id INTEGER PRIMARY KEY,
            image_id TEXT,
            patch_box TEXT,                       -- JSON [x, y, w, h] normalised orientation, or list of boxes
            roi TEXT NOT NULL,                    -- JSON geometry (bbox + RLE of the mask)
            model_digest TEXT NOT NULL,
            layer TEXT NOT NULL,
            run_id TEXT,
            iou_threshold REAL NOT NULL,
            ranking TEXT NOT NULL,                -- JSON [[unit, iou], ...] best first
            aligned TEXT NOT NULL,                -- JSON [unit, ...]
            asked_by TEXT NOT NULL,
            asked_at TEXT NOT NULL,
            source TEXT NOT NULL
        );
        CREATE INDEX roi_queries_time ON roi_queries(asked_at);

        -- Append-only: every label change, so any past state can be rebuilt.
        CREATE TABLE label_events (
            event_id INTEGER PRIMARY KEY AUTOINCREMENT,
            model_digest TEXT NOT NULL,
            layer TEXT NOT NULL,
            unit INTEGER NOT NULL,
            action TEXT NOT NULL,                 -- add | relabel | remove (| confirm, since migration 9)
            concept_before INTEGER,
            concept_after INTEGER,
            actor TEXT NOT NULL,
            at TEXT NOT NULL,
            query_id INTEGER,
            source TEXT NOT NULL,
            note TEXT
        );
        CREATE TRIGGER label_events_no_update BEFORE UPDATE ON label_events
            BEGIN SELECT RAISE(ABORT, 'label_events is append-only'); END;
        CREATE TRIGGER label_events_no_delete BEFORE DELETE ON label_events
            BEGIN SELECT RAISE(ABORT, 'label_events is append-only'); END;
        """)


M4_READS = ("""
        -- What readers submitted in Label Studio (from the webhook), never deleted.
        CREATE TABLE ls_annotations (
            event_id INTEGER PRIMARY KEY AUTOINCREMENT,
            annotation_id INTEGER,
            task_id INTEGER,
            project_id INTEGER,
            image_id TEXT,
            action TEXT NOT NULL,                 -- ANNOTATION_CREATED | ANNOTATION_UPDATED | ANNOTATIONS_DELETED
            reader TEXT,
            roi TEXT,                             -- JSON
            choices TEXT,                         -- JSON
            concept TEXT,
            payload TEXT NOT NULL,                -- the raw event, JSON
            received_at TEXT NOT NULL
        );
        CREATE INDEX ls_annotations_annotation ON ls_annotations(annotation_id);
        """)


M5_INFERRED = ("""
        -- Where a view or laterality the DICOM header lacks was read from (DicomImage.inferred): a JSON
        -- object like {"view": "PatientID (CBIS-DDSM naming)"}, attribute names only, never their values.
        -- NULL when nothing was inferred.
        ALTER TABLE images ADD COLUMN inferred TEXT;
        """)


M6_DOMAIN = ("""
        -- What the domain check reads of an image (workspace.data.domain.image_features, JSON): background level,
        -- breast intensity percentiles, spacing, bit depth. Filled at import; NULL for older rows until
        -- first needed (workspace.data.domain.features_of).
        ALTER TABLE images ADD COLUMN domain_features TEXT;
        """)


M7_MODEL_OPTIONS = ("""
        -- How a model must be loaded again (JSON: {"arch": "torchvision:resnet18", "trust": true}), so every
        -- surface that opens a run's model loads it the way `mammo dissect` did. NULL: our own checkpoint.
        ALTER TABLE models ADD COLUMN load_options TEXT;
        """)


M8_MODALITY = ("""
        -- The DICOM Modality of an image (MG, CR, DX ...): what the workflow may assume of it
        -- (workspace.base.modality). NULL for rows imported before: mammography.
        ALTER TABLE images ADD COLUMN modality TEXT;
        """)


M9_TEAM_RULES = ("""
        -- Settings a labelling team shares, e.g. which label a report uses when readers disagree
        -- (key 'label_rule': 'latest' or 'majority'; workspace.dissect.agreement).
        CREATE TABLE team_settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            set_by TEXT NOT NULL,
            set_at TEXT NOT NULL
        );
        -- each reader's latest say on a unit (votes, agreement)
        CREATE INDEX label_events_votes ON label_events(model_digest, layer, unit, actor, event_id);
        """)


M10_PROPOSALS = ("""
        -- Concepts proposed for units from the lesions they align with (workspace.dissect.proposals), never
        -- applied on their own: a reader or curator accepts (the unit is labelled) or rejects them.
        CREATE TABLE concept_proposals (
            proposal_id INTEGER PRIMARY KEY AUTOINCREMENT,
            model_digest TEXT NOT NULL,
            layer TEXT NOT NULL,
            run_id TEXT NOT NULL,
            unit INTEGER NOT NULL,
            concept TEXT NOT NULL,                -- the name proposed
            attribute TEXT NOT NULL,              -- the lesion attribute: kind, finding, mass_margins ...
            value TEXT NOT NULL,
            iou REAL NOT NULL,                    -- dataset-level IoU over the run's patches
            n_lesions INTEGER NOT NULL,
            evidence TEXT NOT NULL,               -- JSON: runner-up, minimum IoU, patches
            status TEXT NOT NULL,                 -- proposed | accepted | rejected
            proposed_at TEXT NOT NULL,
            decided_by TEXT,
            decided_at TEXT,
            decided_source TEXT
        );
        CREATE UNIQUE INDEX concept_proposals_unique ON concept_proposals(model_digest, layer, unit, concept);
        """)


MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "catalog: patients, images, lesions, patches", M1_CATALOG),
    (2, "models, dissection runs, image reads", M2_RUNS),
    (3, "concept store: concepts, neuron labels, ROI queries, label history", M3_CONCEPTS),
    (4, "Label Studio annotations", M4_READS),
    (5, "images: view / laterality inferred from the file's text", M5_INFERRED),
    (6, "images: domain features", M6_DOMAIN),
    (7, "models: load options", M7_MODEL_OPTIONS),
    (8, "images: modality", M8_MODALITY),
    (9, "concept store: team settings, votes index", M9_TEAM_RULES),
    (10, "concept store: concept proposals", M10_PROPOSALS),
]


def _statements(script: str) -> list[str]:
    """Split a script into statements (trigger bodies stay whole); executescript would commit."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()[:80]}")
    return statements


def utc_now() -> str:
    """Now, as ISO 8601 UTC text with milliseconds (the format of every time column)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def connect(path: str | Path) -> sqlite_utils.Database:
    """Open (creating if needed) a workspace database and bring its schema up to date."""
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    db = sqlite_utils.Database(conn)
    migrate(db)
    return db


def schema_version(db: sqlite_utils.Database) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite_utils.Database) -> int:
    """Apply pending migrations; return the schema version. Safe to call from several processes."""
    for number, _title, script in MIGRATIONS:
        if schema_version(db) >= number:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(db) < number:  # another process may have won the lock first
                for statement in _statements(script):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return schema_version(db)
