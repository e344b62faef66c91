"""The two Label Studio label configs, and the check that a config sent to the backend is one of them.

Control names are the contract between the configs, the backend's answers and the webhook:

- ``roi_box``: the reader's ROI in the UI, a ``smart`` (``smartOnly``) rectangle: with the backend connected
  as interactive and Auto-Annotation on, drawing it sends the box to ``/predict`` in
  ``params.context.result``; the backend echoes it back with its answer (Label Studio deletes a smart
  region once its answer is accepted), so it stays in the annotation for the webhook;
- ``roi``: the ROI as a brush (label ``ROI``): "answered when you Update or Submit". Label Studio 1.23.2
  creates brush strokes as non-dynamic regions, so a brush never sends the interactive request (checked in
  headless Chromium, ``tests/test_labelstudio_browser.py``); the webhook answers it and writes the answer
  back to the task as a prediction;
- ``units``: the backend's brush regions (aligned units' masks, the most activated unit's map);
- ``findings``: the suspicious patches as outline-only, read-only rectangles (Screening reads; a drag that
  starts on one with Ctrl held draws the ROI box instead of selecting it);
- ``assessment``: the image-level (or patch-level) choice, with the model's score: the model's own
  classes, positive first (``label_config(positive=..., negative=...)``; the backend answers with the
  choices of the project's config, so a project keeps working when the model changes its words);
- ``concept`` (existing concepts, from the task's ``concepts`` list) and ``new_concept`` (free text):
  the concept the reader sees in the ROI (the paper's progressive labelling);
- ``proposals`` (optional: older projects lack it): accept or reject, on Submit, the concepts proposed for
  the ROI's aligned units from the lesions they align with (``workspace.dissect.proposals``; the report's
  "Label me" line names them);
- ``report``: the per-concept report, as text.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import escape

from models.card import DEFAULT_NEGATIVE, DEFAULT_POSITIVE
from workspace.base.errors import MammoError

SCREENING = "screening"
PATCH_REVIEW = "patch_review"

TITLES = {SCREENING: "Screening reads", PATCH_REVIEW: "Patch review"}

ROI_LABEL = "ROI"
PROPOSALS_ACCEPT = "Accept the proposed concepts"
PROPOSALS_REJECT = "Reject the proposed concepts"
ALIGNED_LABEL = "aligned unit"
MOST_ACTIVATED_LABEL = "most activated unit"
MOST_ALIGNED_LABEL = "most aligned unit"
SUSPICIOUS_LABEL = "suspicious patch"


class LabelConfigError(MammoError):
    """A label config the backend cannot answer for (a control is missing or points elsewhere)."""


# Colours: the ROI magenta; the model's regions in colours that stay visible on a grey mammogram and
# apart from each other (orange patches, yellow most activated unit, green most aligned, cyan aligned).
ROI_COLOUR = "#ff00ff"
SUSPICIOUS_COLOUR = "#ff7a00"
MOST_ACTIVATED_COLOUR = "#ffd000"
MOST_ALIGNED_COLOUR = "#00e676"
ALIGNED_COLOUR = "#00b8ff"

# The reader's ROI in the UI is a smart RECTANGLE (``roi_box``): Label Studio 1.23.2's frontend creates
# every brush stroke as a non-dynamic region (``createDrawingRegion(..., dynamic=false)``), so a smart
# brush never sends the interactive request; a smart rectangle does. ``smartOnly`` leaves only the smart
# rectangle tool (shown once Auto-Annotation is on). The ``roi`` brush is the other way: a reader paints the
# ROI and presses Update or Submit; the webhook answers it as a box is answered and puts the answer on the task
# as a prediction (``Backend.write_back``), seen when the task is reopened.
_ROI_PANEL = """
    <Header value="Ask the model about a region" size="5"/>
    <Text name="roi_help" value="{roi_help}"/>
    <RectangleLabels name="roi_box" toName="{target}" smart="true" smartOnly="true" strokeWidth="3"
                     fillOpacity="0.08" showInline="true">
      <Label value="{roi}" background="{roi_colour}"/>
    </RectangleLabels>
    <Header value="{brush_help}" size="6"/>
    <BrushLabels name="roi" toName="{target}" smart="false" showInline="true">
      <Label value="{roi}" background="{roi_colour}"/>
    </BrushLabels>
    <Header value="Report: concepts of the labelled neurons, and the neurons aligned with the ROI" size="6"/>
    <TextArea name="report" toName="{target}" rows="10" editable="false" maxSubmissions="1"
              placeholder="the model's report appears here"/>
