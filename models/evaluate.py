"""Honest test metrics for a patch classifier.

- ROC AUC on the test split with a bootstrap confidence interval. Resampling is by patient
  (cluster bootstrap): patches of one patient are correlated, so resampling patches alone would
  give intervals that are too narrow.
- An operating point chosen on the VALIDATION split (Youden's J by default, or a target
  sensitivity such as ``sensitivity:0.9``), then sensitivity and specificity at that threshold on test.
- A ROC curve picture (validation and test, operating point marked).

Scores are P(possibly malignant) = softmax(logits)[:, 1].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from models.data import PatchData
from workspace.base.errors import ModelError
from workspace.base.progress import progress

DEFAULT_BOOTSTRAP = 1000
DEFAULT_RULE = "youden"


def score_patches(loaded: Any, data: PatchData, positions: np.ndarray, *, batch_size: int = 16,
                  desc: str = "scoring") -> np.ndarray:
    """P(possibly malignant) for the patches at ``positions`` of ``data`` (float64 array)."""
    positions = np.asarray(positions, dtype=np.int64)
    scores = np.empty(len(positions), dtype=np.float64)
    bar = progress(total=len(positions), desc=desc, unit="patch", leave=False)
    for start in range(0, len(positions), batch_size):
        chunk = positions[start:start + batch_size]
        scores[start:start + len(chunk)] = loaded.predict_proba(data.batch(chunk)).double().numpy()
        bar.update(len(chunk))
    bar.close()
    return scores


def _weighted_auc(value_index: np.ndarray, n_values: int, positive: np.ndarray, weights: np.ndarray) -> float:
    """Mann-Whitney AUC with per-sample weights; ``value_index`` ranks the distinct scores (ascending)."""
    pos = np.bincount(value_index, weights=weights * positive, minlength=n_values)
    neg = np.bincount(value_index, weights=weights * (1.0 - positive), minlength=n_values)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    below = np.cumsum(neg) - neg  # negatives scored strictly lower; ties count one half
    return float(np.sum(pos * (below + 0.5 * neg)) / (total_pos * total_neg))


def roc_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve (ties count one half, optional sample weights); NaN when a class is absent."""
    labels = np.asarray(labels).astype(np.float64)
    values, index = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    weights = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    return _weighted_auc(index, len(values), labels, weights)


