"""Dissection runs: the folder and manifest, the catalog row, immutability, a run killed half way
(a real SIGKILL) that leaves nothing finished and resumes to the same result, the sketch path, and
the real thing: a VGG checkpoint over a workspace patch set, from the API and from `mammo dissect`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from workspace.base.config import Workspace
from workspace.base.errors import CatalogError, MammoError
from workspace.dissect.dissect_run import (
    ActivationSource,
    DissectionError,
    execute_run,
    latest_run,
    list_runs,
    load_run,
)

IDENTITY = {"model_digest": "0123456789abcdef", "layer": "net.3", "patch_set": "toy",
            "patch_set_digest": "feedface", "split": "test"}


def make_source(n: int = 40, delay: float = 0.0, batch_size: int = 6) -> ActivationSource:
    """A real (tiny) CNN over fixed random patches: 16 units at 8 x 8."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU()).eval()
    x = torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = np.arange(500, 500 + n, dtype=np.int64)[::-1].copy()    # not ascending on purpose

    def activations(start: int, stop: int) -> torch.Tensor:
        if delay:
            time.sleep(delay)
        with torch.no_grad():
            return net(x[start:stop])

    return ActivationSource(ids, activations, dict(IDENTITY), batch_size)


def brute_force(source: ActivationSource) -> dict[str, np.ndarray]:
    acts = source.activations(0, len(source.patch_ids)).numpy()
    units = acts.shape[1]
    order = np.argsort(source.patch_ids)
    acts, ids = acts[order], source.patch_ids[order]
    a = acts.reshape(len(ids), units, -1).max(axis=2).T
    return {"thresholds": np.quantile(acts.transpose(1, 0, 2, 3).reshape(units, -1), 0.99, axis=1),
            "max_activations": a, "patch_ids": ids, "acts": acts}


def test_run_folder_manifest_catalog_and_exact_arrays(ws):
    source = make_source()
    run = execute_run(ws, source, top_k=5)
    ref = brute_force(source)
    assert run.path == ws.runs_dir / run.run_id and (run.path / "manifest.json").is_file()
    np.testing.assert_array_equal(run.thresholds, ref["thresholds"])
    np.testing.assert_array_equal(run.max_activations, ref["max_activations"])
    np.testing.assert_array_equal(run.patch_ids, ref["patch_ids"])
    a, ids = ref["max_activations"], ref["patch_ids"]
    for unit in range(16):
        best = sorted(range(len(ids)), key=lambda j: (-a[unit, j], ids[j]))[:5]
        np.testing.assert_array_equal(run.top_k[unit], ids[best])
        np.testing.assert_array_equal(run.top_k_values[unit], a[unit, best])
    assert run.pca.shape == (16, 2) and run.explained_variance.shape == (2,)
    m = run.manifest
    assert m["model_digest"] == IDENTITY["model_digest"] and m["layer"] == "net.3"
    assert m["patch_set_digest"] == "feedface" and m["split"] == "test"
    assert m["n_units"] == 16 and m["n_patches"] == 40 and m["map_shape"] == [8, 8]
    assert m["thresholds"]["method"] == "exact" and m["thresholds"]["sketch_rank_error"] == 0
    assert m["align_corners"] is False and m["quantile"] == 0.99 and m["top_k"] == 5
    assert m["mask_rule"] == "upsampled map > threshold"        # strictly above (dissection.MASK_RULE)
    assert {"torch", "numpy", "mammo_dissect"} <= set(m["versions"])
    assert m["timing"]["forward_s"] >= 0 and m["timing"]["statistics_s"] >= 0
    rows = list_runs(ws)
    assert len(rows) == 1 and rows[0]["status"] == "complete" and rows[0]["run_id"] == run.run_id
    assert json.loads(rows[0]["manifest"])["run_id"] == run.run_id
    assert latest_run(ws, IDENTITY["model_digest"]).run_id == run.run_id
    assert latest_run(ws, IDENTITY["model_digest"], layer="other") is None
    assert not list(ws.runs_dir.glob(".partial-*"))
    # immutable: the same request finds the finished run and leaves its files alone
    stamp = (run.path / "thresholds.npy").stat().st_mtime_ns
    again = execute_run(ws, source, top_k=5)
    assert again.run_id == run.run_id and (run.path / "thresholds.npy").stat().st_mtime_ns == stamp
    # another configuration is another run
    other = execute_run(ws, source, top_k=3)
    assert other.run_id != run.run_id and len(list_runs(ws)) == 2


def test_sketch_run_states_its_rank_error_and_brackets_the_exact_threshold(ws):
    source = make_source(n=40)
    run = execute_run(ws, source, sketch_capacity=64)
    th = run.manifest["thresholds"]
    assert th["method"] == "sketch" and th["sketch_rank_error"] > 0 and th["sketch_capacity"] == 64
    assert th["sketch_rank_error_fraction"] == th["sketch_rank_error"] / (40 * 64)
    ref = brute_force(source)
    values = np.sort(ref["acts"].transpose(1, 0, 2, 3).reshape(16, -1), axis=1)
    n = values.shape[1]
    r = int((n - 1) * 0.99)
    err = th["sketch_rank_error"]
    assert np.all(values[:, max(0, r - err)] <= run.thresholds)
    assert np.all(run.thresholds <= values[:, min(n - 1, r + 1 + err)])


