"""Training (recipe, determinism, resume) and evaluation metrics, on small in-memory patches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.data import PatchData
from models.evaluate import (
    bootstrap_auc_ci,
    choose_operating_point,
    evaluate_model,
    plot_roc,
    roc_auc,
    sensitivity_specificity,
)
from models.train import PAPER_EPOCHS, SLIM_CPU_EPOCHS, Recipe, augment, train
from workspace.base.errors import ModelError

SIZE = 64


def blob_patches(n: int = 120, seed: int = 0) -> PatchData:
    """Textured patches; the 'lesion' ones (odd positions) hold a bright disc somewhere."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.2, 0.4, (n, SIZE, SIZE)).astype(np.float32)
    labels = np.arange(n) % 2
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in np.flatnonzero(labels):
        cy, cx = rng.integers(16, SIZE - 16, 2)
        x[i] += 0.4 * (((yy - cy) ** 2 + (xx - cx) ** 2) < 64)
    splits = np.array(["train"] * (n * 2 // 3) + ["val"] * (n // 6) + ["test"] * (n - n * 2 // 3 - n // 6))
    return PatchData.from_arrays(x, labels, splits, groups=np.arange(n) // 2, name="blobs")


QUICK = dict(batch_size=16, lr=1e-3, bootstrap=100)


def test_training_learns_and_the_checkpoint_carries_its_recipe_and_metrics(tmp_path):
    data = blob_patches()
    result = train(data, Recipe(epochs=5, **QUICK), tmp_path / "run", device="cpu")
    meta = load_checkpoint(result.path, "cpu").meta
    assert meta["architecture"] == "vgg16_slim" and meta["dissected_layer"] == "features.29"
    assert meta["input_size"] == SIZE and meta["data_digest"] == data.digest
    assert meta["recipe"]["lr"] == 1e-3 and meta["recipe"]["epochs"] == 5 and meta["recipe"]["hflip_p"] == 0.5
    assert meta["split"]["test"]["patches"] == 20 and meta["split"]["train"]["lesion"] == 40
    assert meta["metrics"]["test"]["auc"] >= 0.9
    ci = meta["metrics"]["test"]["auc_ci"]
    assert ci["low"] <= meta["metrics"]["test"]["auc"] <= ci["high"] and ci["clustered_by"] == "patient"
    best = meta["training"]["best_epoch"]
    losses = [h["val_loss"] for h in meta["training"]["history"]]
    assert losses[best - 1] == min(losses)  # the kept weights have the lowest validation loss
    assert 0 < meta["operating_point"]["threshold"] < 1 and meta["operating_point"]["chosen_on"] == "val"
    assert (tmp_path / "run" / "roc.png").read_bytes()[:4] == b"\x89PNG"


def _weights(path):
    return load_checkpoint(path, "cpu").model.state_dict()


def test_training_is_deterministic_under_a_seed(tmp_path):
    data = blob_patches(60)
    a = train(data, Recipe(epochs=2, seed=3, **QUICK), tmp_path / "a", device="cpu")
    b = train(data, Recipe(epochs=2, seed=3, **QUICK), tmp_path / "b", device="cpu")
    c = train(data, Recipe(epochs=2, seed=4, **QUICK), tmp_path / "c", device="cpu")
    wa, wb, wc = _weights(a.path), _weights(b.path), _weights(c.path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_an_interrupted_training_resumes_to_the_same_weights(tmp_path):
    data = blob_patches(60)
    straight = train(data, Recipe(epochs=3, **QUICK), tmp_path / "straight", device="cpu")
    first = train(data, Recipe(epochs=1, **QUICK), tmp_path / "resumed", device="cpu")
    assert first.resumed_from_epoch == 0 and (tmp_path / "resumed" / "resume.pt").exists()
    resumed = train(data, Recipe(epochs=3, **QUICK), tmp_path / "resumed", device="cpu")
    assert resumed.resumed_from_epoch == 1
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in straight.history]
    ws_, wr = _weights(straight.path), _weights(resumed.path)
    assert all(torch.equal(ws_[k], wr[k]) for k in ws_)
    with pytest.raises(ModelError, match="--restart"):
        train(data, Recipe(epochs=3, **{**QUICK, "lr": 5e-4}), tmp_path / "resumed", device="cpu")
    again = train(data, Recipe(epochs=1, **{**QUICK, "lr": 5e-4}), tmp_path / "resumed", device="cpu",
                  restart=True)
    assert again.resumed_from_epoch == 0


def test_training_refuses_data_it_cannot_learn_from(tmp_path):
    one_class = PatchData.from_arrays(np.zeros((4, SIZE, SIZE), np.float32), [0, 0, 0, 0], ["train"] * 4)
    with pytest.raises(ModelError, match="one class"):
        train(one_class, Recipe(epochs=1), tmp_path / "x", device="cpu")
    no_train = PatchData.from_arrays(np.zeros((2, SIZE, SIZE), np.float32), [0, 1], ["test"] * 2)
    with pytest.raises(ModelError, match="no training patches"):
        train(no_train, Recipe(epochs=1), tmp_path / "y", device="cpu")
    assert not (tmp_path / "x" / "model.pt").exists() and not (tmp_path / "y" / "model.pt").exists()


def test_default_schedule_is_the_papers_except_slim_on_cpu():
    recipe = Recipe()
    assert (recipe.batch_size, recipe.lr, recipe.optimizer, recipe.selection) == \
        (32, 1e-4, "adam", "lowest_val_loss")
    assert recipe.normalisation == {"mean": 0.5, "std": 0.5}
    assert recipe.resolved(torch.device("cpu")).epochs == SLIM_CPU_EPOCHS
    assert recipe.resolved(torch.device("cuda")).epochs == PAPER_EPOCHS
    assert Recipe(arch="vgg16_1ch").resolved(torch.device("cpu")).epochs == PAPER_EPOCHS


def test_augmentation_flips_and_blurs_per_patch_deterministically():
    x = torch.rand(4, 1, 16, 16)
    flipped = augment(x, Recipe(hflip_p=1.0, blur_p=0.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(flipped, x.flip(-1))
    blurred = augment(x, Recipe(hflip_p=0.0, blur_p=1.0, blur_sigma=(1.5, 1.5)), torch.Generator().manual_seed(0))
    assert blurred.std() < x.std() * 0.8 and abs(float(blurred.mean() - x.mean())) < 0.02
    again = augment(x, Recipe(), torch.Generator().manual_seed(7))
    torch.testing.assert_close(again, augment(x, Recipe(), torch.Generator().manual_seed(7)))


def _pairwise_auc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_and_bootstrap_match_brute_force():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes ties
    assert roc_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores))
    groups = np.arange(60) // 3
    ci = bootstrap_auc_ci(labels, scores, groups, n_resamples=300, seed=1)
    assert ci["low"] < roc_auc(labels, scores) < ci["high"] and ci["resamples"] == 300
    assert ci == bootstrap_auc_ci(labels, scores, groups, n_resamples=300, seed=1)
    # one resample by hand: patient weights = how often each patient was drawn
    draw = np.random.default_rng(1).integers(0, 20, 20)
    keep = np.concatenate([np.flatnonzero(groups == g) for g in draw])
    weights = np.bincount(draw, minlength=20)[groups].astype(float)
    assert roc_auc(labels, scores, weights) == pytest.approx(_pairwise_auc(labels[keep], scores[keep]))


def test_operating_point_rules_on_validation_scores():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.45, 0.4, 0.7, 0.8, 0.9, 0.05, 0.6])
    youden = choose_operating_point(labels, scores, "youden")
    sens, spec = sensitivity_specificity(labels, scores, youden["threshold"])
    assert sens + spec - 1 == pytest.approx(max(
        sum(sensitivity_specificity(labels, scores, t)) - 1 for t in np.linspace(0, 1, 1001)))
    high = choose_operating_point(labels, scores, "sensitivity:1.0")
    assert high["val_sensitivity"] == 1.0 and 0.3 < high["threshold"] <= 0.4
    assert choose_operating_point(labels, scores, "fixed:0.5")["threshold"] == 0.5
    with pytest.raises(ModelError, match="unknown operating-point rule"):
        choose_operating_point(labels, scores, "best")


def test_evaluation_uses_a_stored_operating_point_and_draws_a_roc(tmp_path):
    data = blob_patches(60)
    result = train(data, Recipe(epochs=2, **QUICK), tmp_path / "m", device="cpu")
    loaded = load_checkpoint(result.path, "cpu")
    metrics, outputs = evaluate_model(loaded, data, operating_point=loaded.meta["operating_point"],
                                      n_resamples=100)
    assert metrics["test"]["auc"] == pytest.approx(loaded.meta["metrics"]["test"]["auc"])
    assert metrics["test"]["sensitivity"] == pytest.approx(loaded.meta["metrics"]["test"]["sensitivity"])
    png = plot_roc(tmp_path / "roc.png", outputs["labels"], outputs["scores"], metrics)
    assert png.stat().st_size > 10_000


def test_batch_norm_folds_into_the_convolutions_without_changing_the_output():
    from models.vgg import ConvBN, build_vgg, fold_batch_norm, with_batch_norm

    torch.manual_seed(0)
    model = with_batch_norm(build_vgg("vgg16_slim"))
    x = torch.rand(6, 1, SIZE, SIZE)
    model.train()
    for _ in range(3):  # running statistics and affine parameters that are not the identity
        model(x * torch.rand(1) + 0.2)
    for layer in model.features:
        if isinstance(layer, ConvBN):
            layer.bn.weight.data.uniform_(0.5, 1.5)
            layer.bn.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    with torch.no_grad():
        before = model(x)
        folded = fold_batch_norm(model)
        after = folded(x)
    assert not any(isinstance(layer, ConvBN) for layer in folded.features)
    assert set(folded.state_dict()) == set(build_vgg("vgg16_slim").state_dict())  # plain VGG16 names
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_the_saved_model_is_plain_vgg_with_or_without_batch_norm(tmp_path):
    data = blob_patches(60)
    normed = train(data, Recipe(epochs=1, **QUICK), tmp_path / "bn", device="cpu")
    plain = train(data, Recipe(epochs=1, batch_norm=False, **QUICK), tmp_path / "plain", device="cpu")
    assert normed.meta["recipe"]["batch_norm"] is True and plain.meta["recipe"]["batch_norm"] is False
    assert set(_weights(normed.path)) == set(_weights(plain.path))
    assert not any("bn" in key or "running" in key for key in _weights(normed.path))
