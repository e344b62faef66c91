"""``mammo read IMAGE_ID ... | --all``: read whole mammograms with a model (patch scores, suspicious patches).

Each read is cached per image and model in ``WORKSPACE/cache/reads`` and recorded in the catalog, so
reading again costs nothing. A bad image is reported and the others go on. ``--ray`` reads on a Ray
cluster (``workspace.dissect.cluster``).
"""

from __future__ import annotations

import argparse

from workspace.app.commands import add_model_options, add_ray_options, load_model, ray_options

ORDER = 42


def _run(args: argparse.Namespace) -> int:
    from models.inference import read_many
    from workspace.base.catalog import open_catalog
    from workspace.base.config import Workspace
    from workspace.base.errors import MammoError

    ws = Workspace.open(args.workspace)
    if not args.image_ids and not args.all:
        raise MammoError("name one or more image ids, or --all")
    loaded = load_model(ws, args)
    ids = list(args.image_ids)
    if args.all:
        sql = "SELECT image_id FROM images" + (" WHERE dataset = ?" if args.dataset else "") + " ORDER BY image_id"
        ids += [r["image_id"] for r in open_catalog(ws).query(sql, [args.dataset] if args.dataset else [])]
    if args.ray is not None:
        from workspace.dissect.cluster import read_many_on_ray

        summary = read_many_on_ray(ws, ids, loaded, **ray_options(args), stride=args.stride,
                                   keep_maps=not args.no_maps)
    else:
        summary = read_many(ws, ids, loaded, stride=args.stride, keep_maps=not args.no_maps)
    print(f"model {loaded.architecture} {loaded.digest}, operating point {loaded.operating_point:.4f}")
    print(loaded.card.summary())
    outside = 0
    for read in summary.reads:
        top = ", ".join(f"({read.boxes[i][0]},{read.boxes[i][1]}) {read.scores[i]:.2f}"
                        for i in read.suspicious[:3])
        print(f"{read.image_id}  score {read.image_score:.3f}  {len(read.scores)} patches  "
              f"{len(read.suspicious)} suspicious  {'cached' if read.cached else f'{read.seconds:.1f} s'}"
              + (f"  top: {top}" if top else ""))
        if read.domain and read.domain.outside:
            outside += 1
            print(f"  WARNING: {read.domain.warning()}")
    if outside:
        print(f"{outside} of {len(summary.reads)} image(s) lie outside the model's training domain")
    for image_id, message in summary.errors:
        print(f"{image_id}: error: {message}")
    print(f"{len(summary.reads)} read, {len(summary.errors)} failed")
    return 1 if summary.errors else 0


def add_parser(subparsers, parents) -> None:
    p = subparsers.add_parser("read", parents=parents, help="read whole mammograms with the model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image_ids", nargs="*", metavar="IMAGE_ID")
    p.add_argument("--all", action="store_true", help="every image in the catalog")
    p.add_argument("--dataset", help="with --all: only this dataset")
    add_model_options(p)
    p.add_argument("--stride", type=int, help="patch stride in pixels (default: the patch size, no overlap)")
    p.add_argument("--no-maps", action="store_true", help="do not keep the dissected layer's maps")
    add_ray_options(p, shards=False)
    p.set_defaults(func=_run)
