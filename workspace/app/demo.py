"""The demo: a synthetic cohort, the shipped model, every image read, a dissection run, example concepts.

:func:`prepare` does the data side of ``make demo`` / ``mammo demo`` and is idempotent: each step
checks what the workspace already holds, so a second run only loads. The services side (Label
Studio, the backend, the FiftyOne App) is ``mammo up``'s.

The demo cohort uses a different seed from the cohort the shipped model was trained on, so every
demo patient is unseen by the model; the dissection therefore runs over all demo patches, not only
the test split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from workspace.base.config import Workspace

DEMO_SEED = 2026
DEMO_PATIENTS = 20
DEMO_PATCH_SET = "default"


@dataclass
class DemoState:
    ws: Workspace
    loaded: Any
    run: Any
    image_ids: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        steps = ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items())
        return (f"demo workspace {self.ws.root}: {len(self.image_ids)} mammograms, model {self.loaded.digest}, "
                f"dissection run {self.run.run_id} ({self.run.n_units} units x {len(self.run.patch_ids)} patches)"
                f"\n  steps: {steps}" + "".join(f"\n  {n}" for n in self.notes))


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def prepare(ws: Workspace, *, patients: int = DEMO_PATIENTS, seed: int = DEMO_SEED,
            model: str | None = None) -> DemoState:
    """Make (or reuse) everything the demo shows. ``model``: a checkpoint path; default the shipped one."""
    from models.checkpoint import load_checkpoint, register_model, resolve_model_path
    from models.inference import read_many
    from workspace.base.catalog import open_catalog
    from workspace.data.patches import build_patch_set
    from workspace.data.synth import synthesize
    from workspace.dissect.concepts import seed_example_concepts
    from workspace.dissect.dissect_run import latest_run, run_dissection

    timings: dict[str, float] = {}
    notes: list[str] = []
    db = open_catalog(ws)

    t = time.perf_counter()
    have = db.execute("SELECT COUNT(DISTINCT patient_id) FROM images WHERE dataset = 'synthetic'").fetchone()[0]
    if have < patients:
        _say(f"synthesising {patients} patients ({patients * 4} full-size mammograms as DICOM)")
        synthesize(ws, patients, seed=seed)
    timings["cohort"] = time.perf_counter() - t

    t = time.perf_counter()
    if not db.execute("SELECT 1 FROM patch_sets WHERE patch_set = ?", [DEMO_PATCH_SET]).fetchone():
        _say("cutting the paper's patch set (lesion patches inside the annotated ellipses, balanced normals)")
        build_patch_set(ws, DEMO_PATCH_SET)
    timings["patches"] = time.perf_counter() - t

    loaded = load_checkpoint(resolve_model_path(ws, model))
    register_model(db, loaded)
    image_ids = [r["image_id"] for r in db.query("SELECT image_id FROM images ORDER BY image_id")]

    t = time.perf_counter()
    read = {r[0] for r in db.execute("SELECT image_id FROM image_reads WHERE model_digest = ?", [loaded.digest])}
    unread = [i for i in image_ids if i not in read]
    if unread:
        _say(f"reading {len(unread)} mammograms with the model (patch scores and feature maps kept)")
        result = read_many(ws, unread, loaded)
        notes.extend(f"could not read {image_id}: {message}" for image_id, message in result.errors)
    timings["reads"] = time.perf_counter() - t

    t = time.perf_counter()
    run = latest_run(ws, loaded.digest, loaded.dissected_layer)
    if run is None:
        _say(f"dissecting {loaded.dissected_layer} over every demo patch")
        run = run_dissection(ws, loaded, patch_set=DEMO_PATCH_SET, split=None)
    timings["dissection"] = time.perf_counter() - t

    # Seed once per model and layer: later runs leave the labels to people.
    already = db.execute("SELECT COUNT(*) FROM label_events WHERE model_digest = ? AND layer = ?",
                         [run.model_digest, run.layer]).fetchone()[0]
    seeded = seed_example_concepts(ws, run) if not already else None
    for name, units in (seeded.concepts.items() if seeded else ()):
        if units:
            notes.append(f"seeded example concept {name!r} on units {units}")
    return DemoState(ws=ws, loaded=loaded, run=run, image_ids=image_ids, timings=timings, notes=notes)


__all__ = ["DEMO_SEED", "DEMO_PATIENTS", "DemoState", "prepare"]
