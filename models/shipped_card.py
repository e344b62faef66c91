"""Write the card of a model trained on the synthetic generator (``models/weights/slim_demo.card.json``).

The shipped demo checkpoint predates the card; its weights and identity (file digest) stay as they are
and the card beside it adds what a reader and a test need:

- ``trained``: the date the weights were made (given, from the repository's history);
- ``data.datasets``: ``["synthetic"]``;
- ``data.recorded_test.pixel_fingerprint``: block sums of the recorded test patches
  (:func:`models.data.pixel_fingerprint`), made only on a machine that redraws them bit for bit (their
  recorded digest matches), so other CPUs can check them within a stated tolerance;
- ``training_domain``: the profile (:func:`models.card.domain_profile`) of images drawn by the same
  generator for training patients (outside the recorded test split), read as ingest reads them.

    .venv/bin/python -m models.shipped_card --trained 2026-11-26 [--patients 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def training_domain(recorded: dict, n_patients: int, n_total: int) -> dict:
    """The domain profile of ``n_patients`` generator patients outside the recorded test split."""
    from workspace.base.progress import progress
    from workspace.data import dicom_io, synth
    from workspace.data.domain import domain_profile, image_features, mean_spacing

    seed, shape = int(recorded["seed"]), tuple(recorded.get("image_shape") or synth.FULL_SHAPE)
    test_patients = {int(p[0]) for p in recorded["patches"]}
    candidates = [k for k in range(n_total) if k not in test_patients]
    chosen = candidates[:: max(1, len(candidates) // n_patients)][:n_patients]
    features = []
    with tempfile.TemporaryDirectory() as tmp:
        for patient in progress(chosen, desc="training-domain images", unit="patient"):
            plan = synth.plan_patient(seed, patient)
            for key in synth.IMAGE_KEYS:
                image = synth.make_image(plan, key, shape)
                path = Path(tmp) / f"{patient}-{key}.dcm"
                synth.write_dicom(path, plan, image)
                dicom = dicom_io.read_dicom(path)  # as ingest reads it
                features.append(image_features(
                    dicom.model_pixels(), dicom_io.foreground_mask(dicom.display_pixels()),
                    bits_stored=dicom.bits_stored, pixel_spacing=mean_spacing(*(dicom.pixel_spacing or (None, None)))))
                path.unlink()
    return domain_profile(features, ["synthetic"])


def main(argv: list[str] | None = None) -> int:
    from models.checkpoint import SHIPPED_DEMO, file_digest, load_checkpoint
    from models.data import encode_fingerprint, pixel_digest, pixel_fingerprint, rebuild_recorded_split

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=SHIPPED_DEMO)
    parser.add_argument("--trained", required=True, help="date the weights were made (YYYY-MM-DD)")
    parser.add_argument("--patients", type=int, default=40, help="training patients for the domain profile")
    args = parser.parse_args(argv)

    loaded = load_checkpoint(args.model, "cpu")
    recorded = loaded.meta["data"]["recorded_test"]
    data = rebuild_recorded_split(recorded)
    positions = np.arange(len(data))
    if pixel_digest(data, positions) != recorded["pixel_digest"]:
        raise SystemExit("this machine does not redraw the recorded test pixels bit for bit; make the card where "
                         "the model was trained")
    n_total = int(loaded.meta["data"]["synthetic"]["patients"][1])
    card = {"model_digest": file_digest(args.model), "trained": args.trained,
            "data": {"datasets": ["synthetic"],
                     "recorded_test": {"pixel_fingerprint": encode_fingerprint(pixel_fingerprint(data, positions))}},
            "training_domain": training_domain(recorded, args.patients, n_total)}
    out = args.model.with_name(args.model.stem + ".card.json")
    out.write_text(json.dumps(card, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes): domain profile of {card['training_domain']['images']} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
