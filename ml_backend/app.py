"""The Label Studio ML backend: our own WSGI implementation of the backend HTTP contract.

Routes (JSON in, JSON out; see DESIGN.md "Label Studio ML backend contract"):

- ``GET /health`` -> ``{"status": "UP", "model_version": ...}``
- ``POST /setup`` -> ``{"model_version": ...}``
- ``GET /versions`` -> ``{"versions": [...]}``
- ``POST /predict`` ``{tasks, project, label_config, params: {context}}`` -> ``{"results": [...]}``, one
  prediction per task, in order. Without a context: the model's read of each task. With
  ``params.context.result`` holding the reader's ROI brush (interactive mode): the aligned units'
  masks and the report, and the query is recorded in the concept store.
- ``POST /webhook`` (Label Studio annotation events) -> persisted in ``ls_annotations``; a submitted
  concept labels the aligned (or kept) units (:mod:`ml_backend.webhook`).

Errors: a request the backend cannot answer gets a 4xx status whose reason phrase is the message
(Label Studio shows ``"<status> Client Error: <message> for url: ..."`` to the reader) and the body
``{"error": message, "code": short_name, "status": status}``; anything unexpected is a 500 with the
same body, logged with its traceback. No request can take the process down. In a batch ``/predict``,
a task that cannot be answered gets ``{"error": ..., "code": ...}`` in its place (Label Studio skips
entries without ``result``); when every task fails the whole request is an error.

The model, the dissection run and the concept store are loaded once per process (:class:`Backend`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ml_backend import label_configs as lc
from ml_backend import predictions as pr
from ml_backend import settings
from ml_backend.predictions import RequestError
from workspace.base.catalog import json_default
from workspace.base.config import Workspace
from workspace.base.errors import MammoError
from workspace.dissect.concepts import encode_roi
from workspace.dissect.reports import proposal_texts
from workspace.dissect.session import Lru, Session

log = logging.getLogger("mammo.ml_backend")

MAX_BODY_BYTES = 256 * 1024 * 1024
DEFAULT_TOP_UNITS = 5
AUTH_USER_ENV, AUTH_PASSWORD_ENV = settings.AUTH_USER[0], settings.AUTH_PASSWORD[0]   # what a child is given
RUN_ENV = "MAMMO_BACKEND_RUN"
MODEL_ENV = "MAMMO_BACKEND_MODEL"


def load_model_and_run(ws: Workspace, *, run_id: str | None = None, model_path: str | os.PathLike | None = None,
                       device: str | None = None):
    """The dissection run to answer with (``run_id``, else ``$MAMMO_BACKEND_RUN``, else the newest complete
    run) and its model, by :meth:`workspace.dissect.session.Session.open`'s rule (``model_path``, else
    ``$MAMMO_BACKEND_MODEL``, overrides the file and must have the run's digest)."""
    from workspace.dissect.dissect_run import run_or_newest

    run = run_or_newest(ws, run_id or os.environ.get(RUN_ENV))
    session = Session.open(ws, run=run, model=model_path or os.environ.get(MODEL_ENV) or None, device=device)
    return session.loaded, session.run


def model_version(loaded, run) -> str:
    """What Label Studio shows as the model version: architecture, model digest, dissection run."""
    return f"{loaded.architecture}-{loaded.digest[:8]}-{run.run_id}"


