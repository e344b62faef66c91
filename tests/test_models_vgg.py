"""Architectures, checkpoints and layer taps (models.vgg, models.checkpoint, models.features)."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch
from torch import nn

from models.checkpoint import base_meta, load_checkpoint, save_checkpoint
from models.features import capture, layer_names
from models.vgg import CONFIGS, DISSECTED_LAYER, build_vgg
from workspace.base.errors import ModelError


def _layout(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in model.named_modules() if name]


def test_vgg16_1ch_is_torchvision_vgg16_with_one_input_channel():
    import torchvision

    ours = build_vgg("vgg16_1ch")
    reference = torchvision.models.vgg16(weights=None, num_classes=2)
    assert _layout(ours) == _layout(reference)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours_shapes.pop("features.0.weight") == (64, 1, 3, 3)
    assert ref_shapes.pop("features.0.weight") == (64, 3, 3, 3)
    assert ours_shapes == ref_shapes
    assert isinstance(ours.features[29], nn.ReLU) and isinstance(ours.features[28], nn.Conv2d)
    assert ours.features[28].out_channels == 512


def test_slim_twin_keeps_feature_layer_names_and_dissected_layer():
    full, slim = build_vgg("vgg16_1ch"), build_vgg("vgg16_slim")
    assert [n for n in _layout(full) if n[0].startswith("features")] == \
        [n for n in _layout(slim) if n[0].startswith("features")]
    assert [n for n in layer_names(slim) if n.startswith("classifier")] == \
        [n for n in layer_names(full) if n.startswith("classifier")]
    convs = [m.out_channels for m in slim.features if isinstance(m, nn.Conv2d)]
    assert convs == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 128, 128, 128]
    x = torch.rand(2, 1, 64, 64)
    with capture(slim, DISSECTED_LAYER) as tap:
        logits = slim.eval()(x)
    assert logits.shape == (2, 2)
    assert tap.output.shape == (2, 128, 4, 4)  # 512 x 512 input gives 32 x 32
    assert sum(p.numel() for p in slim.parameters()) < 1_000_000


def test_a_config_of_its_own_builds_the_slim_shape_with_other_widths():
    # the width study of bench/bench_models.py builds its networks this way
    config = replace(CONFIGS["vgg16_slim"], widths=(4, 8, 8, 16, 24))
    net = build_vgg(config)
    assert [m.out_channels for m in net.features if isinstance(m, nn.Conv2d)] == \
        [4, 4, 8, 8, 8, 8, 8, 16, 16, 16, 24, 24, 24]
    assert layer_names(net) == layer_names(build_vgg("vgg16_slim"))
    assert net.classifier[0].in_features == 24 and net.classifier[0].out_features == 128
    with capture(net, DISSECTED_LAYER) as tap:
        assert net.eval()(torch.rand(1, 1, 64, 64)).shape == (1, 2)
    assert tap.output.shape == (1, 24, 4, 4)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ModelError, match="vgg16_slim"):
        build_vgg("vgg19")


def test_capture_equals_the_truncated_network_and_removes_its_hook():
    torch.manual_seed(0)
    model = build_vgg("vgg16_slim").eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad(), capture(model, "features.29") as tap:
        model(x)
    with torch.no_grad():
        expected = model.features[:30](x)
    torch.testing.assert_close(tap.output, expected)
    with torch.no_grad():
        model(torch.rand(1, 1, 64, 64))
    torch.testing.assert_close(tap.output, expected)  # hook gone: not overwritten
    # a conv output is captured before the in-place ReLU that follows it
    with torch.no_grad(), capture(model, "features.28") as tap:
        model(x)
    assert (tap.output < 0).any()
    with pytest.raises(ModelError, match="features.29"):
        with capture(model, "features.290"):
            pass


def test_checkpoint_round_trip_keeps_weights_metadata_and_digest(tmp_path):
    torch.manual_seed(1)
    model = build_vgg("vgg16_slim").eval()
    meta = base_meta("vgg16_slim", recipe={"lr": 1e-4}, data_digest="abc", metrics={"test": {"auc": 0.9}},
                     operating_point={"threshold": 0.3, "rule": "youden"})
    path = tmp_path / "m.pt"
    digest = save_checkpoint(path, model, meta)
    assert digest == hashlib.sha1(path.read_bytes()).hexdigest()[:16]
    loaded = load_checkpoint(path, "cpu")
    assert loaded.digest == digest and not loaded.model.training
    assert loaded.meta["normalisation"] == {"mean": 0.5, "std": 0.5}
    assert loaded.meta["class_names"] == ["BI-RADS 1/2", "possibly malignant (BI-RADS 0)"]
    assert loaded.meta["recipe"] == {"lr": 1e-4} and loaded.operating_point == 0.3
    assert loaded.meta["torch_version"] == torch.__version__
    x = torch.rand(3, 1, 64, 64)
    torch.testing.assert_close(loaded.preprocess(x), (x - 0.5) / 0.5)
    with torch.no_grad():
        expected = torch.softmax(model((x - 0.5) / 0.5), 1)[:, 1]
    torch.testing.assert_close(loaded.predict_proba(x), expected)


def test_plain_state_dict_needs_an_architecture(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(build_vgg("vgg16_slim").state_dict(), path)
    with pytest.raises(ModelError, match="--arch"):
        load_checkpoint(path, "cpu")
    loaded = load_checkpoint(path, "cpu", arch="vgg16_slim")
    assert loaded.dissected_layer == "features.29"
    with pytest.raises(ModelError, match="does not fit"):
        load_checkpoint(path, "cpu", arch="vgg16_1ch")


def test_any_torchvision_cnn_state_dict_loads_for_dissection_without_downloads(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    net = torchvision.models.resnet18(weights=None, num_classes=2)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    path = tmp_path / "resnet.pt"
    torch.save({"state_dict": net.state_dict()}, path)
    loaded = load_checkpoint(path, "cpu", arch="torchvision:resnet18", layer="layer4")
    assert loaded.dissected_layer == "layer4" and loaded.meta["in_channels"] == 1
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad(), capture(loaded.model, "layer4") as tap:
        logits = loaded.model(loaded.preprocess(x))
    assert logits.shape == (1, 2) and tap.output.shape == (1, 512, 2, 2)
    with pytest.raises(ModelError, match="no layer 'layer5'"):
        load_checkpoint(path, "cpu", arch="torchvision:resnet18", layer="layer5")
    assert not (tmp_path / "torch-home").exists()  # nothing was downloaded


def test_a_pickled_module_loads_only_when_trusted(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(build_vgg("vgg16_slim"), path)
    with pytest.raises(ModelError, match="--trust"):
        load_checkpoint(path, "cpu")
    loaded = load_checkpoint(path, "cpu", trust=True, layer="features.26")
    assert loaded.dissected_layer == "features.26"


def test_a_missing_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        load_checkpoint(bad)


def test_the_slim_head_starts_with_he_weights_not_torchvisions_small_ones():
    # N(0, 0.01) in a 128-wide head shrinks the signal ~10x per layer; He-normal keeps it (std sqrt(2 / fan_in))
    torch.manual_seed(0)
    head = [m for m in build_vgg("vgg16_slim").classifier if isinstance(m, nn.Linear)]
    for layer in head:
        assert layer.weight.std().item() == pytest.approx((2 / layer.in_features) ** 0.5, rel=0.15)
    torchvision_style = build_vgg(replace(CONFIGS["vgg16_slim"], head_init="torchvision"))
    assert torchvision_style.classifier[0].weight.std().item() == pytest.approx(0.01, rel=0.15)
