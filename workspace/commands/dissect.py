"""``mammo dissect``: dissect one layer of a model over a patch set split (one streaming pass).

Writes an immutable run folder ``WORKSPACE/runs/<run_id>/`` (max-activation matrix, top-k patches per
unit, per-unit thresholds, PCA embedding, manifest) and records it in the catalog. The same request
again finds the finished run; a run that was interrupted resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse

ORDER = 45


def _run(args: argparse.Namespace) -> int:
    from models.checkpoint import load_checkpoint, resolve_model_path
    from workspace.config import Workspace
    from workspace.dissect_run import run_dissection

    ws = Workspace.open(args.workspace)
    loaded = load_checkpoint(resolve_model_path(ws, args.model), args.device, arch=args.arch,
                             layer=args.layer, trust=args.trust)
    run = run_dissection(ws, loaded, patch_set=args.patch_set, split=None if args.split == "all" else args.split,
                         layer=args.layer, quantile=args.quantile, top_k=args.top_k,
                         memory_budget_mb=args.memory_budget_mb, batch_size=args.batch_size)
    m = run.manifest
    th = m["thresholds"]
    method = th["method"]
    if method == "sketch":
        method += (f" (capacity {th['sketch_capacity']}, worst-case rank error {th['sketch_rank_error']} of "
                   f"{th['n_values_per_unit']} values = {th['sketch_rank_error_fraction']:.2e})")
    t = run.thresholds
    print(f"run {run.run_id}  ({run.path})")
    print(f"model {m['model_digest']} layer {m['layer']}: {m['n_units']} units at {m['map_shape'][0]}x"
          f"{m['map_shape'][1]}, {m['n_patches']} patches of {m['patch_set']}/{m['split']}")
    print(f"thresholds q={m['quantile']}: {method}; min {t.min():.4g}, median {float(sorted(t)[len(t) // 2]):.4g}, "
          f"max {t.max():.4g}")
    ev = m["pca"]["explained_variance_ratio"]
    print(f"PCA: explained variance ratio {ev[0]:.3f}, {ev[1]:.3f}; top-{m['top_k']} patches per unit")
    timing = m["timing"]
    print(f"time {timing['elapsed_s']:.1f} s (forward {timing['forward_s']:.1f} s, statistics "
          f"{timing['statistics_s']:.1f} s)")
    return 0


def add_parser(subparsers, parents) -> None:
    from workspace.dissect_run import DEFAULT_BATCH_SIZE, DEFAULT_MEMORY_BUDGET_MB
    from workspace.dissection import DEFAULT_QUANTILE, DEFAULT_TOP_K

    p = subparsers.add_parser("dissect", parents=parents, help="dissect a layer over a patch set",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint file, or a model name in the workspace (default: shipped demo)")
    p.add_argument("--patch-set", default="default", help="patch set name (default: default)")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                   help="patches of this split (default: test, as in the paper)")
    p.add_argument("--layer", help="layer to dissect (default: the model's dissected layer)")
    p.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE,
                   help=f"threshold quantile per unit (default {DEFAULT_QUANTILE})")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=f"top patches per unit (default {DEFAULT_TOP_K})")
    p.add_argument("--memory-budget-mb", type=float, default=DEFAULT_MEMORY_BUDGET_MB,
                   help="exact thresholds while their buffer fits this budget, else a sketch with a stated "
                        f"rank error (default {DEFAULT_MEMORY_BUDGET_MB})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--arch", help="for a plain state_dict: vgg16_slim, vgg16_1ch or torchvision:NAME")
    p.add_argument("--trust", action="store_true", help="allow a pickled whole model (runs code from the file)")
    p.set_defaults(func=_run)
