"""What a model was trained on: the model card.

Every surface that shows a score (Label Studio, FiftyOne, ``mammo read``, ``mammo report``, the HTML
report) shows :meth:`ModelCard.summary` beside it, and warns per image when the domain check
(:mod:`workspace.data.domain`) finds the image unlike the training images.

**The card** comes from the checkpoint's metadata. A checkpoint may have a card file beside it
(``NAME.card.json`` next to ``NAME.pt``) that fills in what its metadata lacks (a site's own
state_dict has no metadata at all; the shipped demo model's card adds its date, its training-domain
profile and the fingerprint of its recorded test pixels): ``{"model_digest": ..., <meta keys>}``;
``model_digest`` names the file it describes, and a card for another file is ignored with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from models.vgg import CLASS_NAMES

log = logging.getLogger(__name__)

CARD_SUFFIX = ".card.json"


# -- the card file beside a checkpoint -----------------------------------------------------------

def card_path(checkpoint: str | os.PathLike) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + CARD_SUFFIX)


def _fill(meta: dict, extra: dict) -> dict:
    """``meta`` with the keys of ``extra`` it lacks, nested dicts filled the same way (meta wins)."""
    out = dict(meta)
    for key, value in extra.items():
        if key not in out or out[key] is None:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _fill(out[key], value)
    return out


def with_card(meta: dict, checkpoint: str | os.PathLike, digest: str) -> dict:
    """``meta`` filled from the checkpoint's card file, when there is one for this very file."""
    path = card_path(checkpoint)
    if not path.is_file():
        return meta
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        log.warning("ignoring the model card %s: %s", path, error)
        return meta
    described = card.pop("model_digest", None)
    if described != digest:
        log.warning("ignoring the model card %s: it describes model %s, this file is %s", path, described, digest)
        return meta
    return _fill(meta, card)


# -- the card ------------------------------------------------------------------------------------

def short_class_name(name: str) -> str:
    """A class name without a trailing parenthesis: "possibly malignant (BI-RADS 0)" -> "possibly malignant"."""
    return name.split(" (")[0].strip() or name


def positive_class_name(meta: dict) -> str:
    """The scored class in a few words: ``class_names[positive_class]`` (default class 1 of ours,
    "possibly malignant (BI-RADS 0)"), shortened."""
    names = meta.get("class_names") or list(CLASS_NAMES)
    return short_class_name(names[int(meta.get("positive_class", 1))])


def negative_class_name(meta: dict) -> str:
    """What a reader answers when the score is below the operating point: the other class of a two-class
    model ("BI-RADS 1/2" for ours), "not <positive>" when there are more classes."""
    names = meta.get("class_names") or list(CLASS_NAMES)
    positive = int(meta.get("positive_class", 1))
    if len(names) == 2:
        return short_class_name(names[1 - positive])
    return f"not {short_class_name(names[positive])}"


DEFAULT_POSITIVE = positive_class_name({})  # "possibly malignant": what a surface says with no model at hand
DEFAULT_NEGATIVE = negative_class_name({})  # "BI-RADS 1/2"


@dataclass
class ModelCard:
    """What a reader must know about the model behind a score."""

    name: str
    architecture: str
    datasets: list[str]            # data sets of the training images ([] when unknown)
    synthetic: dict | None         # {"generator_version", "seed", "patients"} when trained on the generator
    test_auc: float | None
    auc_ci: tuple[float, float] | None
    test_patches: int | None
    trained: str | None            # date (YYYY-MM-DD) or None
    has_domain_profile: bool
    score_label: str = f"P({DEFAULT_POSITIVE})"  # how the score is named: P(<positive class>)

    @classmethod
    def from_meta(cls, meta: dict, fallback_name: str = "model") -> ModelCard:
        data = meta.get("data") or {}
        synthetic = None
        if data.get("synthetic"):
            recorded = data.get("recorded_test") or {}
            patients = data["synthetic"].get("patients")
            synthetic = {"generator_version": recorded.get("generator_version"),
                         "seed": (data["synthetic"].get("seeds") or [None])[0],
                         "patients": (patients[1] - patients[0]) if patients else None}
        datasets = list(data.get("datasets") or (["synthetic"] if synthetic else []))
        test = (meta.get("metrics") or {}).get("test") or {}
        ci = test.get("auc_ci")
        trained = meta.get("trained")
        label = f"P({positive_class_name(meta)})"
        return cls(name=str(meta.get("name") or fallback_name), architecture=str(meta.get("architecture", "?")),
                   datasets=datasets, synthetic=synthetic, test_auc=test.get("auc"),
                   auc_ci=(float(ci["low"]), float(ci["high"])) if ci else None,
                   test_patches=test.get("n_patches"), trained=str(trained)[:10] if trained else None,
                   has_domain_profile=bool(meta.get("training_domain")), score_label=label)

    @property
    def synthetic_only(self) -> bool:
        return self.datasets == ["synthetic"]

    def trained_on(self) -> str:
        if self.synthetic_only:
            s = self.synthetic or {}
            return (f"synthetic mammograms only (mammo-dissect generator v{s.get('generator_version', '?')}, "
                    f"{s.get('patients', '?')} patients), no real images")
        if self.datasets:
            return ", ".join(self.datasets)
        return "data it does not record"

    def performance(self) -> str:
        if self.test_auc is None:
            return "no test AUC recorded"
        ci = f" (95 % CI {self.auc_ci[0]:.3f}-{self.auc_ci[1]:.3f})" if self.auc_ci else ""
        n = f" on {self.test_patches} test patches" if self.test_patches else ""
        where = " of the same generator" if self.synthetic_only else ""
        return f"test AUC {self.test_auc:.3f}{ci}{n}{where}"

    def summary(self) -> str:
        """One line for every surface that shows a score."""
        date = f"; trained {self.trained}" if self.trained else ""
        return f"Model {self.name} ({self.architecture}): trained on {self.trained_on()}; {self.performance()}{date}"

    def to_dict(self) -> dict:
        return {"name": self.name, "architecture": self.architecture, "datasets": self.datasets,
                "synthetic": self.synthetic, "test_auc": self.test_auc,
                "auc_ci": list(self.auc_ci) if self.auc_ci else None, "test_patches": self.test_patches,
                "trained": self.trained, "score_label": self.score_label, "summary": self.summary()}


__all__ = ["CARD_SUFFIX", "DEFAULT_POSITIVE", "DEFAULT_NEGATIVE", "ModelCard", "card_path", "with_card",
           "short_class_name", "positive_class_name", "negative_class_name"]