def test_a_small_memory_budget_switches_to_the_sketch(ws):
    run = execute_run(ws, make_source(n=40), memory_budget_mb=0.032)
    assert run.manifest["thresholds"]["method"] == "sketch"
    assert run.manifest["thresholds"]["exact_peak_bytes"] > 0.032 * 2**20
    with pytest.raises(MammoError, match="too small"):
        execute_run(ws, make_source(n=40), memory_budget_mb=0.001)


def test_bad_requests_are_clear_errors(ws):
    with pytest.raises(DissectionError, match="quantile"):
        execute_run(ws, make_source(), quantile=1.5)
    with pytest.raises(DissectionError, match="top-k"):
        execute_run(ws, make_source(), top_k=0)
    empty = make_source()
    empty.patch_ids = np.zeros(0, dtype=np.int64)
    with pytest.raises(DissectionError, match="no patches"):
        execute_run(ws, empty)
    with pytest.raises(CatalogError, match="no finished"):
        load_run(ws, "nope")


CHILD = """
import sys
from workspace.base.config import Workspace
from workspace.dissect.dissect_run import execute_run
from tests.test_dissection_run import make_source
execute_run(Workspace.open(sys.argv[1]), make_source(delay=0.3, batch_size=4), top_k=5, checkpoint_every_s=0)
"""


def test_killed_run_leaves_nothing_finished_and_resumes_to_the_same_result(ws, tmp_path):
    env = {**os.environ, "MAMMO_QUIET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ws.root)], env=env,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.time() + 120
        state = None
        while time.time() < deadline and child.poll() is None:
            found = list(ws.runs_dir.glob(".partial-*/state.pt"))
            if found and torch.load(found[0], weights_only=True)["position"] >= 12:
                state = found[0]
                break
            time.sleep(0.05)
        assert state is not None, "the child never checkpointed"
        child.kill()                       # SIGKILL: no cleanup code runs
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    run_id = state.parent.name.removeprefix(".partial-")
    assert not (ws.runs_dir / run_id).exists()
    rows = list_runs(ws)
    assert [r["status"] for r in rows] == ["running"]
    assert latest_run(ws, IDENTITY["model_digest"]) is None
    with pytest.raises(CatalogError):
        load_run(ws, run_id)

    resumed = execute_run(ws, make_source(batch_size=4), top_k=5)
    assert resumed.run_id == run_id
    assert resumed.manifest["timing"]["resumed_from_patch"] >= 12
    assert [r["status"] for r in list_runs(ws)] == ["complete"]
    assert not state.parent.exists()
    clean = execute_run(Workspace.open(tmp_path / "clean"), make_source(batch_size=4), top_k=5)
    for name in ("max_activations", "patch_ids", "top_k", "top_k_values", "thresholds", "pca"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(clean, name), err_msg=name)


# -- the real model on a real patch set -------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort_ws(small_cohort, tmp_path_factory) -> Workspace:
    """A private copy of the small cohort workspace (runs and reads written here stay here)."""
    dst = tmp_path_factory.mktemp("dissect") / "ws"
    shutil.copytree(small_cohort.ws.root, dst)
    return Workspace.open(dst)


@pytest.fixture(scope="module")
def slim_checkpoint(tmp_path_factory, small_cohort) -> Path:
    from models.checkpoint import base_meta, save_checkpoint
    from models.vgg import build_vgg

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "slim.pt"
    save_checkpoint(path, build_vgg("vgg16_slim").eval(), base_meta("vgg16_slim", input_size=small_cohort.patch_size))
    return path


def test_dissection_of_a_checkpoint_over_a_patch_set(cohort_ws, slim_checkpoint, capsys):
    from models.checkpoint import load_checkpoint
    from models.features import capture
    from workspace.app.cli import main
    from workspace.data.patches import open_patch_set
    from workspace.dissect.dissect_run import run_dissection

    loaded = load_checkpoint(slim_checkpoint, "cpu")
    run = run_dissection(cohort_ws, loaded, split=None, top_k=4)
    pset = open_patch_set(cohort_ws, "default")
    rows = sorted(pset.rows, key=lambda r: r["patch_id"])
    with torch.inference_mode(), capture(loaded.model, loaded.dissected_layer) as tap:
        loaded.model(loaded.preprocess(pset.batch([r["array_index"] for r in rows])))
    acts = tap.output.numpy()
    units = acts.shape[1]
    assert run.n_units == units and run.layer == "features.29"
    np.testing.assert_array_equal(run.patch_ids, [r["patch_id"] for r in rows])
    np.testing.assert_allclose(run.max_activations, acts.reshape(len(rows), units, -1).max(axis=2).T,
                               rtol=1e-5, atol=1e-6)   # batch composition may change conv rounding
    np.testing.assert_allclose(run.thresholds, np.quantile(acts.transpose(1, 0, 2, 3).reshape(units, -1), 0.99,
                                                           axis=1), rtol=1e-5, atol=1e-6)
    assert run.manifest["patch_set_digest"] == pset.digest and run.manifest["split"] == "all"
    assert run.model_digest == loaded.digest

    code = main(["dissect", "--workspace", str(cohort_ws.root), "--model", str(slim_checkpoint),
                 "--split", "all", "--top-k", "4"])
    out = capsys.readouterr().out
    assert code == 0 and run.run_id in out and f"{units} units" in out
    code = main(["dissect", "--workspace", str(cohort_ws.root), "--model", str(slim_checkpoint),
                 "--patch-set", "missing"])
    assert code == 1 and "no patch set 'missing'" in capsys.readouterr().err
