"""The model card (from the checkpoint, filled in by a card file beside it) and the per-image domain check."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from models.card import ModelCard, card_path
from models.checkpoint import base_meta, file_digest, load_checkpoint, save_checkpoint
from models.vgg import build_vgg
from workspace.data.domain import DomainVerdict, check_domain, domain_profile, image_features


@pytest.fixture
def checkpoint(tmp_path):
    meta = base_meta("vgg16_slim", name="site-model", metrics={"test": {"auc": 0.81, "n_patches": 40}})
    path = tmp_path / "site.pt"
    save_checkpoint(path, build_vgg("vgg16_slim"), meta)
    return path


def test_a_card_file_fills_in_what_the_checkpoint_lacks(checkpoint):
    card = {"model_digest": file_digest(checkpoint), "trained": "2026-10-01", "name": "ignored",
            "data": {"datasets": ["site-a"]},
            "metrics": {"test": {"auc": 0.5, "auc_ci": {"low": 0.7, "high": 0.9}}}}
    card_path(checkpoint).write_text(json.dumps(card))
    loaded = load_checkpoint(checkpoint, "cpu")
    assert loaded.meta["trained"] == "2026-10-01" and loaded.meta["data"]["datasets"] == ["site-a"]
    # the checkpoint's own values win; nested dicts are filled key by key
    assert loaded.meta["name"] == "site-model" and loaded.meta["metrics"]["test"]["auc"] == 0.81
    assert loaded.meta["metrics"]["test"]["auc_ci"] == {"low": 0.7, "high": 0.9}
    summary = loaded.card.summary()
    assert summary == ("Model site-model (vgg16_slim): trained on site-a; test AUC 0.810 (95 % CI 0.700-0.900) "
                       "on 40 test patches; trained 2026-10-01")


def test_a_card_for_another_file_is_ignored_with_a_warning(checkpoint, caplog):
    card_path(checkpoint).write_text(json.dumps({"model_digest": "0" * 16, "trained": "2026-10-01"}))
    with caplog.at_level(logging.WARNING, logger="models.card"):
        loaded = load_checkpoint(checkpoint, "cpu")
    assert "trained" not in loaded.meta and "describes model 0000000000000000" in caplog.text
    card_path(checkpoint).write_text("{not json")
    assert "trained" not in load_checkpoint(checkpoint, "cpu").meta


def test_a_model_with_no_record_says_so():
    card = ModelCard.from_meta({"architecture": "torchvision:resnet18"}, fallback_name="resnet")
    assert card.summary() == "Model resnet (torchvision:resnet18): trained on data it does not record; no test AUC recorded"
    assert not card.synthetic_only and not card.has_domain_profile


def _image(background: float, tissue: float, rows: int = 256, cols: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    pixels = np.full((rows, cols), background, np.float32)
    fg = np.zeros((rows, cols), bool)
    fg[20:230, :120] = True
    pixels[fg] = tissue + 0.05 * rng.standard_normal(int(fg.sum())).astype(np.float32)
    return pixels, fg


def test_the_domain_check_is_quiet_inside_and_names_each_difference_outside():
    train = [image_features(*_image(0.02 + 0.002 * i, 0.45 + 0.01 * i), pixel_spacing=0.085, bits_stored=14)
             for i in range(5)]
    profile = domain_profile(train, ["synthetic"] * 5)
    assert profile["images"] == 5 and profile["bits_stored"] == [14] and profile["datasets"] == ["synthetic"]
    inside = image_features(*_image(0.025, 0.47), pixel_spacing=0.085, bits_stored=14)
    assert check_domain(profile, inside, "synthetic") == DomainVerdict(checked=True, reasons=[])

    film = image_features(*_image(0.0, 0.75), pixel_spacing=None, bits_stored=16)
    verdict = check_domain(profile, film, "local")
    text = " | ".join(verdict.reasons)
    assert verdict.outside and "data set 'local'" in text and "background level 0.000" in text
    assert "breast intensity (median)" in text and "no pixel spacing" in text and "16-bit pixels" in text
    assert verdict.warning().startswith("Outside the model's training domain: ")
    # another spacing is named too; a model with no profile checks nothing
    assert "pixel spacing 0.2 mm" in " ".join(check_domain(profile, dict(inside, pixel_spacing_mm=0.2)).reasons)
    assert check_domain(None, film) == DomainVerdict(checked=False) and DomainVerdict(False).warning() is None
    assert DomainVerdict.from_dict(verdict.to_dict()) == verdict
