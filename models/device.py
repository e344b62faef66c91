"""Where compute runs: the GPU when there is one, else the CPU (``MAMMO_DEVICE`` overrides)."""

from __future__ import annotations

import os

import torch

DEVICE_ENV = "MAMMO_DEVICE"


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """``prefer`` if given, else ``$MAMMO_DEVICE``, else ``cuda`` when available, else ``cpu``."""
    choice = prefer or os.environ.get(DEVICE_ENV)
    if choice:
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


__all__ = ["DEVICE_ENV", "pick_device"]
