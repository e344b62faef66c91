"""Label Studio annotation events: persist what the reader submitted, and label units with their concept.

``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` (payload ``{action, annotation, task, project}``):

- one row in ``ls_annotations`` (never deleted): the ROI (geometry, the ROI query it was answered
  with, the units labelled), the choices, the concept, the reader and the raw event;
- progressive labelling: when the annotation names a concept (an existing one picked in ``concept``,
  or a new one typed in ``new_concept``) and has an ROI, the units aligned with that ROI are labelled
  with it in the concept store, recorded as from this read (the ROI query) and this reader. When the
  annotation still holds unit regions the backend answered with (``u17-...`` ids), only those units
  are labelled: they are the ones the reader kept.

``ANNOTATIONS_DELETED`` (payload ``{action, annotations: [{id}], project}``): one row per annotation.
Deleting or changing an annotation never removes a label that came from it: labels change only by a
new labelling (a relabel, in the store's history) or an explicit removal elsewhere; the rows here say
which annotation the labels came from and what happened to it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ml_backend import label_configs as lc
from ml_backend import predictions as pr
from ml_backend.predictions import RequestError
from workspace.base.catalog import json_default
from workspace.base.schema import utc_now
from workspace.dissect.concepts import encode_roi

if TYPE_CHECKING:
    from ml_backend.app import Backend

ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_ACTION = "ANNOTATIONS_DELETED"


def reader_of(annotation: dict, backend: Backend | None = None) -> str:
    """Who submitted: ``labelstudio:<email>`` when known (in the event, or asked from Label Studio with
    the URL and token its ``/setup`` gave), else ``labelstudio:user-<id>``."""
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        if who.get("email"):
            return f"labelstudio:{who['email']}"
        who = who.get("id")
    if who is None:
        return "labelstudio:unknown"
    email = backend.reader_email(int(who)) if backend is not None and str(who).isdigit() else None
    return f"labelstudio:{email}" if email else f"labelstudio:user-{who}"


def _id(value: Any) -> int | None:
    if isinstance(value, dict):
        value = value.get("id")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def submitted(results: list[dict]) -> dict:
    """The reader's answers in an annotation's result: choices per control, the concept, kept units."""
    choices: dict[str, list[str]] = {}
    picked, typed, kept = None, None, []
    for r in results:
        if not isinstance(r, dict):
            continue
        value = r.get("value") or {}
        name = r.get("from_name")
        if r.get("type") == "choices":
            choices[name] = list(value.get("choices") or [])
            if name == "concept" and value.get("choices"):
                picked = str(value["choices"][0]).strip() or None
        elif r.get("type") == "textarea" and name == "new_concept":
            texts = [t.strip() for t in value.get("text") or [] if isinstance(t, str) and t.strip()]
            typed = texts[0] if texts else None
        elif name == "units":
            unit = pr.unit_of_region(r)
            labels = value.get("brushlabels") or []
            if unit is not None and lc.MOST_ACTIVATED_LABEL not in labels:
                kept.append(unit)
    decision = (choices.get("proposals") or [None])[0]
    proposals = {lc.PROPOSALS_ACCEPT: "accept", lc.PROPOSALS_REJECT: "reject"}.get(decision)
    return {"choices": choices, "concept": typed or picked, "kept_units": sorted(set(kept)), "proposals": proposals}


def _config_info(payload: dict, task: dict) -> lc.ConfigInfo:
    project = payload.get("project")
    config = project.get("label_config") if isinstance(project, dict) else None
    if config:
        return lc.parse_config(config)
    kind = lc.PATCH_REVIEW if "patch" in (task.get("data") or {}) else lc.SCREENING
    return lc.parse_config(lc.CONFIGS[kind])


def _insert(backend: Backend, row: dict) -> int:
    from workspace.base.catalog import open_catalog

    db = open_catalog(backend.ws)
    try:
        table = db["ls_annotations"]
        table.insert(row)
        return int(table.last_pk)
    finally:
        db.conn.close()


def handle_event(backend: Backend, payload: dict) -> dict:
    action = payload.get("action")
    if action == DELETE_ACTION:
        return _deleted(backend, payload)
    if action not in ANNOTATION_ACTIONS:
        return {"status": "ignored", "action": action}
    annotation = payload.get("annotation")
    task = payload.get("task")
    if not isinstance(annotation, dict) or not isinstance(task, dict):
        raise RequestError(f"a {action} event carries \"annotation\" and \"task\" objects", code="bad_event")
    results = pr.check_results(annotation.get("result") or [], "the annotation's result")
    if not isinstance(task.get("data") or {}, dict):
        raise RequestError("the task's data is not an object", code="bad_event")
    info = _config_info(payload, task)
    reader = reader_of(annotation, backend)
    answers = submitted(results)
    image_id = (task.get("data") or {}).get("image_id")
    roi_record: dict[str, Any] | None = None
    labelled: dict[str, Any] = {"concept": answers["concept"], "units": [], "changed": 0}
    notes: list[str] = []
    failure: RequestError | None = None
    if pr.roi_regions(results):
        try:
            roi_record = _label_from_roi(backend, task, info, results, answers, reader, action, annotation,
                                         labelled, notes)
        except RequestError as error:  # kept with the event, then answered as an error
            failure = error
            roi_record = {"error": str(error), "code": error.code}
    elif answers["concept"]:
        notes.append("a concept without an ROI: draw the ROI to label the units it aligns with")
    event_id = _insert(backend, {
        "annotation_id": _id(annotation), "task_id": _id(task), "project_id": _id(payload.get("project")),
        "image_id": image_id, "action": action, "reader": reader,
        "roi": json.dumps(roi_record, default=_lenient) if roi_record else None,
        "choices": json.dumps(answers["choices"]), "concept": answers["concept"],
        "payload": json.dumps(payload, default=_lenient), "received_at": utc_now()})
    if failure is not None:
        raise RequestError(f"event {event_id} kept, but its ROI could not be used: {failure}",
                           status=failure.status, code=failure.code)
    brushes = [r for r in pr.asked_rois(results) if r.get("type") == "brushlabels"]
    written_back = False
    if brushes and roi_record and roi_record.get("query_id") is not None:
        written_back = backend.write_back(task, info, brushes, asked_by=reader,
                                          query_id=roi_record["query_id"]) is not None
        if not written_back:
            notes.append("the brush ROI's answer was not put on the task: the backend does not know Label Studio's "
                         "URL and token (connect it from the project, or set LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY)")
    return {"status": "ok", "event_id": event_id, "action": action, "labelled": labelled, "notes": notes,
            "answer_written_back": written_back}


def _label_from_roi(backend: Backend, task: dict, info: lc.ConfigInfo, results: list, answers: dict, reader: str,
                    action: str, annotation: dict, labelled: dict, notes: list[str]) -> dict:
    """Query the ROI again (cached maps: cheap), record the query, label the aligned or kept units."""
    q = backend.query(task, info, results)
    geometry = encode_roi(q["roi"])
    query_id = backend.store.record_query(
        backend.run.model_digest, backend.run.layer, roi=geometry, ranking=q["iou"], aligned=q["aligned"],
        iou_threshold=backend.iou_threshold, asked_by=reader, source="labelstudio", image_id=q["image_id"],
        patch_box=q["patch_box"], run_id=backend.run.run_id)
    kept = [u for u in answers["kept_units"] if 0 <= u < len(q["iou"])]
    units = kept or q["aligned"]
    record = {"geometry": geometry, "query_id": query_id, "aligned": q["aligned"], "kept_units": kept,
              "patch_box": q["patch_box"]}
    if answers["proposals"]:   # first: a concept the reader typed as well is their last word on these units
        pending = backend.store.proposals(backend.run.model_digest, backend.run.layer, units=units)
        decided = backend.store.decide_proposals([p.proposal_id for p in pending], accept=answers["proposals"] ==
                                                 "accept", by=reader, source="labelstudio") if pending else []
        record["proposals"] = {"decision": answers["proposals"], "decided": [p.proposal_id for p in decided]}
        if not pending:
            notes.append("no concept is proposed for these units: nothing to accept or reject")
    if answers["concept"] and units:
        note = (f"Label Studio annotation {_id(annotation)} of task {_id(task)} ({action}); "
                + ("units the reader kept" if kept else "units aligned with the ROI"))
        changed = backend.store.label_units(
            backend.run.model_digest, backend.run.layer, units, answers["concept"], by=reader,
            source="labelstudio", run_id=backend.run.run_id, query_id=query_id, note=note)
        labelled.update(units=[int(u) for u in units], changed=int(changed), query_id=query_id)
        record["labelled_units"] = labelled["units"]
    elif answers["concept"]:
        notes.append("no unit is aligned with the ROI: nothing was labelled")
    return record


def _deleted(backend: Backend, payload: dict) -> dict:
    annotations = payload.get("annotations") or []
    if not isinstance(annotations, list):
        raise RequestError("an ANNOTATIONS_DELETED event carries a list of annotations", code="bad_event")
    events = []
    for item in annotations:
        events.append(_insert(backend, {
            "annotation_id": _id(item), "task_id": None, "project_id": _id(payload.get("project")),
            "image_id": None, "action": DELETE_ACTION, "reader": None, "roi": None, "choices": None,
            "concept": None, "payload": json.dumps(payload, default=_lenient), "received_at": utc_now()}))
    return {"status": "ok", "event_ids": events, "action": DELETE_ACTION,
            "notes": ["labels that came from these annotations are kept (see the label history)"]}


def _lenient(value: Any) -> Any:
    """Raw events are stored whatever Label Studio sent: numpy values as JSON, anything else as text."""
    return json_default(value, lenient=True)


__all__ = ["handle_event", "submitted", "reader_of"]