"""

_CONCEPT_PANEL = """
    <Header value="Name what the ROI shows (optional; on Submit its aligned neurons get this label)" size="6"/>
    <Choices name="concept" toName="{target}" value="$concepts" choice="single-radio" showInline="true"
             allowNested="false"/>
    <TextArea name="new_concept" toName="{target}" placeholder="...or type a new concept" rows="1"
              maxSubmissions="1" editable="true"/>
    <Header value="Concepts proposed for the aligned neurons (the report's Label me line): on Submit" size="6"/>
    <Choices name="proposals" toName="{target}" choice="single" showInline="true">
      <Choice value="{accept}"/>
      <Choice value="{reject}"/>
    </Choices>
"""

_MODEL_PANEL = """
    <Header value="{model_title}" size="5"/>
    <Header value="$model_card" size="6"/>
    <Choices name="assessment" toName="{target}" choice="single" showInline="true">
      <Choice value="{positive}"/>
      <Choice value="{negative}"/>
    </Choices>
    <Header value="Colours on the image (select a region for its unit number and IoU)" size="6"/>{findings}
    <BrushLabels name="units" toName="{target}" smart="false" showInline="true">
      <Label value="{most_activated}" background="{most_activated_colour}"/>
      <Label value="{most_aligned}" background="{most_aligned_colour}"/>
      <Label value="{aligned}" background="{aligned_colour}"/>
    </BrushLabels>
"""

_FINDINGS = """
    <RectangleLabels name="findings" toName="image" smart="false" strokeWidth="2" fillOpacity="0"
                     showInline="true">
      <Label value="{suspicious}" background="{suspicious_colour}"/>
    </RectangleLabels>"""


BRUSH_HELP = "Or paint the ROI with the brush: it is answered when you Update or Submit (reopen the task to see it)."
ROI_HELP = ("Once: switch on Auto-Annotation, then Auto-Accept Suggestions (bottom bar). Then click ROI and hold "
            "Ctrl (\u2318 on a Mac) while you drag a box over the finding: the neurons aligned with it are drawn on "
            "the image and the report below is rewritten. Another box asks again.")


def _fill(template: str, target: str, **extra: str) -> str:
    return template.format(
        target=target, roi=ROI_LABEL, roi_help=ROI_HELP, brush_help=BRUSH_HELP, aligned=ALIGNED_LABEL,
        most_aligned=MOST_ALIGNED_LABEL,
        most_activated=MOST_ACTIVATED_LABEL, roi_colour=ROI_COLOUR, aligned_colour=ALIGNED_COLOUR, most_aligned_colour=MOST_ALIGNED_COLOUR,
        most_activated_colour=MOST_ACTIVATED_COLOUR, accept=PROPOSALS_ACCEPT, reject=PROPOSALS_REJECT, **extra)


def _panel(target: str, model_title: str, findings: bool, positive: str, negative: str) -> str:
    rectangles = _FINDINGS.format(suspicious=SUSPICIOUS_LABEL, suspicious_colour=SUSPICIOUS_COLOUR) if findings else ""
    return (_fill(_ROI_PANEL, target) + _fill(_CONCEPT_PANEL, target)
            + _fill(_MODEL_PANEL, target, model_title=model_title, findings=rectangles,
                    positive=escape(positive, _QUOTE), negative=escape(negative, _QUOTE)))


_QUOTE = {'"': "&quot;"}

_SCREENING = """<View>
  <Header value="$title" size="4"/>
  <View style="display: flex; gap: 20px; align-items: flex-start">
    <View style="flex: 3; min-width: 0">
      <Image name="image" value="$image" zoom="true" zoomControl="true" rotateControl="false"
             maxWidth="100%" maxHeight="calc(100vh - 220px)"/>
    </View>
    <View style="flex: 2; min-width: 320px">
{panel}
    </View>
  </View>
</View>
"""

_PATCH_REVIEW = """<View>
  <Header value="$title" size="4"/>
  <View style="display: flex; gap: 20px; align-items: flex-start">
    <View style="flex: 2; min-width: 0">
      <Header value="Suspicious patch, enlarged: draw the ROI here" size="5"/>
      <Image name="patch" value="$patch" zoom="true" zoomControl="true" rotateControl="false"
             maxWidth="100%"/>
    </View>
    <View style="flex: 1; min-width: 0">
      <Header value="Where it lies in the {subject} (orange outline)" size="5"/>
      <Image name="context" value="$image" zoom="true" zoomControl="true" rotateControl="false"
             maxWidth="100%"/>
    </View>
    <View style="flex: 2; min-width: 320px">
{panel}
    </View>
  </View>
