"""Explainability reports for one read (Lu & Perer, section 3.2.2), from the current concept labels.

For an image (or one patch of it) and the labels of the dissected layer:

- **activation value** per concept: the mean, over the concept's labelled units, of each unit's
  maximum activation on the image. Shown raw and normalised (each unit's activation divided by its
  threshold ``T[i]``, the dissection's 0.99 quantile, so ``1.0`` means "as active as the unit's top
  1 % of activations on the dissection patches" and concepts with differently scaled units compare
  fairly), with how many units back each bar. Units with ``T[i] <= 0`` (never active at that
  quantile) have no normalised value and are left out of the normalised mean only.
- **activation area** given an ROI: per concept, the mean IoU of its units' masks with the ROI.
- **label me**: units aligned with the ROI (IoU >= the threshold) that carry no label yet, best
  first; labelling them is how the store grows during reads.
- **silenced** (beyond the paper): per concept, the change in the score (P(possibly malignant)) when the
  concept's units are set to zero at the dissected layer and the forward pass finishes
  (:mod:`models.ablation`): of the image score for an image, of the patch's score for a patch. Negative:
  the model used the concept to call the image suspicious. Mean activation says a concept fired; this says
  whether the score depends on it.

:func:`build_report` takes plain arrays, so it does not care how they were computed;
:func:`report_for_image` wires the real pieces (the cached read, the dissection run, the ROI query).
A :class:`Report` renders as a dict, JSON, a self-contained HTML page (inline SVG bar charts, no
scripts, no external assets) and a few lines of text for a Label Studio text area.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workspace.base.errors import ConceptError, MammoError
from workspace.base.schema import utc_now
from workspace.dissect.concepts import Concept
from workspace.dissect.dissection import DEFAULT_IOU_THRESHOLD, relative_activation

if TYPE_CHECKING:  # annotations only: torch is imported when a real report is made

    from models.checkpoint import LoadedModel
    from workspace.base.config import Workspace
    from workspace.dissect.dissect_run import DissectionRun


class ReportError(MammoError):
    """A report that cannot be made (inputs of the wrong shape, no run, no model...)."""


# ----------------------------------------------------------------------------------------- records
@dataclass
class ConceptScore:
    """One concept's bars: activation value (raw, normalised) and activation area (mean IoU)."""

    concept_id: int
    name: str
    colour: str
    units: list[int]
    mean_activation: float              # raw: mean over units of their max activation on the image
    mean_normalised: float | None       # mean over units with T > 0 of max activation / T
    n_normalised: int                   # how many units back the normalised bar
    mean_iou: float | None              # mean IoU of the units' masks with the ROI (None: no ROI)
    n_aligned: int                      # units of this concept aligned with the ROI
    unit_activation: list[float]
    unit_normalised: list[float | None]
    unit_iou: list[float] | None
    unit_labelled_by: list[str | None] = field(default_factory=list)   # who gave each unit's label
    labelled_by: list[str] = field(default_factory=list)   # the same, distinct, most units first
    score_change: float | None = None   # score with the units silenced minus as read (None: not computed)

    @property
    def n_units(self) -> int:
        return len(self.units)

    def to_dict(self) -> dict:
        return dict(asdict(self), n_units=self.n_units)


@dataclass
class LabelMe:
    """An unlabelled unit aligned with the ROI: a candidate for a label."""

    unit: int
    iou: float | None                   # None when the aligned set was given without IoUs
    activation: float
    normalised: float | None
    proposal: str | None = None         # a pending concept proposal, with its evidence


