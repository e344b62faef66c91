"""One module per ``mammo`` subcommand (see :mod:`workspace.app.cli`), and the options several of them share.

Nothing heavy is imported here: ``mammo --help`` imports every command module.
"""

from __future__ import annotations

import argparse
from typing import Any

FOREIGN_LAYER_HELP = "layer to dissect (foreign checkpoints)"


def add_model_options(p: argparse.ArgumentParser, *, layer_help: str = FOREIGN_LAYER_HELP) -> None:
    """``--model --device --arch --layer --trust``: which checkpoint to load, and how (see :func:`load_model`)."""
    p.add_argument("--model", help="checkpoint file, or a model name in the workspace (default: shipped demo)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--arch", help="for a plain state_dict: vgg16_slim, vgg16_1ch or torchvision:NAME")
    p.add_argument("--layer", help=layer_help)
    p.add_argument("--trust", action="store_true", help="allow a pickled whole model (runs code from the file)")


def load_model(ws: Any, args: argparse.Namespace) -> Any:
    """The checkpoint the options of :func:`add_model_options` name, loaded for inference."""
    from models.checkpoint import load_checkpoint, resolve_model_path

    return load_checkpoint(resolve_model_path(ws, args.model), args.device, arch=args.arch, layer=args.layer,
                           trust=args.trust)


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options among ``names`` the user gave (not None), as keywords: the library keeps the defaults,
    so ``mammo --help`` need not import the modules that define them."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