class Backend:
    """The model, its dissection run and the concept store of one workspace, loaded once.

    ``run_id``: the dissection run to answer with (default ``$MAMMO_BACKEND_RUN``, else the newest
    complete run); the model is that run's model (``model_path`` overrides, and must have the run's digest).
    """

    def __init__(self, ws: Workspace, *, run_id: str | None = None, model_path: str | os.PathLike | None = None,
                 top_units: int = DEFAULT_TOP_UNITS, device: str | None = None, loaded=None, run=None):
        self.ws = ws
        self.top_units = int(top_units)
        if loaded is None or run is None:
            loaded, run = load_model_and_run(ws, run_id=run_id, model_path=model_path, device=device)
        self.session = Session(ws=ws, loaded=loaded, run=run)
        self.loaded, self.run = loaded, run
        self.store = self.session.store
        self.thresholds = np.asarray(self.run.thresholds, dtype=np.float32)
        self.iou_threshold = self.session.iou_threshold
        self.model_version = model_version(self.loaded, self.run)
        self.card = self.loaded.card
        self._images = Lru(256)
        self._activations = Lru(64)
        self._warming: set[str] = set()
        self._warmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-masks")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-back")
        self._labelstudio: tuple[str, str] | None = settings.labelstudio()   # else what /setup sends
        self._emails: dict[int, str | None] = {}

    # -- pieces of state ---------------------------------------------------------------------
    def image_row(self, image_id: str) -> dict:
        from workspace.base.catalog import get_image, open_catalog

        def load() -> dict:
            db = open_catalog(self.ws)
            try:
                return get_image(db, image_id)
            finally:
                db.conn.close()

        return self._images.get(image_id, load)

    def read(self, image_id: str):
        """The model's read of an image (maps kept): the session's (memory, disk cache, or a forward pass)."""
        return self.session.read(image_id)

    def patch_masks(self, image_id: str, index: int):
        """The masks of patch ``index`` of the image's read: the same object the ROI queries and the
        background warm-up use, so a patch's masks are built once."""
        return self.image_masks(image_id).patch(int(index))

    def image_masks(self, image_id: str):
        """The query engine's per-patch masks of an image (the session's, shared with every query)."""
        return self.session.image_masks(image_id)

    def warm(self, image_id: str) -> None:
        """Build every patch's masks of an image in the background, so the reader's first ROIs are fast."""
        if image_id in self._warming:
            return
        self._warming.add(image_id)

        def work() -> None:
            from workspace.dissect.query import still_cached

            try:
                masks = self.image_masks(image_id)
                for p in range(len(masks.boxes)):
                    if not still_cached(masks):   # dropped for images asked since: no work for nothing
                        break
                    masks.patch(p)
                    masks.own_area(p)
            except Exception:  # noqa: BLE001 - a warm-up failure only costs speed; the request path reports errors
                log.warning("warming the masks of %s failed:\n%s", image_id, traceback.format_exc())
            finally:
                self._warming.discard(image_id)

        self._warmer.submit(work)

    def labels(self) -> dict:
        return self.store.labels(self.run.model_digest, self.run.layer)

    # -- /predict ----------------------------------------------------------------------------
    def predict(self, payload: dict) -> dict:
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise RequestError("the request has no tasks (expected {\"tasks\": [...], \"label_config\": ...})",
                               code="no_tasks")
        info = lc.parse_config(payload.get("label_config") or "")
        params = payload.get("params") or {}
        context = params.get("context") if isinstance(params, dict) else None
        if not all(isinstance(t, dict) and isinstance(t.get("data", {}), dict) for t in tasks):
            raise RequestError("every task must be an object with an object \"data\"", code="bad_task")
        if context:
            if not isinstance(context, dict):
                raise RequestError("params.context must be an object", code="bad_result")
            pr.check_results(context.get("result"), "params.context.result")
            if len(tasks) != 1:
                raise RequestError("an interactive request carries exactly one task", code="bad_request")
            return {"results": [self.interactive(tasks[0], info, context)], "model_version": self.model_version}
        results, errors = [], []
        for task in tasks:
            try:
                results.append(self.prediction(task, info))
            except (MammoError, ValueError, KeyError, IndexError) as error:
                failure = pr.as_request_error(error)
                errors.append(failure)
                results.append({"error": str(failure), "code": failure.code})
        if len(errors) == len(tasks):
            first = errors[0]
            more = f" (and {len(errors) - 1} more task(s) failed)" if len(errors) > 1 else ""
            raise RequestError(f"{first}{more}", status=first.status, code=first.code)
        return {"results": results, "model_version": self.model_version}

    def _task_image(self, task: Any) -> tuple[int | None, str, dict]:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise RequestError("a task must be an object with \"data\"", code="bad_task")
        image_id = task["data"].get("image_id")
        if not image_id:
            raise RequestError(f"task {task.get('id')} carries no image_id: it was not provisioned by "
                               "mammo-dissect (`mammo ls provision`)", status=404, code="unknown_task")
        try:
            row = self.image_row(str(image_id))
        except MammoError as error:
            raise RequestError(f"task {task.get('id')}: {error}", status=404, code="unknown_image") from None
        return task.get("id"), str(image_id), row

    def _patch_index(self, task: dict, read) -> int:
        box = task["data"].get("box")
        if not isinstance(box, list | tuple) or len(box) != 4:
            raise RequestError(f"task {task.get('id')} carries no patch box", code="bad_task")
        index = read.index_of(box)
        if index is None:
            raise RequestError(f"task {task.get('id')}: the model's read of {task['data'].get('image_id')} has "
                               f"no patch at {list(box)} (re-provision after a model change)",
                               status=404, code="unknown_patch")
        return index

    def prediction(self, task: dict, info: lc.ConfigInfo) -> dict:
        """The model's read of one task as a Label Studio prediction."""
        from workspace.dissect.dissection import max_activations

        task_id, image_id, row = self._task_image(task)
        read = self.read(image_id)
        labels = self.labels()
        width, height = int(row["cols"]), int(row["rows"])
        boxes = np.asarray(read.boxes)
        scores = np.asarray(read.scores, dtype=np.float64)
        op = self.loaded.operating_point
        result: list[dict] = []
        caveat = " (image outside the model's training domain)" if read.domain and read.domain.outside else ""
        if info.kind == lc.SCREENING:
            suspicious = [int(i) for i in np.asarray(read.suspicious).ravel()]
            for i in suspicious:
                result.append(pr.rectangle(boxes[i], width, height, label=lc.SUSPICIOUS_LABEL, to_name="image",
                                           score=scores[i], rid=f"p{i}-{pr.region_id(image_id, i)[:6]}",
                                           text=f"{self.loaded.score_label} = {scores[i]:.2f}{caveat}"))
            result.append(pr.assessment(float(read.image_score), op, to_name="image",
                                        choices=info.labels["assessment"]))
            index = int(np.argmax(scores)) if len(scores) else None
            score = float(read.image_score)
            offset, size_wh = (boxes[index][:2] if index is not None else None), (width, height)
        else:
            index = self._patch_index(task, read)
            result.append(pr.assessment(float(scores[index]), op, to_name=info.image_name,
                                        choices=info.labels["assessment"]))
            score = float(scores[index])
            offset, size_wh = np.array([0, 0]), (int(boxes[index][2]), int(boxes[index][3]))
        maps = None if read.maps is None else read.maps
        if index is not None and maps is not None and len(maps):
            acts = max_activations(np.asarray(maps[index], dtype=np.float32))
            unit = int(np.argmax(acts))
            mask = self.unit_mask_on(image_id, index, unit, offset, size_wh)
            concept = labels.get(unit)
            result.append(pr.brush(mask, label=lc.MOST_ACTIVATED_LABEL, to_name=info.image_name,
                                   score=float(acts[unit]), rid=pr.unit_region_id(unit, image_id, index, "act"),
                                   text=pr.unit_text(unit, concept=concept.name if concept else None,
                                                     activation=float(acts[unit]))))
            report = self.report(image_id, maps=maps[[index]] if info.kind == lc.PATCH_REVIEW else maps,
                                 labels=labels, patch_box=boxes[index] if info.kind == lc.PATCH_REVIEW else None)
            result.append(pr.text_area(report.to_text(), to_name=info.image_name))
        if info.kind == lc.SCREENING:
            self.warm(image_id)
        return {"result": result, "score": score, "model_version": self.model_version}

    def unit_mask_on(self, image_id: str, index: int, unit: int, offset, size_wh) -> np.ndarray:
        """Unit ``unit``'s mask on patch ``index``, placed at ``offset`` in an image of ``size_wh``."""
        patch = self.patch_masks(image_id, index).mask(unit)
        width, height = size_wh
        out = np.zeros((height, width), dtype=bool)
        x, y = int(offset[0]), int(offset[1])
        h = min(patch.shape[0], height - y)
        w = min(patch.shape[1], width - x)
        if h > 0 and w > 0:
            out[y:y + h, x:x + w] = patch[:h, :w]
        return out

    def report(self, image_id: str, *, maps, labels, iou=None, aligned=None, patch_box=None, query_id=None,
               roi=None, proposals=None):
        """The report of an image or patch; ``proposals`` (``reports.proposal_texts``) when the caller has them."""
        from workspace.dissect.dissection import max_activations
        from workspace.dissect.reports import build_report, concept_groups, proposal_texts

        key = (image_id, None if patch_box is None else tuple(int(v) for v in patch_box))
        acts = self._activations.get(key, lambda: max_activations(np.asarray(maps, dtype=np.float32)).max(axis=0))
        try:  # what silencing each concept does to the score: cached on the read, so only new unit sets cost
            changes = self.session.score_changes(image_id, concept_groups(labels), patch_box=patch_box) if labels else None
        except MammoError as error:
            log.warning("no score changes for %s: %s", image_id, error)
            changes = None
        return build_report(acts, self.thresholds, labels, iou=iou, aligned=aligned,
                            iou_threshold=self.iou_threshold, image_id=image_id, patch_box=patch_box,
                            model_digest=self.run.model_digest, layer=self.run.layer, run_id=self.run.run_id,
                            query_id=query_id, roi=roi, read=self.read(image_id), card=self.card,
                            labelled_by=self.store.labellers(self.run.model_digest, self.run.layer),
                            proposals=proposal_texts(self.store, self.run.model_digest, self.run.layer)
                            if proposals is None else proposals,
                            score_changes=changes)

    # -- interactive ROI ---------------------------------------------------------------------
    def query(self, task: dict, info: lc.ConfigInfo, results: list | None) -> dict:
        """Answer an ROI: ``{"image_id", "roi" (mask), "iou" (units,), "ranking", "aligned", "masks"
        (callable unit -> full-size mask of the displayed image), "patch_box", "index"}``."""
        task_id, image_id, row = self._task_image(task)
        if info.kind == lc.SCREENING:
            width, height = int(row["cols"]), int(row["rows"])
            roi = pr.roi_mask(results, width, height)
            answer = self.session.query(image_id, roi)
            self.warm(image_id)
            iou = np.asarray(answer.iou, dtype=np.float64)
            return {"image_id": image_id, "roi": roi, "iou": iou, "ranking": [int(u) for u in answer.ranking],
                    "aligned": [int(u) for u in answer.aligned], "mask": answer.mask_of, "patch_box": None,
                    "index": None, "answer": answer}
        read = self.read(image_id)
        index = self._patch_index(task, read)
        box = [int(v) for v in np.asarray(read.boxes)[index]]
        roi = pr.roi_mask(results, box[2], box[3])
        patch_masks = self.patch_masks(image_id, index)
        answer = self.session.query_patch(image_id, index, roi)
        return {"image_id": image_id, "roi": roi, "iou": np.asarray(answer.iou, dtype=np.float64),
                "ranking": [int(u) for u in answer.ranking], "aligned": [int(u) for u in answer.aligned],
                "mask": patch_masks.mask, "patch_box": box, "index": index, "answer": answer}

    def interactive(self, task: dict, info: lc.ConfigInfo, context: dict, *, asked_by: str = "labelstudio",
                    query_id: int | None = None) -> dict:
        """The aligned units' masks (top ``top_units``, the most aligned first) and the report. The question
        is recorded, unless ``query_id`` names its record already (the webhook records it)."""
        results = pr.asked_rois(context.get("result") if isinstance(context, dict) else None)
        q = self.query(task, info, results)
        labels = self.labels()
        roi_geometry = encode_roi(q["roi"])
        if query_id is None:
            query_id = self.store.record_query(
                self.run.model_digest, self.run.layer, roi=roi_geometry, ranking=q["iou"], aligned=q["aligned"],
                iou_threshold=self.iou_threshold, asked_by=asked_by, source="labelstudio", image_id=q["image_id"],
                patch_box=q["patch_box"], run_id=self.run.run_id)
        aligned = set(q["aligned"])
        shown = [u for u in q["ranking"] if u in aligned][: self.top_units]
        if not shown and q["ranking"]:
            shown = q["ranking"][:1]  # nothing aligned: still show the best match, labelled as such
        result = pr.echo_rois(results, query_id)  # the drawn box, kept in the annotation (see echo_rois)
        proposed = proposal_texts(self.store, self.run.model_digest, self.run.layer)   # regions and report
        for rank, unit in enumerate(shown):
            concept = labels.get(unit)
            label = lc.MOST_ALIGNED_LABEL if rank == 0 else lc.ALIGNED_LABEL
            result.append(pr.brush(q["mask"](unit), label=label, to_name=info.image_name,
                                   score=float(q["iou"][unit]),
                                   rid=pr.unit_region_id(unit, q["image_id"], q["patch_box"]),  # re-asked: replaced
                                   text=pr.unit_text(unit, iou=float(q["iou"][unit]),
                                                     concept=concept.name if concept else None,
                                                     proposed=proposed.get(unit))))
        read = self.read(q["image_id"])
        maps = read.maps if q["index"] is None else read.maps[[q["index"]]]
        report = self.report(q["image_id"], maps=maps, labels=labels, iou=q["iou"], aligned=q["aligned"],
                             patch_box=q["patch_box"], query_id=query_id, roi=roi_geometry, proposals=proposed)
        result.append(pr.text_area(report.to_text(), to_name=info.image_name))
        best = float(q["iou"][shown[0]]) if shown else 0.0
        return {"result": result, "score": best, "model_version": self.model_version,
                "query_id": query_id, "ranking": [[u, float(q["iou"][u])] for u in q["ranking"][:32]],
                "aligned": q["aligned"]}

    # -- /webhook ----------------------------------------------------------------------------
    def write_back(self, task: dict, info: lc.ConfigInfo, regions: list[dict], *, asked_by: str,
                   query_id: int) -> Any:
        """Answer brush ROIs of a submitted annotation exactly as a live box is answered, and put the answer on
        the task as a prediction through the SDK (Label Studio never sends a brush stroke to an interactive
        backend), so the aligned units and the report are there when the reader reopens the task. The
        prediction is posted from a background thread (Label Studio may be waiting for this webhook's answer);
        returns its future, or None when the backend does not know Label Studio's URL and token."""
        if self._labelstudio is None:
            return None
        answer = self.interactive(task, info, {"result": regions}, asked_by=asked_by, query_id=query_id)
        url, token = self._labelstudio

        def post() -> int:
            from ml_backend.labelstudio import sdk_client

            prediction = sdk_client(url, token, 60.0).predictions.create(
                task=int(task["id"]), result=answer["result"], score=answer["score"],
                model_version=self.model_version)
            return int(prediction.id)

        def logged(future: Any) -> None:
            if future.exception() is not None:
                log.warning("the answer to task %s's brush ROI was not written back: %s", task.get("id"),
                            future.exception())

        future = self._writer.submit(post)
        future.add_done_callback(logged)
        return future

    def remember_labelstudio(self, hostname: str | None, token: str | None) -> None:
        """Label Studio's URL and a token, as ``/setup`` sends them (to name readers by email and write answers
        back), unless the environment gave them: /setup's token is a legacy one (``ml_backend.settings``)."""
        if hostname and token and settings.labelstudio() is None:
            self._labelstudio = (str(hostname).rstrip("/"), str(token))

    def reader_email(self, user_id: int) -> str | None:
        """The email of a Label Studio user id (asked once, through the API), or None."""
        if user_id in self._emails:
            return self._emails[user_id]
        if self._labelstudio is None:
            return None
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        from ml_backend.labelstudio import sdk_client

        url, token = self._labelstudio
        try:
            email = getattr(sdk_client(url, token, 5.0).users.get(id=int(user_id)), "email", None) or None
        except (ApiError, httpx.HTTPError, OSError, ValueError):
            return None
        self._emails[user_id] = email
        return email

    def webhook(self, payload: dict) -> dict:
        from ml_backend.webhook import handle_event

        return handle_event(self, payload)