@dataclass
class Report:
    image_id: str | None
    patch_box: list[int] | None
    model_digest: str | None
    layer: str | None
    run_id: str | None
    query_id: int | None
    created_at: str
    n_units: int
    n_labelled: int
    iou_threshold: float
    has_roi: bool
    roi: dict | None                    # {"bbox": [x, y, w, h], "area": pixels} in the image's normalised frame
    concepts: list[ConceptScore]        # by normalised activation, strongest first
    label_me: list[LabelMe]             # best IoU first
    aligned: list[int]
    notes: list[str] = field(default_factory=list)
    thumbnail: dict | None = None       # {"png_base64", "width", "height", "scale"} for the HTML page
    score: dict | None = None           # the read: {"image_score", "n_patches", "n_suspicious", "operating_point"}
    model_card: dict | None = None      # models.card.ModelCard.to_dict(): what the model was trained on
    domain: dict | None = None          # models.card.DomainVerdict.to_dict() of this image
    silenced: dict | None = None        # {"of": "image"|"patch", "score", "label"}: what score_change is a change of

    @property
    def domain_warning(self) -> str | None:
        return (self.domain or {}).get("warning")

    # -- outputs ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data (what the backend and the plugin use); the thumbnail is left out."""
        out = {k: v for k, v in asdict(self).items() if k != "thumbnail"}
        out["concepts"] = [c.to_dict() for c in self.concepts]
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as JSON (no NaN: values without a number are null)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def concept(self, name: str) -> ConceptScore:
        """The score of one concept by name (any case); ``KeyError`` when it has no labelled unit here."""
        for score in self.concepts:
            if score.name.casefold() == name.casefold():
                return score
        raise KeyError(name)

    def to_text(self, max_concepts: int = 5, max_candidates: int = 6) -> str:
        """A few lines that fit a Label Studio TextArea."""
        head = f"{self.n_labelled}/{self.n_units} units labelled"
        if self.image_id:
            head = f"{self.image_id}: {head}"
        if self.has_roi:
            head += f"; {len(self.aligned)} aligned with the ROI (IoU>={self.iou_threshold:g})"
        lines = [head]
        if self.score:
            lines.append(f"{self.score['label']} {self.score['image_score']:.2f}; {self.score['n_suspicious']} of "
                         f"{self.score['n_patches']} patches suspicious")
        if self.domain_warning:
            lines.append("WARNING: " + self.domain_warning)
        if self.model_card:
            lines.append(self.model_card["summary"])
        if not self.concepts:
            lines.append("No labelled units yet: label aligned units to build the report.")
        for score in self.concepts[:max_concepts]:
            value = _fmt(score.mean_normalised) + "xT" if score.mean_normalised is not None else "n/a"
            line = f"{score.name}: {value} (raw {_fmt(score.mean_activation)}, {_units(score.n_units)})"
            if score.mean_iou is not None:
                line += f", ROI IoU {score.mean_iou:.2f}"
            if score.score_change is not None:
                line += f", silenced: {_fmt_change(score.score_change)}"
            if score.labelled_by:
                line += f"; by {', '.join(score.labelled_by)}"
            lines.append(line)
        if len(self.concepts) > max_concepts:
            lines.append(f"+{len(self.concepts) - max_concepts} more concepts")
        if self.label_me:
            shown = ", ".join(f"{c.unit} ({_fmt(c.iou)}" + (f"; proposed: {c.proposal})" if c.proposal else ")")
                              for c in self.label_me[:max_candidates])
            more = f" +{len(self.label_me) - max_candidates}" if len(self.label_me) > max_candidates else ""
            lines.append(f"Label me: unit {shown}{more}")
        return "\n".join(lines)

    def to_html(self) -> str:
        """A self-contained page: two SVG bar charts, the ROI on a thumbnail, the "label me" list."""
        return _render_html(self)

    def save(self, path: str | Path, fmt: str | None = None) -> Path:
        """Write the report as html, json or text (from ``fmt`` or the file's suffix)."""
        path = Path(path)
        fmt = fmt or {".json": "json", ".txt": "text"}.get(path.suffix.lower(), "html")
        text = {"html": self.to_html, "json": self.to_json, "text": self.to_text}[fmt]()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        return path


