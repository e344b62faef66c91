"""View and laterality written as text: what a DICOM file without View Position / View Code Sequence
or Image Laterality / Laterality still says about which view of which breast it holds.

The text attributes are read in the order of :data:`TEXT_ATTRIBUTES`, each value on its own, with two
kinds of evidence:

- a public data set's naming convention matched on the whole value: CBIS-DDSM case names
  (:data:`CBIS_DDSM_CASE_RE`, e.g. ``Mass-Test_P_00173_LEFT_CC``; its importer matches folder names with
  the same pattern);
- whole tokens, the text being split at everything that is not a letter (so ``CC`` never matches inside
  ``ACCESSION`` or ``CALCS``): a side letter joined to a view (``LCC``, ``RMLO``, ``LXCCL``), a side next
  to a view in either order (``L CC``, ``R-MLO``, ``L_ML``, ``LEFT CC``, ``CC R``), a view alone (the
  unambiguous ones: ``CC``, ``MLO``, ``LMO``, ``XCCL``, ``XCCM``; ``ML``, ``LM``, ``FB``, ``SIO``, ``ISO``
  read as words too, so only next to a side), a side word alone (``LEFT``, ``RIGHT``; a lone ``L`` or
  ``R`` is not enough).

A value whose mentions disagree (``R CC, compare L CC``) says nothing about the value they disagree on.
What was inferred is recorded by attribute name and kind of evidence only, never by the text itself:
``PatientID`` is an identifier.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

TEXT_ATTRIBUTES = ("SeriesDescription", "PatientID", "StudyDescription", "ProtocolName",
                   "AcquisitionDeviceProcessingDescription", "ImageComments")
"""The DICOM attributes searched for a view or laterality, in this order."""

CBIS_DDSM_CASE_RE = re.compile(r"^(Mass|Calc)-(Training|Test)_(P_\d+)_(LEFT|RIGHT)_(CC|MLO)(?:_(\d+))?$",
                               re.IGNORECASE)
"""A CBIS-DDSM case name: kind, published split, patient, breast, view, abnormality number (optional)."""

CBIS_DDSM = "CBIS-DDSM naming"
TEXT_TOKEN = "text token"

_SIDES = {"L": "L", "R": "R", "LEFT": "L", "RIGHT": "R"}
_SIDE_WORDS = {"LEFT", "RIGHT"}                       # a side on its own
_VIEWS_ALONE = {"CC": "CC", "MLO": "MLO", "LMO": "LMO", "XCCL": "XCCL", "XCCM": "XCCM",
                "CCID": "CC", "MLOID": "MLO"}       # implant-displaced views as their view (like ViewPosition)
_VIEWS_PAIRED = {**_VIEWS_ALONE, "ML": "ML", "LM": "LM", "FB": "FB", "SIO": "SIO", "ISO": "ISO"}
_JOINED = re.compile(r"^([LR])(CC|MLO|ML|LM|LMO|XCCL|XCCM|CCID|MLOID)$")  # not AT/FB: LAT is "lateral"


@dataclass(frozen=True)
class TextReading:
    """What one text value says: a view and/or a laterality (None: silent or self-contradicting)."""

    view: str | None
    laterality: str | None
    evidence: str                     # CBIS_DDSM | TEXT_TOKEN
    joined: bool = False              # both from one token (or one name): they belong together


@dataclass
class Inference:
    """Header values completed from text: ``inferred`` maps "view"/"laterality" to ``"Attribute (evidence)"``."""

    view: str | None
    laterality: str | None
    inferred: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def read_text(text: str) -> TextReading | None:
    """The view and laterality one text value names (see the module docstring), or None when it names neither."""
    text = text.strip()
    case = CBIS_DDSM_CASE_RE.match(text)
    if case:
        return TextReading(case.group(5).upper(), case.group(4).upper()[0], CBIS_DDSM, joined=True)
    tokens = re.findall(r"[A-Z]+", text.upper())
    mentions: list[tuple[str | None, str | None]] = []
    i = 0
    while i < len(tokens):
        token, following = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else None
        if token in _SIDES and following in _VIEWS_PAIRED:
            mentions.append((_VIEWS_PAIRED[following], _SIDES[token]))
            i += 2
            continue
        after = tokens[i + 2] if i + 2 < len(tokens) else None
        if token in _VIEWS_PAIRED and following in _SIDES and after not in _VIEWS_PAIRED:  # "MLO L CC": L goes with CC
            mentions.append((_VIEWS_PAIRED[token], _SIDES[following]))
            i += 2
            continue
        joined = _JOINED.match(token)
        if joined:
            mentions.append((_VIEWS_PAIRED[joined.group(2)], joined.group(1)))
        elif token in _VIEWS_ALONE:
            mentions.append((_VIEWS_ALONE[token], None))
        elif token in _SIDE_WORDS:
            mentions.append((None, _SIDES[token]))
        i += 1
    if not mentions:
        return None
    views = {v for v, _ in mentions if v}
    sides = {s for _, s in mentions if s}
    view = views.pop() if len(views) == 1 else None
    laterality = sides.pop() if len(sides) == 1 else None
    if view is None and laterality is None:
        return None
    joined = view is not None and laterality is not None and (view, laterality) in mentions
    return TextReading(view, laterality, TEXT_TOKEN, joined=joined)


def infer_view_laterality(texts: Iterable[tuple[str, str]], *, view: str | None,
                          laterality: str | None) -> Inference:
    """Complete the header's ``view`` / ``laterality`` (None: absent) from ``(attribute, text)`` pairs in order.

    Header values are kept. When both are missing, a reading that names both in one token is preferred
    (the first such), else each comes from the first reading naming it. When one is known, a reading that
    contradicts it (another breast, another view) is not used, and a warning says so.
    """
    result = Inference(view, laterality)
    if view is not None and laterality is not None:
        return result
    readings = [(attribute, r) for attribute, text in texts if text and (r := read_text(text))]

    def take(key: str, attribute: str, reading: TextReading) -> None:
        setattr(result, key, getattr(reading, key))
        result.inferred[key] = f"{attribute} ({reading.evidence})"

    if view is None and laterality is None:
        both = next(((a, r) for a, r in readings if r.joined), None)
        if both:
            take("view", *both)
            take("laterality", *both)
            return result
        for key in ("view", "laterality"):
            first = next(((a, r) for a, r in readings if getattr(r, key)), None)
            if first:
                take(key, *first)
        return result
    missing, known = ("view", "laterality") if view is None else ("laterality", "view")
    known_value = getattr(result, known)
    for attribute, reading in readings:
        if getattr(reading, missing) is None:
            continue
        other = getattr(reading, known)
        if other is not None and other != known_value:
            result.warnings.append(f"{missing}: not taken from {attribute}, which names {known} {other} "
                                   f"where the header says {known_value}")
            continue
        take(missing, attribute, reading)
        break
    return result


__all__ = ["TEXT_ATTRIBUTES", "CBIS_DDSM_CASE_RE", "TextReading", "Inference", "read_text",
           "infer_view_laterality"]
