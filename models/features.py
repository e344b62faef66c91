"""Tapping a layer: the ONE way any part of the code reads a network's intermediate output.

>>> with capture(model, "features.29") as tap:
...     logits = model(x)
... maps = tap.output            # (B, units, h, w), detached

The hook stays on the module only inside the ``with`` block. Because VGG's ReLUs work in place,
a captured convolution output would be overwritten by the next layer: the hook clones the tensor.

:func:`replacing` is the same tap the other way round: the layer's output is replaced (``models.ablation``
silences units with it where the rest of the network cannot run alone).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from workspace.base.errors import ModelError


class Capture:
    """The output of one layer at the latest forward pass (``output``), detached and cloned."""

    def __init__(self, layer: str):
        self.layer = layer
        self.output: torch.Tensor | None = None

    def _hook(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor):
            raise ModelError(f"layer {self.layer!r} does not output a single tensor")
        self.output = output.detach().clone()


def layer_names(model: nn.Module) -> list[str]:
    """Every named submodule (``features.0``, ``features.1``, ..., ``classifier.6``)."""
    return [name for name, _ in model.named_modules() if name]


def get_layer(model: nn.Module, layer: str) -> nn.Module:
    """The submodule called ``layer``, or a :class:`ModelError` suggesting close names."""
    modules = dict(model.named_modules())
    if layer and layer in modules:
        return modules[layer]
    close = difflib.get_close_matches(layer, [n for n in modules if n], n=5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ModelError(f"the model has no layer {layer!r}{hint}")


@contextmanager
def capture(model: nn.Module, layer: str) -> Iterator[Capture]:
    """Hold ``layer``'s output of each forward pass while the block runs."""
    module = get_layer(model, layer)
    tap = Capture(layer)
    handle = module.register_forward_hook(tap._hook)
    try:
        yield tap
    finally:
        handle.remove()


class Replacement:
    """How many times the layer ran (``calls``) while its output was being replaced."""

    def __init__(self, layer: str, make: Callable[[torch.Tensor], torch.Tensor]):
        self.layer = layer
        self.make = make
        self.calls = 0

    def _hook(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise ModelError(f"layer {self.layer!r} does not output a single tensor")
        self.calls += 1
        return self.make(output)


@contextmanager
def replacing(model: nn.Module, layer: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[Replacement]:
    """While the block runs, ``layer``'s output of each forward pass is ``make(output)`` instead."""
    module = get_layer(model, layer)
    hook = Replacement(layer, make)
    handle = module.register_forward_hook(hook._hook)
    try:
        yield hook
    finally:
        handle.remove()


__all__ = ["Capture", "capture", "Replacement", "replacing", "layer_names", "get_layer"]