# --------------------------------------------------------------------------------------- building
def build_report(max_activations: Sequence[float] | np.ndarray, thresholds: Sequence[float] | np.ndarray,
                 labels: Mapping[int, Concept], *, iou: Sequence[float] | np.ndarray | None = None,
                 aligned: Iterable[int] | None = None, iou_threshold: float = DEFAULT_IOU_THRESHOLD,
                 image_id: str | None = None, patch_box: Sequence[int] | None = None,
                 model_digest: str | None = None, layer: str | None = None, run_id: str | None = None,
                 query_id: int | None = None, roi: Mapping[str, Any] | None = None,
                 thumbnail: dict | None = None, read: Any = None, card: Any = None,
                 labelled_by: Mapping[int, str] | None = None, score_changes: Any = None,
                 proposals: Mapping[int, str] | None = None) -> Report:
    """The report of one image or patch from plain arrays.

    ``max_activations`` (units,): each unit's maximum activation on the image (or patch);
    ``thresholds`` (units,): the run's ``T``; ``labels``: ``{unit: Concept}`` from the store;
    ``iou`` (units,): each unit's mask IoU with the ROI (None: no ROI); ``aligned``: the aligned
    units (default: ``iou >= iou_threshold``). ``roi`` is kept as a summary (``bbox``, ``area``).
    ``read`` (a ``models.inference.MammogramRead``) adds the image's score and domain verdict, ``card``
    (a ``models.card.ModelCard``) what the model was trained on, ``labelled_by`` (``{unit: reader}``, from
    ``ConceptStore.labellers``) who labelled what. ``score_changes`` (a ``models.ablation.ScoreChanges`` keyed
    by concept id, from :func:`concept_groups`) adds each concept's change of the score when its units are silenced.
    ``proposals`` (``{unit: text}``, from :func:`proposal_texts`) puts pending concept proposals on the "label me"
    units.
    """
    acts = _vector(max_activations, "max_activations")
    thr = _vector(thresholds, "thresholds")
    n_units = len(acts)
    if len(thr) != n_units:
        raise ReportError(f"{n_units} activations but {len(thr)} thresholds: both are one value per unit")
    ious = None
    if iou is not None:
        ious = _vector(iou, "iou")
        if len(ious) != n_units:
            raise ReportError(f"{n_units} activations but {len(ious)} IoUs: both are one value per unit")
    outside = sorted(u for u in labels if not 0 <= int(u) < n_units)
    if outside:
        raise ConceptError(f"labels name unit(s) {outside[:5]} but the layer has {n_units} units: "
                           "labels of another model or layer?")
    if aligned is None:
        aligned_units = [int(u) for u in np.flatnonzero(ious >= iou_threshold)] if ious is not None else []
    else:
        aligned_units = sorted({int(u) for u in aligned})
        if any(not 0 <= u < n_units for u in aligned_units):
            raise ReportError(f"aligned units outside 0..{n_units - 1}")
    aligned_set = set(aligned_units)

    normalised = relative_activation(acts, thr)

    changes = score_changes.changes if score_changes is not None else {}
    concepts = {concept.concept_id: concept for concept in labels.values()}
    scores = []
    for concept_id, units in concept_groups(labels).items():
        concept = concepts[concept_id]
        idx = np.array(units)
        norm = normalised[idx]
        finite = norm[np.isfinite(norm)]
        scores.append(ConceptScore(
            concept_id=concept.concept_id, name=concept.name, colour=concept.colour, units=units,
            mean_activation=float(acts[idx].mean()),
            mean_normalised=float(finite.mean()) if len(finite) else None,
            n_normalised=int(len(finite)),
            mean_iou=float(ious[idx].mean()) if ious is not None else None,
            n_aligned=sum(1 for u in units if u in aligned_set),
            unit_activation=[float(v) for v in acts[idx]],
            unit_normalised=[float(v) if np.isfinite(v) else None for v in norm],
            unit_iou=[float(v) for v in ious[idx]] if ious is not None else None,
            unit_labelled_by=[(labelled_by or {}).get(u) for u in units],
            labelled_by=_by_count((labelled_by or {}).get(u) for u in units),
            score_change=_finite(changes.get(concept.concept_id))))
    scores.sort(key=lambda s: (s.mean_normalised is None, -(s.mean_normalised or 0.0), s.name.casefold()))

    label_me = [LabelMe(unit=u, iou=float(ious[u]) if ious is not None else None,
                        activation=float(acts[u]),
                        normalised=float(normalised[u]) if np.isfinite(normalised[u]) else None,
                        proposal=(proposals or {}).get(u))
                for u in aligned_units if u not in labels]
    label_me.sort(key=lambda c: (-(c.iou or 0.0), c.unit))

    notes = []
    if not labels:
        notes.append("No unit of this layer is labelled yet.")
    dead = int((thr <= 0).sum())
    if dead:
        notes.append(f"{dead} unit(s) have T <= 0 (never active at the threshold quantile): "
                     "left out of the normalised means.")
    silenced = None
    if score_changes is not None:
        label = card.score_label if card is not None else "score"
        silenced = {"of": score_changes.of, "score": float(score_changes.score), "label": label}
    roi_summary = None
    if roi is not None:
        roi_summary = {"bbox": list(roi.get("bbox") or []) or None, "area": roi.get("area")}
    return Report(image_id=image_id, patch_box=[int(v) for v in patch_box] if patch_box is not None else None,
                  model_digest=model_digest, layer=layer, run_id=run_id, query_id=query_id,
                  created_at=utc_now(), n_units=n_units, n_labelled=len(labels), iou_threshold=float(iou_threshold),
                  has_roi=ious is not None, roi=roi_summary, concepts=scores, label_me=label_me,
                  aligned=aligned_units, notes=notes, thumbnail=thumbnail,
                  score=read_score(read, card.score_label if card is not None else "score"),
                  model_card=card.to_dict() if card is not None else None,
                  domain=read.domain.to_dict() if read is not None and read.domain is not None else None,
                  silenced=silenced)