def bootstrap_auc_ci(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None, *,
                     n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap interval of the AUC; resamples whole ``groups`` (patients) when given."""
    labels = np.asarray(labels).astype(np.float64)
    values, index = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    unique, inverse = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_resamples):
        # how often each patient is drawn becomes the weight of each of its patches
        counts = np.bincount(rng.integers(0, len(unique), len(unique)), minlength=len(unique))
        auc = _weighted_auc(index, len(values), labels, counts[inverse].astype(np.float64))
        if not np.isnan(auc):
            aucs.append(auc)
    if not aucs:
        return {"low": float("nan"), "high": float("nan"), "resamples": 0, "level": level}
    tail = (1 - level) / 2 * 100
    return {"low": float(np.percentile(aucs, tail)), "high": float(np.percentile(aucs, 100 - tail)),
            "resamples": len(aucs), "level": level,
            "clustered_by": "patient" if len(unique) < len(labels) else "patch"}


def sensitivity_specificity(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    labels = np.asarray(labels).astype(bool)
    called = np.asarray(scores) >= threshold
    sens = float(called[labels].mean()) if labels.any() else float("nan")
    spec = float((~called[~labels]).mean()) if (~labels).any() else float("nan")
    return sens, spec


def choose_operating_point(labels: np.ndarray, scores: np.ndarray, rule: str = DEFAULT_RULE) -> dict:
    """A threshold on P(possibly malignant) from validation scores.

    ``youden``: maximise sensitivity + specificity - 1. ``sensitivity:S``: the highest threshold whose
    sensitivity is at least S. ``fixed:T``: T itself.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if rule.startswith("fixed:"):
        threshold = float(rule.split(":", 1)[1])
    else:
        if not labels.any() or labels.all():
            raise ModelError("choosing an operating point needs both classes in the validation split")
        # thresholds half way between neighbouring distinct scores (strict to lenient), so a threshold
        # never sits exactly on a validation score
        distinct = np.unique(scores)[::-1]
        candidates = np.concatenate([[distinct[0] + 1e-6], (distinct[:-1] + distinct[1:]) / 2,
                                     [distinct[-1] - 1e-6]])
        sens = np.array([(scores[labels] >= t).mean() for t in candidates])
        spec = np.array([(scores[~labels] < t).mean() for t in candidates])
        if rule == "youden":
            j = sens + spec - 1
            tied = np.flatnonzero(j >= j.max() - 1e-12)
            threshold = float(candidates[tied[len(tied) // 2]])  # the middle of an optimal plateau
        elif rule.startswith("sensitivity:"):
            target = float(rule.split(":", 1)[1])
            threshold = float(candidates[int(np.argmax(sens >= target))])
        else:
            raise ModelError(f"unknown operating-point rule {rule!r}: use youden, sensitivity:S or fixed:T")
    sens_v, spec_v = sensitivity_specificity(labels, scores, threshold)
    return {"threshold": threshold, "rule": rule, "chosen_on": "val", "val_sensitivity": sens_v,
            "val_specificity": spec_v}


def evaluate_scores(labels: dict[str, np.ndarray], scores: dict[str, np.ndarray], groups: dict[str, np.ndarray],
                    *, operating_point: dict | None = None, rule: str = DEFAULT_RULE,
                    n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """Metrics from per-split labels/scores/groups (keys ``val`` and ``test``).

    Without ``operating_point`` one is chosen on ``val`` with ``rule``."""
    if "test" not in labels or len(labels["test"]) == 0:
        raise ModelError("there are no test patches to evaluate on")
    if operating_point is None:
        operating_point = choose_operating_point(labels["val"], scores["val"], rule)
    metrics: dict[str, Any] = {"operating_point": operating_point}
    for split in labels:
        y, s = labels[split], scores[split]
        sens, spec = sensitivity_specificity(y, s, operating_point["threshold"])
        entry = {"auc": roc_auc(y, s), "n_patches": int(len(y)), "n_positive": int(np.sum(y)),
                 "n_patients": int(len(np.unique(groups[split]))), "sensitivity": sens, "specificity": spec}
        if split == "test":
            entry["auc_ci"] = bootstrap_auc_ci(y, s, groups[split], n_resamples=n_resamples, seed=seed)
        metrics[split] = entry
    return metrics


def evaluate_model(loaded: Any, data: PatchData, *, operating_point: dict | None = None,
                   rule: str = DEFAULT_RULE, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                   batch_size: int = 16, splits: tuple[str, ...] = ("val", "test")) -> tuple[dict, dict]:
    """Score ``splits`` of ``data`` and compute metrics; returns (metrics, {split: scores})."""
    labels, scores, groups = {}, {}, {}
    for split in splits:
        positions = data.indices(split)
        if len(positions) == 0:
            continue
        labels[split] = data.labels[positions]
        groups[split] = data.groups[positions]
        scores[split] = score_patches(loaded, data, positions, batch_size=batch_size, desc=f"scoring {split}")
    if operating_point is None and "val" not in labels:
        raise ModelError("there are no validation patches to choose an operating point on")
    return evaluate_scores(labels, scores, groups, operating_point=operating_point, rule=rule,
                           n_resamples=n_resamples, seed=seed), {"labels": labels, "scores": scores}


def plot_roc(path: str | Path, labels: dict[str, np.ndarray], scores: dict[str, np.ndarray], metrics: dict,
             title: str = "ROC") -> Path:
    """Write a ROC picture: one curve per split, test CI in the legend, the operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5.2, 5.2), dpi=110)
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--", label="chance")
    colours = {"val": "#8c8cd9", "test": "#d62728", "train": "#7f7f7f"}
    threshold = metrics["operating_point"]["threshold"]
    for split in labels:
        y, s = labels[split], scores[split]
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        entry = metrics[split]
        text = f"{split}: AUC {entry['auc']:.3f}"
        if "auc_ci" in entry:
            ci = entry["auc_ci"]
            text += f" (95% CI {ci['low']:.3f}-{ci['high']:.3f})"
        text += f", n={entry['n_patches']}"
        ax.plot(fpr, tpr, color=colours.get(split, None), lw=2 if split == "test" else 1.3, label=text)
        ax.plot(1 - entry["specificity"], entry["sensitivity"], "o", color=colours.get(split, "k"), ms=7,
                mec="black")
    op = metrics["operating_point"]
    ax.annotate(f"operating point p>={threshold:.3f}\n({op['rule']} on val)", xy=(0.42, 0.08),
                fontsize=8, color="#333333")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=7.5, bbox_to_anchor=(1.0, 0.16))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_lines(metrics: dict) -> list[str]:
    """Human-readable lines for the CLI."""
    lines = []
    op = metrics["operating_point"]
    for split in ("val", "test"):
        if split not in metrics:
            continue
        m = metrics[split]
        line = (f"{split:5s} AUC {m['auc']:.3f}")
        if "auc_ci" in m:
            line += f" (95% CI {m['auc_ci']['low']:.3f}-{m['auc_ci']['high']:.3f}, {m['auc_ci']['resamples']} " \
                    f"{m['auc_ci'].get('clustered_by', 'patch')}-level resamples)"
        line += (f"  sensitivity {m['sensitivity']:.3f}  specificity {m['specificity']:.3f}  "
                 f"[{m['n_patches']} patches, {m['n_positive']} lesion, {m['n_patients']} patients]")
        lines.append(line)
    lines.append(f"operating point: P(possibly malignant) >= {op['threshold']:.4f} ({op['rule']}, chosen on "
                 f"{op.get('chosen_on', 'val')})")
    return lines


def write_report(path: str | Path, metrics: dict, extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**(extra or {}), "metrics": metrics}, indent=2))
    return path


def reproduce_recorded_test(loaded: Any, *, n_resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                            folder: str | Path | None = None, tolerance: float = 1e-3) -> dict:
    """Redraw the checkpoint's recorded synthetic test patches and evaluate at its stored operating point.

    Returns the metrics, the recorded and reproduced test AUC, how the redrawn pixels compare with the
    recorded ones (``pixels``: :func:`models.data.compare_to_recorded`; ``pixels_match`` is its
    ``accepted``) and whether the AUC is reproduced within ``tolerance`` (``reproduced``)."""
    from models.data import compare_to_recorded, rebuild_recorded_split

    recorded = (loaded.meta.get("data") or {}).get("recorded_test")
    if not recorded:
        raise ModelError(f"{loaded.path.name} records no synthetic test split to reproduce")
    data = rebuild_recorded_split(recorded, folder=folder)
    positions = np.arange(len(data))
    scores = score_patches(loaded, data, positions, desc="scoring test")
    labels, groups = data.labels, data.groups
    metrics = evaluate_scores({"test": labels}, {"test": scores}, {"test": groups},
                              operating_point=loaded.meta.get("operating_point") or
                              {"threshold": 0.5, "rule": "fixed:0.5", "chosen_on": "default"},
                              n_resamples=n_resamples, seed=seed)
    recorded_auc = float(loaded.meta["metrics"]["test"]["auc"])
    auc = metrics["test"]["auc"]
    pixels = compare_to_recorded(data, positions, recorded)
    return {"metrics": metrics, "auc": auc, "recorded_auc": recorded_auc, "pixels": pixels,
            "pixels_match": pixels["accepted"],
            "reproduced": abs(auc - recorded_auc) <= tolerance, "scores": scores, "labels": labels}


__all__ = ["reproduce_recorded_test", "score_patches", "roc_auc", "bootstrap_auc_ci", "sensitivity_specificity", "choose_operating_point",
           "evaluate_scores", "evaluate_model", "plot_roc", "summary_lines", "write_report"]
