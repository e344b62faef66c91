"""seed_example_concepts on a real dissection run (real run folder, real catalog patches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workspace.base.schema import connect, utc_now
from workspace.dissect.concepts import SEED_ACTOR, ConceptStore, seed_example_concepts
from workspace.dissect.dissect_run import ActivationSource, execute_run
from workspace.dissect.reports import build_report

N_UNITS, N_PATCHES = 12, 40
LESION_UNITS, NORMAL_UNITS = (0, 1, 2), (5, 6)


def _catalog_patches(ws) -> tuple[np.ndarray, np.ndarray]:
    """Patients, one image and N_PATCHES patches (every other one a lesion patch) in the real tables."""
    db = connect(ws.catalog_path)
    now = utc_now()
    db.execute("INSERT INTO patients (patient_id, dataset, split, created_at) VALUES ('P-1', 'test', 'test', ?)",
               [now])
    db.execute("INSERT INTO images (image_id, patient_id, dataset, source_path, source_sha1, rows, cols, created_at) "
               "VALUES ('I-1', 'P-1', 'test', 'x.dcm', 'abc', 2048, 1024, ?)", [now])
    labels = np.array([i % 2 for i in range(N_PATCHES)])
    ids = []
    for i, label in enumerate(labels):
        cur = db.execute("INSERT INTO patches (patch_set, image_id, x, y, size, label, split, array_index, created_at) "
                         "VALUES ('default', 'I-1', 0, ?, 512, ?, 'test', ?, ?)", [i * 16, int(label), i, now])
        ids.append(cur.lastrowid)
    db.conn.close()
    return np.array(ids, dtype=np.int64), labels


@pytest.fixture
def real_run(ws):
    """A finished dissection run over synthetic activations: units 0-2 fire on lesion patches,
    5-6 on normal ones, the rest is noise."""
    patch_ids, labels = _catalog_patches(ws)
    rng = np.random.default_rng(0)
    acts = rng.random((N_PATCHES, N_UNITS, 4, 4)).astype(np.float32)
    for u in LESION_UNITS:
        acts[labels == 1, u] += 3.0 + u
    for u in NORMAL_UNITS:
        acts[labels == 0, u] += 2.0
    source = ActivationSource(patch_ids, lambda a, b: torch.from_numpy(acts[a:b]),
                              {"model_digest": "5eed5eed5eed5eed", "layer": "features.29", "patch_set": "default",
                               "patch_set_digest": "d", "split": "test"}, batch_size=16)
    return execute_run(ws, source, top_k=6)


def test_seed_labels_units_from_evidence(ws, real_run):
    summary = seed_example_concepts(ws, real_run, per_concept=3)
    assert set(summary.concepts["lesion-like texture"]) == set(LESION_UNITS)
    assert set(summary.concepts["fibroglandular tissue"]) <= set(NORMAL_UNITS)
    assert len(summary.concepts["fibroglandular tissue"]) == 2
    for unit in LESION_UNITS:
        assert summary.evidence[unit]["lesion_share_top_k"] == 1.0 and summary.evidence[unit]["effect_size"] > 2
    store = ConceptStore(ws)
    rows = store.label_rows(real_run.model_digest, real_run.layer)
    assert {r.labelled_by for r in rows} == {SEED_ACTOR} and {r.run_id for r in rows} == {real_run.run_id}
    assert "Demo seed" in store.get_concept("lesion-like texture").description

    # a person relabels one seeded unit; seeding again changes nothing people did (and adds nothing new)
    store.label_units(real_run.model_digest, real_run.layer, [0], "mass", by="dr-b", source="cli",
                      run_id=real_run.run_id)
    events_before = len(store.history())
    again = seed_example_concepts(ws, real_run, per_concept=3)
    assert store.labels(real_run.model_digest, real_run.layer)[0].name == "mass"
    assert len(store.history()) == events_before + sum(len(v) for v in again.concepts.values())
    assert not set(again.concepts.get("lesion-like texture", [])) & set(LESION_UNITS)

    # and a report on the run's own numbers is non-empty
    labels = store.labels(real_run.model_digest, real_run.layer)
    report = build_report(real_run.max_activations[:, 1], real_run.thresholds, labels)  # a lesion patch
    lesion = report.concept("lesion-like texture")
    fibro = report.concept("fibroglandular tissue")
    assert lesion.mean_normalised > fibro.mean_normalised


def test_seed_without_evidence_labels_nothing(ws, real_run):
    # thresholds that nothing satisfies: no unit qualifies, nothing is written
    summary = seed_example_concepts(ws, real_run, min_lesion_share=1.01, max_lesion_share=-0.01)
    assert summary.concepts == {} and ConceptStore(ws).history() == []