def concept_groups(labels: Mapping[int, Concept]) -> dict[int, list[int]]:
    """``{concept_id: its labelled units, ascending}`` from ``{unit: Concept}``: the groups a report has a bar
    for, and the groups a caller silences for ``build_report(score_changes=...)``."""
    groups: dict[int, list[int]] = {}
    for unit in sorted(int(u) for u in labels):
        groups.setdefault(labels[unit].concept_id, []).append(unit)
    return groups


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def proposal_texts(store: Any, model_digest: str, layer: str) -> dict[int, str]:
    """``{unit: "spiculated (IoU 0.03 over 9 lesions)"}``: each unit's best pending proposal, for reports."""
    return {p.unit: f"{p.concept} ({p.evidence_text()})" for p in reversed(store.proposals(model_digest, layer))}


def _by_count(names: Iterable[str | None]) -> list[str]:
    """Distinct names, the most frequent first (ties by name); None left out."""
    counts = Counter(n for n in names if n)
    return sorted(counts, key=lambda n: (-counts[n], n))


def read_score(read: Any, label: str) -> dict | None:
    """What a report shows of a read: the image score (named ``label``) and the suspicious patches."""
    if read is None:
        return None
    return {"label": label, "image_score": float(read.image_score), "n_patches": int(len(read.scores)),
            "n_suspicious": int(len(read.suspicious)), "operating_point": float(read.operating_point)}


