"""Dissection and reads on a real local Ray cluster (started here with num_cpus=2): the merged run equals
the single pass bit for bit for 1, 2 and 3 shards, a worker killed half way (a real SIGKILL) is restarted
by Ray and changes nothing, nothing half-finished looks finished, `mammo dissect --ray ADDRESS` joins the
running cluster, and reads written by workers are found from another mount point of the workspace."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from workspace.base.config import Workspace
from workspace.dissect.cluster import default_shards, read_progress, shard_bounds

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ARRAYS = ("max_activations", "patch_ids", "top_k", "top_k_values", "thresholds", "pca", "explained_variance",
          "explained_variance_ratio")


def test_shards_are_cut_on_batch_boundaries_and_cover_everything():
    for n, shards, bs in [(50, 3, 8), (7, 5, 8), (64, 2, 8), (1000, 7, 6), (9, 9, 1)]:
        bounds = shard_bounds(n, shards, bs)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a < b for a, b in bounds) and all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:], strict=False))
        assert all(a % bs == 0 for a, _ in bounds) and len(bounds) == min(shards, -(-n // bs))
    # a shard's max-activation columns take at most a quarter of the budget; at least one shard per worker
    assert default_shards(1000, 512, 2, 1024) == 2
    for n, units, workers, budget_mb in [(1_000_000, 512, 2, 64), (300_000, 64, 4, 16)]:
        shards = default_shards(n, units, workers, budget_mb)
        quarter = budget_mb * 2**20 / 4
        assert shards >= workers and -(-n // shards) * units * 4 <= quarter   # a shard's max-activation columns
        assert -(-n // (shards - 1)) * units * 4 > quarter                   # no fewer shards would do


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def copy_of_pipeline(pipeline, tmp_path) -> Workspace:
    """The pipeline workspace without its runs: the same patch set, catalog and model."""
    target = tmp_path / "mount_a" / "ws"
    shutil.copytree(pipeline.ws.root, target, ignore=shutil.ignore_patterns("runs", "reads"))
    return Workspace.open(target)


def _assert_same_run(run, reference):
    assert run.run_id == reference.run_id
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(run, name), getattr(reference, name), err_msg=name)


def test_a_finished_request_needs_no_cluster(pipeline, copy_of_pipeline, monkeypatch):
    """`mammo dissect --ray` of a request already run finds the run before it would start a local cluster (this
    test runs before the module's cluster starts)."""
    from workspace.dissect import cluster as cluster_module

    pytest.importorskip("ray")
    shutil.copytree(pipeline.run.path, copy_of_pipeline.runs_dir / pipeline.run.run_id)

    def no_cluster(*_args, **_kwargs):
        raise AssertionError("a cluster was started for a finished run")

    monkeypatch.setattr(cluster_module, "cluster", no_cluster)
    run = cluster_module.dissect_on_ray(copy_of_pipeline, pipeline.loaded, patch_set="default", split=None)
    _assert_same_run(run, pipeline.run)


def test_a_ray_run_equals_the_single_pass_for_any_shard_count(ray_cluster, pipeline, copy_of_pipeline):
    from workspace.dissect.cluster import dissect_on_ray

    for shards in (1, 2, 3):
        run = dissect_on_ray(copy_of_pipeline, pipeline.loaded, patch_set="default", split=None, shards=shards,
                             workers=2, batch_size=4)
        _assert_same_run(run, pipeline.run)
        execution = run.manifest["execution"]
        assert (execution["mode"], execution["shards"], execution["workers"]) == ("ray", shards, min(shards, 2))
        assert not (run.path / "shards").exists() and not list(copy_of_pipeline.runs_dir.glob(".partial-*"))
        shutil.rmtree(run.path)   # the next shard count computes it again


def test_a_driver_joining_a_cluster_starts_its_workers_before_it_loads_the_model(ray_cluster, pipeline,
                                                                                  copy_of_pipeline, monkeypatch):
    """The workers' start-up (a process, torch) overlaps the driver's (torch, the model, the first batch): the
    issue's 1-worker overhead. The command's modules import without torch, so the workers start first there."""
    from workspace.dissect import cluster as cluster_module

    events: list[str] = []
    real = cluster_module._actor_class

    def actor_class(ray, worker, plan):
        events.append(f"actor with {plan.threads()} threads")
        return real(ray, worker, plan)

    def load():
        events.append("model loaded")
        return pipeline.loaded

    monkeypatch.setattr(cluster_module, "_actor_class", actor_class)
    run = cluster_module.dissect_on_ray(copy_of_pipeline, load, address=ray_cluster, patch_set="default",
                                        split=None, workers=2)
    assert events == ["actor with 1 threads", "actor with 1 threads", "model loaded"]
    _assert_same_run(run, pipeline.run)
    # one shard asked for: one worker, with the cluster's 2 CPUs (the plan is made before the model is loaded)
    shutil.rmtree(run.path)
    events.clear()
    run = cluster_module.dissect_on_ray(copy_of_pipeline, load, address=ray_cluster, patch_set="default",
                                        split=None, shards=1)
    assert events == ["actor with 2 threads", "model loaded"]
    assert run.manifest["execution"]["workers"] == 1
    _assert_same_run(run, pipeline.run)

    code = ("import sys, workspace.app.cli, workspace.app.commands.dissect, workspace.dissect.cluster\n"
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_errors_on_the_way_say_what_went_wrong(ray_cluster, pipeline, copy_of_pipeline, tmp_path):
    """The loader's own error reaches the caller unchanged (the started workers are stopped); a worker's error
    reaches it with the worker's words, here a workers' workspace without the patch set."""
    from workspace.base.errors import MammoError
    from workspace.dissect.cluster import ClusterError, dissect_on_ray

    def broken():
        raise MammoError("no such model here")

    with pytest.raises(MammoError, match="no such model here"):
        dissect_on_ray(copy_of_pipeline, broken, address=ray_cluster, patch_set="default", split=None)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(copy_of_pipeline.root, elsewhere, ignore=shutil.ignore_patterns("patches"))
    with pytest.raises(ClusterError, match="shard 0 failed on the cluster: .*patch") as error:
        dissect_on_ray(copy_of_pipeline, pipeline.loaded, address=ray_cluster, patch_set="default", split=None,
                       workers=1, worker_root=elsewhere)
    assert "ray::" not in str(error.value), str(error.value)
    assert not list(copy_of_pipeline.runs_dir.glob("*/manifest.json"))


def test_a_worker_killed_half_way_changes_nothing(ray_cluster, pipeline, copy_of_pipeline):
    ws = copy_of_pipeline
    final = ws.runs_dir / pipeline.run.run_id
    shard_dir = ws.runs_dir / f".partial-{pipeline.run.run_id}" / "shards"
    env = {**os.environ, "MAMMO_QUIET": "1"}
    command = [sys.executable, "-m", "workspace.app.cli", "dissect", "--split", "all", "--model",
               str(pipeline.loaded.path), "--ray", ray_cluster, "--workers", "2", "--shards", "3", "--batch-size", "1",
               "--workspace", str(ws.root)]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 300
    try:
        while killed is None and driver.poll() is None and time.monotonic() < deadline:
            for shard, record in read_progress(shard_dir).items() if shard_dir.is_dir() else []:
                if 0 < record["done"] < record["total"]:
                    os.kill(record["pid"], signal.SIGKILL)   # the worker, half way through its shard
                    killed = (shard, record["pid"])
                    break
            assert not (final / "manifest.json").exists(), "a run looked finished before its shards were"
            time.sleep(0.02)
        out, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert killed is not None, "no worker was caught half way through a shard"
    assert driver.returncode == 0, err[-2000:]
    from workspace.dissect.dissect_run import load_run

    run = load_run(ws, pipeline.run.run_id)
    _assert_same_run(run, pipeline.run)
    shard, pid = killed
    assert run.manifest["execution"]["shard_pids"][str(shard)] != pid  # Ray restarted the worker, it redid the shard
    assert "on Ray" in out and "3 shards" in out


def test_reads_on_ray_are_found_from_another_mount_point(ray_cluster, pipeline, copy_of_pipeline, tmp_path):
    from models.inference import read_many
    from workspace.base.catalog import open_catalog
    from workspace.dissect.cluster import read_many_on_ray

    ws = copy_of_pipeline
    mount_b = tmp_path / "mount_b"
    mount_b.symlink_to(tmp_path / "mount_a")   # the workers' view of the same storage
    ids = pipeline.image_ids[:3] + ["I-doesnotexist"]
    summary = read_many_on_ray(ws, ids, pipeline.loaded, workers=2, worker_root=mount_b / "ws")
    assert [r.image_id for r in summary.reads] == ids[:3] and summary.errors[0][0] == "I-doesnotexist"
    assert all(not r.cached for r in summary.reads)
    expected = {r.image_id: r for r in read_many(pipeline.ws, ids[:3], pipeline.loaded).reads}
    for read in summary.reads:
        np.testing.assert_array_equal(read.scores, expected[read.image_id].scores)
    # the storage is now seen at another mount point: every path the catalog holds still resolves there
    (tmp_path / "mount_a").rename(tmp_path / "mount_c")
    moved = Workspace.open(tmp_path / "mount_c" / "ws")
    rows = list(open_catalog(moved).query("SELECT image_id, cache_path FROM image_reads WHERE model_digest = ?",
                                          [pipeline.loaded.digest]))
    assert {r["image_id"] for r in rows} >= set(ids[:3])
    assert all(not os.path.isabs(r["cache_path"]) for r in rows)
    again = read_many(moved, ids[:3], pipeline.loaded)
    assert all(r.cached and r.maps is not None and len(r.maps) == len(r.scores) for r in again.reads)


def test_the_rest_of_the_project_does_not_need_ray(tmp_path):
    """With Ray missing, the CLI, the dissection and the services import and run; --ray says how to get it."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "import workspace.app.cli, workspace.dissect.dissect_run, workspace.dissect.session, ml_backend.app\n"
            "import fiftyone_plugins.sync, workspace.dissect.cluster\n"
            "from workspace.dissect.cluster import cluster, ClusterError\n"
            "try:\n    cluster().__enter__()\nexcept ClusterError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install 'mammo-dissect[ray]'" in out.stdout
