"""``mammo dissect``: dissect one layer of a model over a patch set split (one streaming pass).

Writes an immutable run folder ``WORKSPACE/runs/<run_id>/`` (max-activation matrix, top-k patches per
unit, per-unit thresholds, PCA embedding, manifest) and records it in the catalog. The same request
again finds the finished run; a run that was interrupted resumes from its last checkpoint.

With ``--ray`` the patches are dissected in shards on a Ray cluster (``--ray`` alone starts a local one,
``--ray auto`` or ``--ray HOST:PORT`` joins one) and merged into the same run, bit for bit
(``workspace.dissect.cluster``); the workspace must be on storage every node mounts.
"""

from __future__ import annotations

import argparse

from workspace.app.commands import add_model_options, add_ray_options, given, load_model, ray_options

ORDER = 45


def _run(args: argparse.Namespace) -> int:
    from workspace.base.config import Workspace

    ws = Workspace.open(args.workspace)
    split = None if args.split == "all" else args.split
    options = given(args, "quantile", "top_k", "memory_budget_mb", "batch_size")
    if args.ray is not None:
        from workspace.dissect.cluster import dissect_on_ray

        # the model is loaded once the workers are starting, so their start-up overlaps this process's
        run = dissect_on_ray(ws, lambda: load_model(ws, args), patch_set=args.patch_set, split=split,
                             layer=args.layer, **ray_options(args), shards=args.shards, **options)
    else:
        from workspace.dissect.dissect_run import run_dissection

        run = run_dissection(ws, load_model(ws, args), patch_set=args.patch_set, split=split, layer=args.layer,
                             **options)
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
    execution = m.get("execution") or {}
    if execution.get("mode") == "ray":
        print(f"on Ray ({execution['address']}): {execution['workers']} workers, {execution['shards']} shards"
              + (f", {execution['shards_resumed']} resumed" if execution.get("shards_resumed") else ""))
    return 0


def add_parser(subparsers, parents) -> None:
    # --quantile ... --batch-size default to the library's values (workspace.dissect.dissection, dissect_run),
    # which import torch: the help states them, and tests/test_cli.py checks it against the library.
    p = subparsers.add_parser("dissect", parents=parents, help="dissect a layer over a patch set",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p, layer_help="layer to dissect (default: the model's dissected layer)")
    p.add_argument("--patch-set", default="default", help="patch set name (default: default)")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                   help="patches of this split (default: test, as in the paper)")
    p.add_argument("--quantile", type=float, help="threshold quantile per unit (default 0.99)")
    p.add_argument("--top-k", type=int, help="top patches per unit (default 16)")
    p.add_argument("--memory-budget-mb", type=float,
                   help="exact thresholds while their buffer fits this budget, else a sketch with a stated "
                        "rank error (default 1024)")
    p.add_argument("--batch-size", type=int, help="patches per forward pass (default 8)")
    add_ray_options(p)
    p.set_defaults(func=_run)