def _vector(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ReportError(f"{name} must be one value per unit (shape (units,)), not shape {array.shape}")
    if not np.isfinite(array).all():
        raise ReportError(f"{name} holds NaN or infinite values")
    return array


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _fmt_change(value: float) -> str:
    """A change of a probability, signed: two decimals, three below 0.01 so a small effect is not "+0.00"."""
    if value == 0:
        return "0"
    return f"{value:+.2f}" if abs(value) >= 0.01 else f"{value:+.3f}"


def _units(n: int) -> str:
    return f"{n} unit" if n == 1 else f"{n} units"


# ----------------------------------------------------------------------------------------- HTML
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 40px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:0 0 2px}
.meta{color:#57606a;font-size:13px;margin-bottom:18px} .meta code{background:#eaeef2;padding:1px 5px;border-radius:4px}
.grid{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.card{background:#fff;border:1px solid #d8dee4;border-radius:10px;padding:16px 18px;box-shadow:0 1px 2px #0000000d}
.card p.sub{color:#57606a;font-size:13px;margin:0 0 10px;max-width:560px}
.thumb{flex:0 0 auto} .charts{flex:1 1 600px;display:flex;flex-direction:column;gap:18px}
table{border-collapse:collapse;font-size:13px;min-width:60%} th,td{text-align:left;padding:4px 10px 4px 0}
th{color:#57606a;font-weight:600;border-bottom:1px solid #d8dee4} td.num{font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:baseline}
.empty{color:#57606a;font-style:italic} .notes{color:#57606a;font-size:12px;margin-top:14px}
.model{margin:0 0 16px}.model .warn{color:#8a1c00;background:#fff1e5;border:1px solid #f0b08a;border-radius:6px;padding:8px 10px;margin:8px 0;font-weight:600}.model .sub{color:#57606a;font-size:13px;margin-top:6px}
.pill{display:inline-block;background:#fff4d6;border:1px solid #e6c46b;border-radius:12px;padding:1px 9px;margin:2px 4px 2px 0;
font-size:13px}
footer{color:#57606a;font-size:12px;margin-top:22px;max-width:900px}
"""


def _row_label(label: str, left: float, baseline: float) -> str:
    """A bar chart's row name, right-aligned left of the bars (long names cut, whole in the tooltip)."""
    shown = label if len(label) <= 24 else label[:23] + "…"
    return (f'<text x="{left - 10}" y="{baseline:.1f}" font-size="13" fill="#1f2328" text-anchor="end">'
            f'<title>{html.escape(label)}</title>{html.escape(shown)}</text>')


def _nice_axis(value: float, n_ticks: int = 4) -> tuple[float, float]:
    """A round axis end at or above ``value`` and its tick step (1, 2, 2.5 or 5 times a power of ten)."""
    if value <= 0 or not math.isfinite(value):
        value = 1.0
    raw_step = value / n_ticks
    power = 10 ** math.floor(math.log10(raw_step))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw_step * 0.9999)
    return step * math.ceil(value / step - 1e-9), step


def _svg_bars(rows: list[tuple[str, float | None, str, str]], *, top_value: float, reference: float | None,
              reference_label: str, axis_label: str, width: int = 660, cap: float | None = None) -> str:
    """A horizontal bar chart: rows of (label, value, colour, annotation); the axis ends at a round
    number at or above ``top_value`` (and at most ``cap``)."""
    axis_max, step = _nice_axis(top_value)
    if cap is not None and axis_max > cap:
        axis_max, step = cap, cap / 4
    left, right_pad, row_h, top = 180, 190, 30, 14
    bar_w = width - left - right_pad
    height = top + row_h * len(rows) + 44
    esc = html.escape

    def x(v: float) -> float:
        return left + bar_w * max(0.0, min(v, axis_max)) / axis_max

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" font-family="system-ui,Segoe UI,Roboto,Helvetica,Arial,sans-serif">']
    ticks = [step * i for i in range(int(round(axis_max / step)) + 1)]
    base = top + row_h * len(rows)
    for t in ticks:
        parts.append(f'<line x1="{x(t):.1f}" y1="{top - 4}" x2="{x(t):.1f}" y2="{base}" stroke="#eaeef2"/>')
        parts.append(f'<text x="{x(t):.1f}" y="{base + 15}" font-size="11" fill="#57606a" '
                     f'text-anchor="middle">{_fmt(t)}</text>')
    parts.append(f'<text x="{left + bar_w / 2:.1f}" y="{base + 33}" font-size="12" fill="#57606a" '
                 f'text-anchor="middle">{esc(axis_label)}</text>')
    if reference is not None and 0 < reference <= axis_max:  # drawn under the bars and their notes
        rx = x(reference)
        parts.append(f'<line x1="{rx:.1f}" y1="{top - 8}" x2="{rx:.1f}" y2="{base}" stroke="#1f2328" '
                     f'stroke-dasharray="4 3" stroke-width="1.2"/>')
        parts.append(f'<text x="{rx + 4:.1f}" y="{top - 1}" font-size="11" fill="#1f2328">{esc(reference_label)}</text>')
    for i, (label, value, colour, note) in enumerate(rows):
        y = top + i * row_h
        parts.append(_row_label(label, left, y + row_h / 2 + 4))
        if value is None:
            parts.append(f'<text x="{left + 4}" y="{y + row_h / 2 + 4:.1f}" font-size="12" fill="#57606a">'
                         f'n/a</text>')
            end = left + 28
        else:
            end = x(value)
            parts.append(f'<rect x="{left}" y="{y + 5}" width="{max(end - left, 1.5):.1f}" height="{row_h - 10}" '
                         f'rx="3" fill="{esc(colour)}"><title>{esc(label)}: {esc(note)}</title></rect>')
            if value > axis_max:
                parts.append(f'<text x="{end - 4:.1f}" y="{y + row_h / 2 + 4:.1f}" font-size="12" fill="#fff" '
                             f'text-anchor="end">»</text>')
        # a white halo keeps the note readable where it crosses the reference line
        parts.append(f'<text x="{max(end, left) + 8:.1f}" y="{y + row_h / 2 + 4:.1f}" font-size="12" '
                     f'fill="#1f2328" stroke="#fff" stroke-width="3" paint-order="stroke">{esc(note)}</text>')
    parts.append(f'<line x1="{left}" y1="{top - 4}" x2="{left}" y2="{base}" stroke="#8c959f"/>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_change_bars(rows: list[tuple[str, float | None, str, str]], *, axis_label: str, width: int = 660) -> str:
    """A horizontal bar chart of signed values around a zero line: rows of (label, value, colour, annotation);
    the axis is symmetric, at a round number at or above the largest magnitude (at most 1: a probability)."""
    top = max([abs(v) for _, v, _, _ in rows if v is not None] + [0.01])
    axis_max, step = _nice_axis(top, n_ticks=2)
    axis_max = min(axis_max, 1.0)
    step = min(step, axis_max)
    left, right_pad, row_h, top_pad = 180, 120, 30, 14
    bar_w = width - left - right_pad
    zero = left + bar_w / 2
    height = top_pad + row_h * len(rows) + 44
    esc = html.escape

    def x(v: float) -> float:
        return zero + (bar_w / 2) * max(-axis_max, min(v, axis_max)) / axis_max

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" font-family="system-ui,Segoe UI,Roboto,Helvetica,Arial,sans-serif">']
    base = top_pad + row_h * len(rows)
    n_steps = int(round(axis_max / step))
    for t in [step * i for i in range(-n_steps, n_steps + 1)]:
        parts.append(f'<line x1="{x(t):.1f}" y1="{top_pad - 4}" x2="{x(t):.1f}" y2="{base}" stroke="#eaeef2"/>')
        parts.append(f'<text x="{x(t):.1f}" y="{base + 15}" font-size="11" fill="#57606a" '
                     f'text-anchor="middle">{_fmt_change(t)}</text>')
    parts.append(f'<text x="{zero:.1f}" y="{base + 33}" font-size="12" fill="#57606a" '
                 f'text-anchor="middle">{esc(axis_label)}</text>')
    for i, (label, value, colour, note) in enumerate(rows):
        y = top_pad + i * row_h
        parts.append(_row_label(label, left, y + row_h / 2 + 4))
        if value is None:
            parts.append(f'<text x="{zero + 6:.1f}" y="{y + row_h / 2 + 4:.1f}" font-size="12" fill="#57606a">'
                         f'n/a</text>')
            continue
        end = x(value)
        start, span = min(zero, end), max(abs(end - zero), 1.5)
        parts.append(f'<rect x="{start:.1f}" y="{y + 5}" width="{span:.1f}" height="{row_h - 10}" rx="3" '
                     f'fill="{esc(colour)}"><title>{esc(label)}: {esc(note)}</title></rect>')
        # the note on the bar's outer side, or right of the zero line when the bar points left
        note_x = end + 8 if value >= 0 else zero + 8
        parts.append(f'<text x="{note_x:.1f}" y="{y + row_h / 2 + 4:.1f}" font-size="12" fill="#1f2328" '
                     f'stroke="#fff" stroke-width="3" paint-order="stroke">{esc(note)}</text>')
    parts.append(f'<line x1="{zero:.1f}" y1="{top_pad - 4}" x2="{zero:.1f}" y2="{base}" stroke="#8c959f"/>')
    parts.append("</svg>")
    return "".join(parts)


def _thumbnail_svg(report: Report, max_height: int = 430) -> str:
    thumb = report.thumbnail
    if not thumb:
        return ""
    w, h, scale = thumb["width"], thumb["height"], thumb["scale"]
    shown_h = min(max_height, h)
    shown_w = round(w * shown_h / h)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
             f'viewBox="0 0 {w} {h}" width="{shown_w}" height="{shown_h}">',
             f'<image href="data:image/png;base64,{thumb["png_base64"]}" width="{w}" height="{h}"/>']
    if report.patch_box:
        px, py, pw, ph = (v * scale for v in report.patch_box)
        parts.append(f'<rect x="{px:.1f}" y="{py:.1f}" width="{pw:.1f}" height="{ph:.1f}" fill="none" '
                     f'stroke="#56b4e9" stroke-width="{max(w, h) / 250:.1f}" stroke-dasharray="6 4"/>')
    if thumb.get("roi_png_base64"):
        parts.append(f'<image href="data:image/png;base64,{thumb["roi_png_base64"]}" width="{w}" height="{h}"/>')
    if report.roi and report.roi.get("bbox"):
        rx, ry, rw, rh = (v * scale for v in report.roi["bbox"])
        fill = "none" if thumb.get("roi_png_base64") else "#e69f0033"
        parts.append(f'<rect x="{rx:.1f}" y="{ry:.1f}" width="{max(rw, 1):.1f}" height="{max(rh, 1):.1f}" '
                     f'fill="{fill}" stroke="#e69f00" stroke-width="{max(w, h) / 250:.1f}" stroke-opacity="0.8"/>')
    parts.append("</svg>")
    caption = "ROI in orange (its box outlined)" if report.roi else "no ROI given"
    if report.patch_box:
        caption += ", patch dashed blue"
    return (f'<div class="card thumb"><h2>Image</h2><p class="sub">Chest wall on the left; {caption}.</p>'
            f'{"".join(parts)}</div>')


def _render_html(report: Report) -> str:
    esc = html.escape
    title = f"Concept report — {report.image_id}" if report.image_id else "Concept report"
    meta = [f"{report.n_labelled} of {report.n_units} units labelled"]
    if report.model_digest:
        meta.append(f"model <code>{esc(report.model_digest[:12])}</code>")
    if report.layer:
        meta.append(f"layer <code>{esc(report.layer)}</code>")
    if report.run_id:
        meta.append(f"run <code>{esc(report.run_id)}</code>")
    if report.query_id is not None:
        meta.append(f"ROI query #{report.query_id}")
    if report.patch_box:
        meta.append("patch [" + ", ".join(map(str, report.patch_box)) + "]")
    meta.append(esc(report.created_at))

    empty = ('<p class="empty">No labelled units yet. Draw an ROI, then label the aligned units (Label Studio, '
             'the FiftyOne panel, or <code>mammo concepts label</code>): the bars appear as labels accumulate.</p>')
    if report.concepts:
        top = max([s.mean_normalised or 0.0 for s in report.concepts] + [1.0])
        value_rows = [(s.name, s.mean_normalised, s.colour,
                       f"{_fmt(s.mean_normalised)}×T · raw {_fmt(s.mean_activation)} · {_units(s.n_units)}")
                      for s in report.concepts]
        value_chart = _svg_bars(value_rows, top_value=top, reference=1.0, reference_label="T",
                                axis_label="mean of max activation ÷ unit threshold T")
    else:
        value_chart = empty
    if not report.has_roi:
        area_chart = ('<p class="empty">No ROI given. Ask with an ROI (<code>mammo report IMAGE --roi x,y,w,h</code> '
                      'or a brush region in Label Studio) to see which concepts cover it.</p>')
    elif report.concepts:
        top = max([s.mean_iou or 0.0 for s in report.concepts] + [report.iou_threshold * 1.5])
        area_rows = [(s.name, s.mean_iou, s.colour,
                      f"IoU {s.mean_iou:.2f} · {s.n_aligned}/{_units(s.n_units)} aligned")
                     for s in report.concepts]
        area_chart = _svg_bars(area_rows, top_value=top, cap=1.0, reference=report.iou_threshold,
                               reference_label=f"aligned ≥ {report.iou_threshold:g}",
                               axis_label="mean IoU of the concept's unit masks with the ROI")
    else:
        area_chart = empty

    change_card = ""
    if report.silenced is not None and report.concepts:
        sil = report.silenced
        of = "image score (its highest patch score)" if sil["of"] == "image" else "patch's score"
        change_rows = [(s.name, s.score_change, s.colour,
                        f"{_fmt_change(s.score_change)} · {sil['score']:.2f} → {sil['score'] + s.score_change:.2f}"
                        if s.score_change is not None else "n/a")
                       for s in report.concepts]
        change_chart = _svg_change_bars(change_rows, axis_label=f"change in {sil['label']} with the concept silenced")
        change_card = (f'<div class="card"><h2>Effect on the score</h2><p class="sub">Per concept: the {of} with '
                       f'the concept\'s units set to zero at {esc(report.layer or "the dissected layer")} and the '
                       f'forward pass finished, minus the score as read ({esc(sil["label"])} {sil["score"]:.2f}). '
                       f'Left of zero: the model used the concept to raise the score.</p>{change_chart}</div>')

    if report.has_roi and report.label_me:
        rows = "".join(
            f'<tr><td>unit {c.unit}</td><td class="num">{_fmt(c.iou)}</td><td class="num">{_fmt(c.normalised)}</td>'
            f'<td class="num">{_fmt(c.activation)}</td><td>{esc(c.proposal or "–")}</td></tr>' for c in report.label_me)
        label_me = (f'<p class="sub">{len(report.label_me)} unit(s) align with the ROI but carry no concept yet. '
                    f'Label them to make the next reports finer.</p><table><tr><th>unit</th><th>IoU</th>'
                    f'<th>activation ÷ T</th><th>activation</th><th>proposed concept</th></tr>{rows}</table>')
    elif report.has_roi and not report.aligned:
        label_me = (f'<p class="empty">No unit is aligned with this ROI (IoU &ge; {report.iou_threshold:g}): '
                    f'nothing to label.</p>')
    elif report.has_roi:
        label_me = '<p class="empty">Every unit aligned with this ROI is labelled.</p>'
    else:
        label_me = '<p class="empty">Give an ROI to find aligned, unlabelled units.</p>'

    detail_rows = []
    for s in report.concepts:
        for j, unit in enumerate(s.units):
            iou = f"{s.unit_iou[j]:.3f}" if s.unit_iou is not None else "–"
            detail_rows.append(
                f'<tr><td><span class="swatch" style="background:{esc(s.colour)}"></span>{esc(s.name)}</td>'
                f'<td>{unit}</td><td class="num">{_fmt(s.unit_activation[j])}</td>'
                f'<td class="num">{_fmt(s.unit_normalised[j])}</td><td class="num">{iou}</td>'
                f'<td>{esc(s.unit_labelled_by[j] or "–") if s.unit_labelled_by else "–"}</td></tr>')
    details = ("<details><summary>Per-unit numbers</summary><table><tr><th>concept</th><th>unit</th>"
               "<th>max activation</th><th>÷ T</th><th>IoU</th><th>labelled by</th></tr>" + "".join(detail_rows)
               + "</table></details>"
               if detail_rows else "")
    notes = "".join(f"<div>{esc(n)}</div>" for n in report.notes)
    model_box = ""
    if report.score or report.model_card or report.domain_warning:
        parts = []
        if report.score:
            sc = report.score
            parts.append(f'<div><b>{esc(sc["label"])} {sc["image_score"]:.2f}</b> · {sc["n_suspicious"]} of '
                         f'{sc["n_patches"]} patches at or above the operating point {sc["operating_point"]:.2f}</div>')
        if report.domain_warning:
            parts.append(f'<div class="warn">&#9888; {esc(report.domain_warning)}</div>')
        if report.model_card:
            parts.append(f'<div class="sub">{esc(report.model_card["summary"])}</div>')
        model_box = f'<div class="card model">{"".join(parts)}</div>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{_CSS}</style></head>
<body><main>
<h1>{esc(title)}</h1>
<div class="meta">{" · ".join(meta)}</div>
{model_box}
<div class="grid">
{_thumbnail_svg(report)}
<div class="charts">
<div class="card"><h2>Activation value</h2>
<p class="sub">Per concept: the mean over its labelled units of each unit's highest activation on this
{"patch" if report.patch_box else "image"}, divided by the unit's threshold T (1.0 = as strong as the unit's top 1%
on the dissection patches). Raw mean and number of units beside each bar.</p>
{value_chart}</div>
<div class="card"><h2>Activation area</h2>
<p class="sub">Per concept: the mean IoU of its units' activation masks (map above T) with the ROI.</p>
{area_chart}</div>
{change_card}
<div class="card"><h2>Label me</h2>{label_me}{details}</div>
</div></div>
<div class="notes">{notes}</div>
<footer>Network Dissection report (Lu &amp; Perer, section 3.2.2). Labels: one concept per unit, from the
workspace's concept store at the time of the report.</footer>
</main></body></html>
"""


# ----------------------------------------------------------------------------- wiring (real data)
def _png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def make_thumbnail(display_u8: np.ndarray, max_side: int = 640, roi_mask: np.ndarray | None = None) -> dict:
    """A downscaled PNG of a display image for the HTML page (``scale`` = thumbnail px per image px),
    with the ROI mask (same shape as the image) as a translucent orange overlay PNG when given."""
    from PIL import Image

    image = Image.fromarray(np.asarray(display_u8, dtype=np.uint8))
    scale = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if scale < 1.0:
        image = image.resize(size, Image.Resampling.LANCZOS)
    thumb = {"png_base64": _png_base64(image), "width": image.width, "height": image.height, "scale": scale}
    if roi_mask is not None:
        # box-filtered coverage, so thin brush strokes survive the downscaling
        cover = np.asarray(Image.fromarray(np.asarray(roi_mask, dtype=np.uint8) * 255).resize(
            size, Image.Resampling.BOX)) > 0
        rgba = np.zeros((*cover.shape, 4), dtype=np.uint8)
        rgba[cover] = (230, 159, 0, 120)
        thumb["roi_png_base64"] = _png_base64(Image.fromarray(rgba, "RGBA"))
    return thumb


def report_for_image(ws: Workspace, image_id: str, roi: np.ndarray | Sequence[int] | None = None, *,
                     run: DissectionRun | str | None = None, loaded: LoadedModel | None = None,
                     patch_box: Sequence[int] | None = None, record: bool = False, asked_by: str = "api",
                     source: str = "api", thumbnail: bool = True, silence: bool = True) -> Report:
    """The report of one catalog image (or one patch of its read) with the workspace's current labels:
    :meth:`workspace.dissect.session.Session.report` of the session ``run`` / ``loaded`` open (the session's rule
    picks them when not given). ``roi``: a bool mask of the image (rows, cols) or an [x, y, w, h] box."""
    from workspace.dissect.session import Session

    with Session.open(ws, run=run, loaded=loaded) as session:
        return session.report(image_id, roi, patch_box=patch_box, record=record, asked_by=asked_by,
                              source=source, thumbnail=thumbnail, silence=silence)


