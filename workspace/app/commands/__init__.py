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
    p.add_argument("--class-names", metavar="A,B", help="the model's classes in output order (default: the "
                   "checkpoint's; a state_dict has none)")
    p.add_argument("--positive-class", metavar="NAME", help="the class whose probability is the score (default: "
                   "the checkpoint's, else class 1)")


def load_model(ws: Any, args: argparse.Namespace) -> Any:
    """The checkpoint the options of :func:`add_model_options` name, loaded for inference."""
    from models.checkpoint import class_options, load_checkpoint, resolve_model_path

    return load_checkpoint(resolve_model_path(ws, args.model), args.device, arch=args.arch, layer=args.layer,
                           trust=args.trust, meta=class_options(args.class_names, args.positive_class) or None)


def add_ray_options(p: argparse.ArgumentParser, *, shards: bool = True) -> None:
    """``--ray [ADDRESS]``, ``--workers``, ``--worker-workspace`` (and ``--shards``): the work on a Ray cluster."""
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on a Ray cluster: alone, a local one started here; 'auto' or HOST:PORT joins one "
                        "(needs pip install 'mammo-dissect[ray]')")
    p.add_argument("--workers", type=int, help="with --ray: Ray actors (default one per GPU, else one per CPU)")
    if shards:
        p.add_argument("--shards", type=int, help="with --ray: shards of the work (default from the memory budget, "
                                                  "at least one per worker)")
    p.add_argument("--worker-workspace", metavar="PATH",
                   help="with --ray: the workspace's path as the workers see it (default: the same path)")


def ray_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords of :mod:`workspace.dissect.cluster`'s entry points from :func:`add_ray_options`."""
    return {"address": args.ray or None, "workers": args.workers, "worker_root": args.worker_workspace}


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options among ``names`` the user gave (not None), as keywords: the library keeps the defaults,
    so ``mammo --help`` need not import the modules that define them."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