</View>
"""



def label_config(kind: str, *, positive: str = DEFAULT_POSITIVE, negative: str = DEFAULT_NEGATIVE,
                 subject: str = "mammogram") -> str:
    """The label config of a project ``kind`` for a model whose classes are ``positive`` / ``negative``
    (``LoadedModel.positive_name`` / ``negative_name``), on images called ``subject`` ("mammogram", or
    "image" for other modalities: :attr:`workspace.base.modality.Modality.subject`)."""
    if kind == SCREENING:
        panel = _panel("image", f"The model's read of this {subject}", True, positive, negative)
        return _SCREENING.format(panel=panel)
    if kind == PATCH_REVIEW:
        panel = _panel("patch", "The model's read of this patch", False, positive, negative)
        return _PATCH_REVIEW.format(panel=panel, subject=escape(subject, _QUOTE))
    raise LabelConfigError(f"unknown project kind {kind!r}: {SCREENING}, {PATCH_REVIEW}")


SCREENING_CONFIG = label_config(SCREENING)  # the shipped model's configs
PATCH_REVIEW_CONFIG = label_config(PATCH_REVIEW)
CONFIGS = {SCREENING: SCREENING_CONFIG, PATCH_REVIEW: PATCH_REVIEW_CONFIG}

# what each kind needs: control name -> (tag, toName)
_REQUIRED = {
    SCREENING: {"roi": ("BrushLabels", "image"), "units": ("BrushLabels", "image"),
                "findings": ("RectangleLabels", "image"), "assessment": ("Choices", "image"),
                "report": ("TextArea", "image")},
    PATCH_REVIEW: {"roi": ("BrushLabels", "patch"), "units": ("BrushLabels", "patch"),
                   "assessment": ("Choices", "patch"), "report": ("TextArea", "patch")},
}


@dataclass(frozen=True)
class ConfigInfo:
    """What the backend needs to know about a project's label config."""

    kind: str                 # SCREENING | PATCH_REVIEW
    image_name: str           # the Image control the regions belong to (to_name)
    image_value: str          # the task data key holding its URL ("image" or "patch")
    controls: dict[str, str]  # control name -> tag
    labels: dict[str, list[str]]  # control name -> its Label/Choice values


def parse_config(label_config: str) -> ConfigInfo:
    """Check a label config and say which project kind it is; :class:`LabelConfigError` otherwise."""
    if not isinstance(label_config, str) or not label_config.strip():
        raise LabelConfigError("the request carries no label_config")
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError as error:
        raise LabelConfigError(f"the label config is not valid XML ({error})") from None
    images = {el.get("name"): (el.get("value") or "").lstrip("$") for el in root.iter("Image")}
    controls: dict[str, str] = {}
    targets: dict[str, str] = {}
    labels: dict[str, list[str]] = {}
    for el in root.iter():
        name = el.get("name")
        if name and el.get("toName") is not None:
            controls[name] = el.tag
            targets[name] = el.get("toName")
            labels[name] = [c.get("value") for c in el if c.tag in ("Label", "Choice") and c.get("value")]
    kind = PATCH_REVIEW if "patch" in images else SCREENING
    missing = []
    for name, (tag, to_name) in _REQUIRED[kind].items():
        if controls.get(name) != tag or targets.get(name) != to_name:
            missing.append(f"{tag} name=\"{name}\" toName=\"{to_name}\"")
    if missing or (kind == SCREENING and "image" not in images):
        shown = "; ".join(missing) or 'Image name="image"'
        raise LabelConfigError(f"this label config is not a mammo-dissect {TITLES[kind]} config: it lacks "
                               f"{shown} (re-provision the project with `mammo ls provision`)")
    if len(labels.get("assessment", [])) != 2:
        raise LabelConfigError('the "assessment" choices of this label config are not two (the model\'s positive '
                               'and negative answers)')
    if ROI_LABEL not in labels.get("roi", []):
        raise LabelConfigError(f'the "roi" brush of this label config has no "{ROI_LABEL}" label')
    image_name = "patch" if kind == PATCH_REVIEW else "image"
    return ConfigInfo(kind=kind, image_name=image_name, image_value=images[image_name], controls=controls,
                      labels=labels)


__all__ = ["SCREENING", "PATCH_REVIEW", "TITLES", "CONFIGS", "SCREENING_CONFIG", "PATCH_REVIEW_CONFIG",
           "ConfigInfo", "LabelConfigError", "parse_config", "ROI_LABEL", "ALIGNED_LABEL",
           "MOST_ACTIVATED_LABEL", "MOST_ALIGNED_LABEL", "SUSPICIOUS_LABEL", "ROI_HELP", "label_config"]