# ------------------------------------------------------------------------------------------ WSGI
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 422: "Unprocessable Entity", 500: "Internal Server Error"}


def _status_line(status: int, message: str | None = None) -> str:
    """``"400 <message>"``: the reason phrase carries the message (one latin-1 line), so Label Studio,
    which shows the HTTP error string, shows the reason to the reader."""
    reason = message or _REASONS.get(status, "Error")
    reason = " ".join(reason.split()).encode("latin-1", "replace").decode("latin-1")[:300]
    return f"{status} {reason}"


class BackendApp:
    """The WSGI callable. ``backend`` may be given, or made on first use from ``ws`` (so gunicorn
    workers load the model after forking). ``auth``: ``(user, password)`` for HTTP basic auth."""

    def __init__(self, ws: Workspace | None = None, *, backend: Backend | None = None,
                 auth: tuple[str, str] | None = None, backend_kwargs: dict | None = None):
        self.ws = ws
        self._backend = backend
        self._backend_kwargs = backend_kwargs or {}
        self._lock = threading.Lock()
        self.auth = auth

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = Backend(self.ws or Workspace.open(), **self._backend_kwargs)
        return self._backend

    def _authorised(self, environ: dict) -> bool:
        if not self.auth:
            return True
        header = environ.get("HTTP_AUTHORIZATION", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(user, self.auth[0]) & hmac.compare_digest(password, self.auth[1])

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/").rstrip("/") or "/"
        try:
            if not self._authorised(environ):
                raise RequestError("authentication required", status=401, code="unauthorised")
            status, body = self.route(method, path, environ)
            line = _status_line(status)
        except RequestError as error:
            status, body = error.status, {"error": str(error), "code": error.code, "status": error.status}
            line = _status_line(status, str(error))
            log.info("%s %s -> %s %s", method, path, status, error)
        except MammoError as error:
            failure = pr.as_request_error(error)
            status, body = failure.status, {"error": str(failure), "code": failure.code, "status": failure.status}
            line = _status_line(status, str(failure))
            log.info("%s %s -> %s %s", method, path, status, failure)
        except Exception as error:  # noqa: BLE001 - the service must answer and stay up
            log.error("%s %s failed:\n%s", method, path, traceback.format_exc())
            message = f"internal error in the mammo-dissect backend: {type(error).__name__}: {error}"
            status, body = 500, {"error": message, "code": "internal", "status": 500}
            line = _status_line(500, message)
        data = json.dumps(body, allow_nan=False, default=json_default).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        if status == 401:
            headers.append(("WWW-Authenticate", 'Basic realm="mammo-dissect"'))
        log.debug("%s %s %d in %.1f ms", method, path, status, 1000 * (time.perf_counter() - started))
        start_response(line, headers)
        return [data]

    def route(self, method: str, path: str, environ: dict) -> tuple[int, dict]:
        if path in ("/", "/health"):
            if method != "GET":
                raise RequestError(f"{path} answers GET", status=405, code="method")
            return 200, {"status": "UP", "model_class": "mammo-dissect", "model_version": self.backend.model_version}
        if path == "/versions":
            return 200, {"versions": [self.backend.model_version]}
        handlers = {"/setup": self._setup, "/predict": self.backend_predict, "/webhook": self._webhook}
        if path not in handlers:
            raise RequestError(f"no route {path}: the backend answers /health, /setup, /predict, /webhook",
                               status=404, code="no_route")
        if method != "POST":
            raise RequestError(f"{path} answers POST", status=405, code="method")
        payload = _read_json(environ)
        try:
            return 200, handlers[path](payload)
        except (AttributeError, TypeError) as error:
            # a field of another type than Label Studio sends, deep in the payload: the request's fault
            log.warning("%s: a request of an unexpected shape:\n%s", path, traceback.format_exc())
            raise RequestError(f"the request does not have the shape Label Studio sends ({type(error).__name__}: "
                               f"{error})", code="bad_shape") from None

    def _setup(self, payload: dict) -> dict:
        self.backend.remember_labelstudio(payload.get("hostname"), payload.get("access_token"))
        return {"model_version": self.backend.model_version}

    def backend_predict(self, payload: dict) -> dict:
        return self.backend.predict(payload)

    def _webhook(self, payload: dict) -> dict:
        return self.backend.webhook(payload)


def _read_json(environ: dict) -> dict:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > MAX_BODY_BYTES:
        raise RequestError(f"request body of {length} bytes is larger than {MAX_BODY_BYTES}", status=413,
                           code="too_large")
    raw = environ["wsgi.input"].read(length) if length else b""
    if not raw:
        raise RequestError("empty request body: expected a JSON object", code="bad_json")
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(f"the request body is not JSON ({error})", code="bad_json") from None
    except RecursionError:
        payload = None
    if payload is not None and not isinstance(payload, dict):
        raise RequestError("the request body must be a JSON object", code="bad_json")
    if payload is None or _too_deep(payload, MAX_DEPTH):
        raise RequestError(f"the request body is nested more than {MAX_DEPTH} levels deep (a Label Studio "
                           "request is a few levels)", code="bad_json")
    return payload


MAX_DEPTH = 64


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) nests lists and objects more than ``limit`` levels (no recursion)."""
    level = [value]
    for _ in range(limit + 1):
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ())
                 if isinstance(v, (dict, list))]
        if not level:
            return False
    return True


def auth_from_env() -> tuple[str, str] | None:
    """The basic-auth login from the environment (:func:`ml_backend.settings.auth`: ``BASIC_AUTH_USER`` /
    ``BASIC_AUTH_PASS`` or ours, or a password file); None unless both are set."""
    return settings.auth()


def create_app(workspace: str | os.PathLike | None = None) -> BackendApp:
    """The app for gunicorn (``ml_backend.app:create_app()``): workspace from the argument or
    ``$MAMMO_WORKSPACE``; basic auth, Label Studio's URL and token, and the log level from the environment
    (:mod:`ml_backend.settings`)."""
    logging.getLogger("mammo").setLevel(settings.log_level())
    app = BackendApp(Workspace.open(workspace), auth=auth_from_env())
    app.backend  # load the model and the run before the first request  # noqa: B018
    return app


__all__ = ["Backend", "BackendApp", "create_app", "RequestError", "load_model_and_run", "model_version"]
