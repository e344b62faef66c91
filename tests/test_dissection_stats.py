"""The streaming statistics against brute-force numpy on small data: exact quantiles, top-k with
ties, the max-activation matrix, shard merges, checkpoints, the sketch's stated error bound, PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workspace.dissect.dissect_run import DissectionStats, dissect_batches, plan_quantile
from workspace.dissect.dissection import pca_embedding
from workspace.dissect.runningstats import (
    RunningMaxActivation,
    RunningQuantileSketch,
    RunningTailQuantile,
    RunningTopK,
    StatisticsError,
    tail_size,
)


def _chunks(n: int, rng: np.random.Generator, most: int = 40):
    pos = 0
    while pos < n:
        step = int(rng.integers(1, most))
        yield pos, min(n, pos + step)
        pos += step


@pytest.mark.parametrize("seed", range(6))
def test_tail_quantile_equals_numpy_quantile_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        n = int(rng.integers(1, 2500))
        q = float(rng.choice([0.99, 0.999, 0.9, 0.5, 0.25, rng.random()]))
        x = (rng.standard_normal((5, n)) * rng.choice([1e-3, 1.0, 1e3])).astype(np.float32)
        if rng.random() < 0.4:
            x = np.maximum(x, 0)              # ReLU-like: most values tie at 0
        if rng.random() < 0.3:
            x = np.round(x, 1).astype(np.float32)   # many ties everywhere
        stat = RunningTailQuantile(5, n, q)
        for a, b in _chunks(n, rng):
            stat.add(torch.from_numpy(x[:, a:b]))
        assert stat.m == tail_size(n, q) <= n
        np.testing.assert_array_equal(stat.result().numpy(), np.quantile(x, q, axis=1))


def test_tail_quantile_from_patch_batches_with_cold_units():
    """The layer-shaped path: only units whose batch max beats their floor are gathered."""
    rng = np.random.default_rng(8)
    n_patches, units = 90, 9
    acts = np.maximum(rng.standard_normal((n_patches, units, 4, 5)), 0).astype(np.float32)
    acts[:, 3] *= np.linspace(2.0, 0.01, n_patches)[:, None, None]   # hot early, cold later
    acts[:, 5] = 0.0                                                   # all ties
    acts[40:, 7] += 5.0                                                # a late surge
    stat = RunningTailQuantile(units, n_patches * 20, 0.99)
    for a, b in _chunks(n_patches, rng, 6):
        stat.add_patches(torch.from_numpy(acts[a:b]))
    expect = np.quantile(acts.transpose(1, 0, 2, 3).reshape(units, -1), 0.99, axis=1)
    np.testing.assert_array_equal(stat.result().numpy(), expect)


def test_tail_quantile_edges_and_errors():
    x = np.array([[3.0, 1.0, 2.0]], dtype=np.float32)
    for q in (0.0, 1.0, 0.5):
        stat = RunningTailQuantile(1, 3, q)
        stat.add(torch.from_numpy(x))
        assert stat.result().item() == np.quantile(x, q)
    stat = RunningTailQuantile(1, 3, 0.99)
    stat.add(torch.from_numpy(x[:, :2]))
    with pytest.raises(StatisticsError, match="expected 3"):
        stat.result()                         # fewer values than announced
    with pytest.raises(StatisticsError, match="more values"):
        stat.add(torch.ones(1, 5))
    with pytest.raises(StatisticsError, match="NaN"):
        RunningTailQuantile(1, 3, 0.99).add(torch.tensor([[1.0, float("nan"), 2.0]]))


def test_tail_quantile_shards_merge_and_state_round_trip():
    rng = np.random.default_rng(7)
    x = np.maximum(rng.standard_normal((4, 3000)), 0).astype(np.float32)
    perm = rng.permutation(3000)
    parts = np.array_split(perm, 3)
    shards = []
    for part in parts:
        s = RunningTailQuantile(4, 3000, 0.99)
        for a, b in _chunks(len(part), rng, 300):
            s.add(torch.from_numpy(x[:, part[a:b]]))
        shards.append(s)
    restored = RunningTailQuantile(4, 3000, 0.99)
    restored.load_state_dict(shards[1].state_dict())
    merged = shards[2].merge(shards[0]).merge(restored)
    np.testing.assert_array_equal(merged.result().numpy(), np.quantile(x, 0.99, axis=1))
    with pytest.raises(StatisticsError):
        RunningTailQuantile(4, 3000, 0.99).merge(RunningTailQuantile(4, 3000, 0.9))


def test_top_k_breaks_ties_by_patch_id_and_merges():
    rng = np.random.default_rng(1)
    n, units, k = 60, 6, 5
    values = rng.integers(0, 4, size=(units, n)).astype(np.float32)    # heavy ties
    ids = rng.permutation(np.arange(1000, 1000 + n))
    one = RunningTopK(k)
    for a, b in _chunks(n, rng, 9):
        one.add(torch.from_numpy(values[:, a:b]), torch.from_numpy(ids[a:b]))
    left, right = RunningTopK(k), RunningTopK(k)
    left.add(torch.from_numpy(values[:, :25]), torch.from_numpy(ids[:25]))
    right.add(torch.from_numpy(values[:, 25:]), torch.from_numpy(ids[25:]))
    merged = right.merge(left)
    for unit in range(units):
        order = sorted(range(n), key=lambda j: (-values[unit, j], ids[j]))[:k]
        expect_ids = ids[order]
        for stat in (one, merged):
            got_v, got_ids = stat.result()
            np.testing.assert_array_equal(got_ids[unit].numpy(), expect_ids)
            np.testing.assert_array_equal(got_v[unit].numpy(), values[unit, order])
    small = RunningTopK(10)
    small.add(torch.ones(2, 3), torch.tensor([5, 3, 4]))
    assert small.result()[1].tolist() == [[3, 4, 5], [3, 4, 5]]     # fewer patches than k


def test_max_activation_matrix_orders_by_patch_id_and_rejects_duplicates():
    stat = RunningMaxActivation()
    stat.add(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([9, 2]))
    other = RunningMaxActivation()
    other.add(torch.tensor([[5.0], [6.0]]), torch.tensor([4]))
    values, ids = stat.merge(other).result()
    assert ids.tolist() == [2, 4, 9]
    assert values.tolist() == [[2.0, 5.0, 1.0], [4.0, 6.0, 3.0]]
    again = RunningMaxActivation()
    again.load_state_dict(stat.state_dict())
    again.add(torch.tensor([[0.0], [0.0]]), torch.tensor([4]))
    with pytest.raises(StatisticsError, match="twice"):
        again.result()


def test_sketch_rank_error_bound_holds_and_merges():
    rng = np.random.default_rng(3)
    n, q = 20000, 0.99
    x = (rng.gamma(0.5, 1.0, size=(3, n)) * (rng.random((3, n)) > 0.3)).astype(np.float32)
    whole = RunningQuantileSketch(3, q, capacity=256)
    for a, b in _chunks(n, rng, 700):
        whole.add(torch.from_numpy(x[:, a:b]))
    a_half, b_half = RunningQuantileSketch(3, q, 256), RunningQuantileSketch(3, q, 256)
    a_half.add(torch.from_numpy(x[:, : n // 3]))
    b_half.add(torch.from_numpy(x[:, n // 3:]))
    restored = RunningQuantileSketch(3, q, 256)
    restored.load_state_dict(b_half.state_dict())
    merged = a_half.merge(restored)
    ordered = np.sort(x, axis=1)
    for sketch in (whole, merged):
        assert sketch.count == n
        bound = sketch.rank_error
        levels = int(np.ceil(np.log2(n / 256))) + 1
        assert 0 < bound <= n * levels / 256     # the MRL bound: about N log2(N / c) / c
        ranks = [0, n // 2, int((n - 1) * q), n - 1]
        est = sketch.value_at_ranks(ranks).numpy()
        for unit in range(3):
            for col, r in enumerate(ranks):
                v = est[unit, col]
                lo = np.searchsorted(ordered[unit], v, "left")      # true ranks of v: [lo, hi)
                hi = np.searchsorted(ordered[unit], v, "right")
                assert lo - bound <= r <= hi - 1 + bound
        t = sketch.result().numpy()
        lo_v = ordered[:, max(0, int((n - 1) * q) - bound)]
        hi_v = ordered[:, min(n - 1, int((n - 1) * q) + 1 + bound)]
        assert np.all(lo_v <= t) and np.all(t <= hi_v)


def test_plan_switches_to_sketch_past_the_budget():
    exact = plan_quantile(512, 1000 * 1024, 0.99, 1024, 8192)
    assert exact["method"] == "exact" and exact["tail_size"] == tail_size(1000 * 1024, 0.99)
    sketch = plan_quantile(512, 100_000 * 1024, 0.99, 64, 8192)
    assert sketch["method"] == "sketch" and sketch["sketch_capacity"] >= 16
    assert 512 * sketch["sketch_capacity"] * 4 <= 64 * 2**20


def _activation_batches(acts: np.ndarray, ids: np.ndarray, rng: np.random.Generator):
    for a, b in _chunks(len(ids), rng, 7):
        yield torch.from_numpy(acts[a:b]), ids[a:b]


def test_two_shards_merge_into_exactly_one_pass():
    rng = np.random.default_rng(11)
    acts = np.maximum(rng.standard_normal((50, 12, 5, 6)), 0).astype(np.float32)
    ids = np.arange(200, 250)
    one = dissect_batches(_activation_batches(acts, ids, rng), 50, top_k=4)
    assert one.plan["method"] == "exact"
    order = rng.permutation(50)
    first, second = order[:21], order[21:]
    # shards must be sized for the whole run (the total count fixes the exact buffer)
    s1 = DissectionStats(12, (5, 6), one.plan, 0.99, 4)
    s2 = DissectionStats(12, (5, 6), one.plan, 0.99, 4)
    for stats, part in ((s1, first), (s2, second)):
        for a, b in _chunks(len(part), rng, 6):
            stats.add(torch.from_numpy(acts[part[a:b]]), ids[part[a:b]])
    s2 = DissectionStats.from_state_dict(s2.state_dict())     # as if shipped from another worker
    merged = s2.merge(s1).results()
    whole = one.results()
    for name, value in whole.items():
        np.testing.assert_array_equal(merged[name], value, err_msg=name)
    # and both equal the brute-force definitions
    per_unit = acts.transpose(1, 0, 2, 3).reshape(12, -1)
    np.testing.assert_array_equal(whole["thresholds"], np.quantile(per_unit, 0.99, axis=1))
    a = acts.reshape(50, 12, -1).max(axis=2).T
    np.testing.assert_array_equal(whole["max_activations"], a)
    np.testing.assert_array_equal(whole["patch_ids"], ids)
    for unit in range(12):
        expect = sorted(range(50), key=lambda j: (-a[unit, j], ids[j]))[:4]
        np.testing.assert_array_equal(whole["top_k"][unit], ids[expect])


def test_pca_matches_sklearn_and_has_a_fixed_sign():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(5)
    for units, patches in ((40, 300), (64, 20), (3, 3)):
        a = (rng.random((units, 4)) @ rng.random((4, patches)) + 0.05 * rng.random((units, patches))).astype(np.float32)
        coords, variance, ratio = pca_embedding(a)
        ref = PCA(2, svd_solver="full").fit(a.astype(np.float64))
        np.testing.assert_allclose(variance, ref.explained_variance_, rtol=1e-8)
        np.testing.assert_allclose(ratio, ref.explained_variance_ratio_, rtol=1e-8)
        np.testing.assert_allclose(np.abs(coords), np.abs(ref.transform(a.astype(np.float64))), atol=1e-8)
        for c in range(2):
            assert coords[np.argmax(np.abs(coords[:, c])), c] > 0
        flipped, _, _ = pca_embedding(a[:, ::-1])       # same data, other column order: same embedding
        np.testing.assert_allclose(flipped, coords, atol=1e-8)
    coords, variance, _ = pca_embedding(np.ones((5, 7), np.float32))
    assert not coords.any() and not variance.any()     # no variance: a zero embedding, not noise
