"""VGG16 for 1-channel mammogram patches, and a slim twin that trains on a CPU.

One configuration table (:data:`CONFIGS`) and one builder (:func:`build_vgg`), in the shape of
torchvision's ``models/vgg.py``. Layer names are torchvision's: ``features.N`` for the convolution
stack and ``classifier.N`` for the head, so a name such as ``features.29`` means the same position
(the last ReLU of the fifth conv block, :data:`DISSECTED_LAYER`) in both architectures.

- ``vgg16_1ch``: torchvision's VGG16 (configuration "D", no batch norm) with one input channel and
  two classes, as in Lu & Perer. 512 units at the dissected layer (32 x 32 for a 512 x 512 patch).
- ``vgg16_slim``: the same five blocks, thirteen convolutions and layer indices, with widths
  (8, 16, 32, 64, 128), a global average pool instead of the 7 x 7 pool, and a 128-wide head.
  128 units at the dissected layer: enough for the neuron map and concept groups, while the whole
  network costs about 1.5 GMAC per 512 x 512 patch instead of ~80 (numbers in bench/RESULTS.md).

The forward pass returns logits; softmax gives P(class) (class 1 = "possibly malignant").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workspace.base.errors import ModelError

DISSECTED_LAYER = "features.29"
"""The layer both architectures dissect: the ReLU after the last convolution of block 5."""

CLASS_NAMES = ["BI-RADS 1/2", "possibly malignant (BI-RADS 0)"]

VGG16_BLOCKS: tuple[int, ...] = (2, 2, 3, 3, 3)
"""Convolutions per block in VGG16 (torchvision configuration "D")."""


@dataclass(frozen=True)
class VggConfig:
    """One architecture: block widths (convolutions per block as VGG16), and the head."""

    widths: tuple[int, int, int, int, int]
    pool: int  # side of the adaptive average pool before the classifier (7 in torchvision, 1 = global)
    hidden: int  # width of the two hidden fully connected layers
    dropout: float = 0.5
    # torchvision's N(0, 0.01) suits its 4096-wide head; in a 128-wide head it shrinks the signal ~10x per
    # layer (0.01 * sqrt(128)), so the slim head starts with He-normal weights instead
    head_init: str = "torchvision"  # torchvision | he

    def layer_cfg(self) -> list[int | str]:
        """torchvision-style list: conv widths and "M" for max pooling."""
        cfg: list[int | str] = []
        for width, n in zip(self.widths, VGG16_BLOCKS, strict=True):
            cfg += [width] * n + ["M"]
        return cfg


CONFIGS: dict[str, VggConfig] = {
    "vgg16_1ch": VggConfig(widths=(64, 128, 256, 512, 512), pool=7, hidden=4096),
    "vgg16_slim": VggConfig(widths=(8, 16, 32, 64, 128), pool=1, hidden=128, head_init="he"),
}
ARCHITECTURES = tuple(CONFIGS)


class VGG(nn.Module):
    """``features`` (conv/ReLU/max-pool), ``avgpool``, ``classifier`` (Linear-ReLU-Dropout x 2, Linear)."""

    def __init__(self, features: nn.Sequential, out_channels: int, pool: int, hidden: int,
                 num_classes: int, dropout: float, head_init: str = "torchvision") -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        self.classifier = nn.Sequential(
            nn.Linear(out_channels * pool * pool, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        self._init_weights(head_init)

    def _init_weights(self, head_init: str) -> None:
        # torchvision's VGG initialisation (there are no pretrained weights to start from here)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                if head_init == "he":
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                else:
                    nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def make_layers(cfg: list[int | str], in_channels: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(v)
    return nn.Sequential(*layers)


def build_vgg(arch: str | VggConfig, *, num_classes: int = 2, in_channels: int = 1,
              dropout: float | None = None) -> VGG:
    """A freshly initialised network of architecture ``arch`` (one of :data:`ARCHITECTURES`, or a
    :class:`VggConfig` of its own, as the width study in ``bench/bench_models.py`` builds)."""
    if isinstance(arch, VggConfig):
        config = arch
    elif arch in CONFIGS:
        config = CONFIGS[arch]
    else:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    features = make_layers(config.layer_cfg(), in_channels)
    return VGG(features, config.widths[-1], config.pool, config.hidden, num_classes,
               config.dropout if dropout is None else dropout, config.head_init)


# -- batch norm while training, folded away when saved ------------------------------------------------

class ConvBN(nn.Module):
    """A convolution followed by batch norm: what each ``features.N`` convolution is while training.

    Without ImageNet weights to start from, the 13 plain convolutions do not learn from a few hundred
    patches (the loss stays near ln 2, even with a bright disc painted on every lesion patch:
    ``bench/check_batch_norm.py``); with batch norm they do. :func:`fold_batch_norm` turns each back into one ``nn.Conv2d`` with the same output
    as the pair in eval mode, so saved models keep VGG16's plain layers and names.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def with_batch_norm(model: VGG) -> VGG:
    """``model`` with every convolution of ``features`` wrapped in :class:`ConvBN` (in place; returned)."""
    for i, layer in enumerate(model.features):
        if isinstance(layer, nn.Conv2d):
            model.features[i] = ConvBN(layer)
    return model


@torch.no_grad()
def fold_batch_norm(model: VGG) -> VGG:
    """``model`` with every :class:`ConvBN` replaced by one convolution (in place; returned).

    eval-mode batch norm is ``gamma * (z - mean) / sqrt(var + eps) + beta``, an affine map per channel,
    so it folds into the convolution: ``w' = w * s``, ``b' = (b - mean) * s + beta`` with
    ``s = gamma / sqrt(var + eps)``.
    """
    for i, layer in enumerate(model.features):
        if isinstance(layer, ConvBN):
            conv, bn = layer.conv, layer.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
            folded = folded.to(device=conv.weight.device, dtype=conv.weight.dtype)
            folded.weight.copy_(conv.weight * scale[:, None, None, None])
            folded.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
            model.features[i] = folded
    return model


__all__ = ["DISSECTED_LAYER", "CLASS_NAMES", "CONFIGS", "ARCHITECTURES", "VggConfig", "VGG", "build_vgg",
           "make_layers", "ConvBN", "with_batch_norm", "fold_batch_norm"]
