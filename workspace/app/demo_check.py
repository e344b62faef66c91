"""``mammo demo --check``: bring the whole demo up, walk one read through it once, stop everything.

The steps, each printed as one ``OK`` / ``FAIL`` line with its numbers:

1. ``stack``      Label Studio, the ML backend and the projects (:func:`ml_backend.stack.bring_up`).
2. ``fiftyone``   mongod, the datasets synced from the newest run, the App answering
                  (:func:`fiftyone_plugins.launch.start_fiftyone`).
3. ``prediction`` the most suspicious mammogram's Screening task: its predictions are deleted, then
                  retrieved again through Label Studio (which asks the backend): rectangles for the
                  read's suspicious patches, the assessment choice, the image score, the report.
4. ``roi query``  an ROI drawn on the most suspicious patch (over the ground-truth lesion where there
                  is one) sent to Label Studio's interactive endpoint; the aligned units it returns
                  must equal :func:`workspace.dissect.query.query_image` on the same ROI.
5. ``group label`` two of those units labelled with the concept ``demo-check`` through the plugin's
                  ``label_units`` operator on the real FiftyOne database; the store and the neurons
                  dataset must both show it.
6. ``report``     :func:`workspace.dissect.reports.report_for_image` for the same ROI names ``demo-check`` with
                  both units, and so does the report text of the ROI asked again through Label Studio.
7. ``cleanup``    the ``demo-check`` labels are removed (units that carried another concept before
                  get it back) and the FiftyOne dataset is refreshed, so a later real demo starts
                  from the seeded labels only. The label history keeps every step (``by = demo-check``).

Every process started here is stopped by PID at the end, on failure and on Ctrl-C.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CHECK_CONCEPT = "demo-check"
CHECK_ACTOR = "demo-check"
CHECK_DESCRIPTION = ("Made by `mammo demo --check` to exercise the reading workflow; its labels are "
                     "removed when the check ends (the history keeps them).")


class CheckFailed(Exception):
    """One check's failure (the message is printed on its FAIL line)."""


@dataclass
class CheckLine:
    name: str
    ok: bool
    detail: str
    seconds: float

    def __str__(self) -> str:
        return f"[check] {'OK  ' if self.ok else 'FAIL'} {self.name:<12} {self.detail} ({self.seconds:.1f} s)"


@dataclass
class Checks:
    """The lines printed so far; :meth:`step` runs one check and records its line."""

    lines: list[CheckLine] = field(default_factory=list)
    echo: Callable[[str], None] = print

    def step(self, name: str, work: Callable[[], str]) -> bool:
        started = time.perf_counter()
        try:
            detail, ok = work(), True
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001 - every failure becomes one FAIL line, the rest goes on
            detail, ok = f"{type(error).__name__}: {error}" if not isinstance(error, CheckFailed) else str(error), False
        line = CheckLine(name, ok, detail, time.perf_counter() - started)
        self.lines.append(line)
        self.echo(str(line))
        return ok

    def skip(self, name: str, why: str) -> None:
        line = CheckLine(name, False, f"not run: {why}", 0.0)
        self.lines.append(line)
        self.echo(str(line))

    @property
    def ok(self) -> bool:
        return bool(self.lines) and all(line.ok for line in self.lines)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ------------------------------------------------------------------------------------- Label Studio
def ls_request(server: Any, method: str, path: str, *, params: dict | None = None, json: Any = None) -> Any:
    """One Label Studio API call through the SDK client's own HTTP client (so a legacy token and a personal
    access token authenticate alike; the SDK has no typed call for some of these endpoints); a non-2xx answer
    is a :class:`CheckFailed`."""
    http = server.client()._client_wrapper.httpx_client   # the SDK's transport, with its authentication
    response = http.request(path.lstrip("/"), method=method, params=params, json=json,
                            request_options={"timeout_in_seconds": 300})
    if response.status_code >= 300:
        raise CheckFailed(f"Label Studio {method} {path}: HTTP {response.status_code} {response.text[:300]}")
    return response.json() if response.content else None


def task_of_image(server: Any, project_id: int, image_id: str) -> dict:
    """The task of ``image_id`` in a Screening project."""
    page = 1
    while True:
        answer = ls_request(server, "GET", "/api/tasks", params={"project": project_id, "page": page,
                                                                 "page_size": 200, "fields": "task_only"})
        tasks = answer["tasks"] if isinstance(answer, dict) else answer
        for task in tasks:
            if (task.get("data") or {}).get("image_id") == image_id:
                return task
        if len(tasks) < 200:
            raise CheckFailed(f"project {project_id} has no task for image {image_id} (provisioning?)")
        page += 1


def retrieve_prediction(server: Any, project_id: int, task_id: int) -> dict:
    """Delete the task's predictions, ask Label Studio to retrieve them from the backend, return the new one."""
    selected = {"all": False, "included": [int(task_id)]}
    old = {p["id"] for p in ls_request(server, "GET", f"/api/tasks/{int(task_id)}").get("predictions") or []}
    for action in ("delete_tasks_predictions", "retrieve_tasks_predictions"):
        ls_request(server, "POST", "/api/dm/actions", params={"id": action, "project": project_id},
                   json={"selectedItems": selected})
    predictions = ls_request(server, "GET", f"/api/tasks/{int(task_id)}").get("predictions") or []
    _expect(len(predictions) == 1 and predictions[0]["id"] not in old,
            f"Label Studio holds {len(predictions)} prediction(s) for task {task_id} after retrieving, "
            f"{sum(p['id'] in old for p in predictions)} of them old (is the backend reachable from Label Studio?)")
    return predictions[0]


def ask_roi(server: Any, ml_backend_id: int, task_id: int, roi: np.ndarray, *, region_id: str = "check") -> dict:
    """An ROI (bool mask of the displayed image) sent as a brush region to Label Studio's interactive
    endpoint, which forwards it to the backend; returns the backend's answer (``result``, ``aligned``,
    ``ranking``, ``query_id``...)."""
    from ml_backend import label_configs as lc
    from ml_backend import predictions as pr

    region = pr.brush(roi, label=lc.ROI_LABEL, to_name="image", from_name="roi", rid=region_id)
    answer = ls_request(server, "POST", f"/api/ml/{int(ml_backend_id)}/interactive-annotating",
                        json={"task": int(task_id), "context": {"result": [region]}})
    if answer.get("errors"):
        raise CheckFailed(f"the interactive ROI came back with errors: {answer['errors']}")
    return answer.get("data") or {}


def report_text(answer: dict) -> str:
    """The report TextArea of a backend answer (a prediction or an interactive one)."""
    return "\n".join(t for r in answer.get("result") or [] if r.get("type") == "textarea"
                     for t in (r.get("value") or {}).get("text") or [])


# ------------------------------------------------------------------------------------------ choices
def lesion_boxes(ws: Any, image_id: str) -> list[tuple[int, int, int, int]]:
    """Ground-truth lesion boxes [x, y, w, h] of an image in normalised orientation."""
    from workspace.base.catalog import get_image, lesions_of, open_catalog
    from workspace.data import dicom_io

    db = open_catalog(ws)
    image = get_image(db, image_id)
    boxes = []
    for lesion in lesions_of(db, image_id):
        geometry = lesion["geometry"]
        box = geometry.get("bbox") if isinstance(geometry, dict) else None
        if lesion["source"] == "ground_truth" and box and (lesion.get("pathology") or "") != "benign":
            x, y, w, h = dicom_io.to_normalised("box", box, image)
            boxes.append((int(round(x)), int(round(y)), int(round(w)), int(round(h))))
    return boxes


def roi_on_patch(shape: tuple[int, int], patch_box, lesions: list) -> tuple[np.ndarray, str]:
    """An ROI inside ``patch_box``: the part of a ground-truth lesion inside it, else the patch's centre
    half. Returns the mask (rows, cols) and what it covers."""
    x, y, w, h = (int(v) for v in patch_box)
    roi = np.zeros(shape, dtype=bool)
    for lx, ly, lw, lh in lesions:
        x0, y0, x1, y1 = max(x, lx), max(y, ly), min(x + w, lx + lw), min(y + h, ly + lh)
        if x1 - x0 >= 8 and y1 - y0 >= 8:
            roi[y0:y1, x0:x1] = True
            return roi, f"lesion box [{x0}, {y0}, {x1 - x0}, {y1 - y0}]"
    roi[y + h // 4:y + 3 * h // 4, x + w // 4:x + 3 * w // 4] = True
    return roi, f"centre of patch [{x}, {y}, {w}, {h}]"


def most_suspicious_image(ws: Any, image_ids: list[str], loaded: Any) -> tuple[str, Any]:
    """The image with the highest image score (then the most suspicious patches), from the catalog's
    ``image_reads`` that ``prepare`` filled, and its (cached) read."""
    from models.inference import read_mammogram
    from workspace.base.catalog import open_catalog

    wanted = set(image_ids)
    rows = open_catalog(ws).execute(
        "SELECT image_id FROM image_reads WHERE model_digest = ? AND n_patches > 0 "
        "ORDER BY score DESC, n_suspicious DESC, image_id", [loaded.digest]).fetchall()
    for (image_id,) in rows:
        if image_id in wanted:
            return image_id, read_mammogram(ws, image_id, loaded, keep_maps=False)
    raise CheckFailed("no mammogram of the demo has a read with patches")


def units_to_label(aligned: list[int], ranking: list[int], labelled: dict) -> list[int]:
    """Two units for the group label: aligned and unlabelled first, then aligned, then the best ranked."""
    order = [u for u in aligned if u not in labelled] + [u for u in aligned if u in labelled]
    order += [u for u in ranking if u not in order]
    return order[:2]


# ----------------------------------------------------------------------------------------- the run
@dataclass
class _Read:
    image_id: str = ""
    task: dict | None = None
    roi: np.ndarray | None = None
    roi_what: str = ""
    aligned: list[int] = field(default_factory=list)
    ranking: list[int] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    before: dict = field(default_factory=dict)     # unit -> concept name it carried before the check


def run_checks(state: Any, args: Any = None, *, fiftyone_app: bool | None = None,
               echo: Callable[[str], None] = print) -> int:
    """Bring the demo of ``state`` (a :class:`workspace.app.demo.DemoState`) up, exercise each step once,
    stop everything; 0 when every check passed, 1 otherwise, 130 on Ctrl-C.

    ``args``: the command's service options (ports, an existing Label Studio...); ``fiftyone_app``:
    start the App too and check it answers (default: unless ``--no-fiftyone``; FiftyOne's database
    and the operators are checked either way).
    """
    from ml_backend import label_configs as lc
    from ml_backend.stack import bring_up, describe
    from workspace.app.commands.up import stack_options

    ws, loaded, run = state.ws, state.loaded, state.run
    if fiftyone_app is None:
        fiftyone_app = not getattr(args, "no_fiftyone", False)
    checks = Checks(echo=echo)
    services: list = []
    stack = None
    read = _Read()
    started = time.perf_counter()
    try:
        _remove_check_labels(ws, run)   # a check interrupted before its clean-up left some

        def up_stack() -> str:
            nonlocal stack
            stack = bring_up(ws, **stack_options(args))
            services.extend(stack.services)
            echo(describe(stack))
            projects = stack.provisioned.projects if stack.provisioned else {}
            _expect(lc.SCREENING in projects, "the Screening project was not provisioned")
            return (f"Label Studio {stack.server.url}, backend {stack.backend.url}, "
                    + ", ".join(f"{p.title} {p.tasks_total} tasks" for p in projects.values()))

        if not checks.step("stack", up_stack):
            return _finish(checks, services, started, echo)

        fo_services: list = []

        def up_fiftyone() -> str:
            from fiftyone_plugins.launch import start_fiftyone, start_mongod, sync_in_child

            if fiftyone_app:
                fo_services.extend(start_fiftyone(ws))
            else:
                mongod = start_mongod(ws)
                fo_services.append(mongod)
                _expect(sync_in_child(ws, mongod.url) == 0, "`mammo fiftyone sync` failed")
            services.extend(fo_services)
            return ", ".join(f"{s.name} {s.url}" for s in fo_services) + (" (App answers)" if fiftyone_app else "")

        fiftyone_ok = checks.step("fiftyone", up_fiftyone)
        screening = stack.provisioned.projects[lc.SCREENING]

        def prediction() -> str:
            image_id, image_read = most_suspicious_image(ws, state.image_ids, loaded)
            read.image_id = image_id
            read.task = task_of_image(stack.server, screening.project_id, image_id)
            t0 = time.perf_counter()
            answer = retrieve_prediction(stack.server, screening.project_id, read.task["id"])
            seconds = time.perf_counter() - t0
            results = answer.get("result") or []
            rects = [r for r in results if r.get("type") == "rectanglelabels"]
            choices = [r["value"]["choices"][0] for r in results if r.get("type") == "choices"]
            brushes = [r for r in results if r.get("type") == "brushlabels"]
            _expect(len(rects) == len(image_read.suspicious),
                    f"{len(rects)} rectangles for {len(image_read.suspicious)} suspicious patches of {image_id}")
            _expect(len(rects) > 0, f"the model calls no patch of {image_id} (its most suspicious image) suspicious")
            _expect(len(choices) == 1, f"expected one assessment choice, got {choices}")
            score = answer.get("score")
            _expect(score is not None and abs(float(score) - float(image_read.image_score)) < 1e-4,
                    f"prediction score {score} != the read's image score {image_read.image_score:.4f}")
            _expect(len(brushes) == 1 and report_text(answer), "no most-activated unit mask or no report text")
            return (f"task {read.task['id']} ({image_id}): {len(rects)} suspicious-patch rectangles, "
                    f"assessment {choices[0]!r}, score {float(score):.3f}, unit mask + report; "
                    f"retrieved through Label Studio in {seconds:.1f} s")

        prediction_ok = checks.step("prediction", prediction)

        def roi_query() -> str:
            from models.inference import read_mammogram
            from workspace.base.catalog import get_image, open_catalog
            from workspace.dissect.query import query_image

            image_read = read_mammogram(ws, read.image_id, loaded, keep_maps=False)
            row = get_image(open_catalog(ws), read.image_id)
            box = image_read.boxes[int(np.argmax(image_read.scores))]
            read.roi, read.roi_what = roi_on_patch((int(row["rows"]), int(row["cols"])), box,
                                                   lesion_boxes(ws, read.image_id))
            t0 = time.perf_counter()
            answer = ask_roi(stack.server, screening.ml_backend_id, read.task["id"], read.roi)
            seconds = time.perf_counter() - t0
            read.aligned = [int(u) for u in answer.get("aligned") or []]
            read.ranking = [int(u) for u, _iou in answer.get("ranking") or []]
            shown = [r for r in answer.get("result") or [] if r.get("type") == "brushlabels"]
            _expect(read.ranking and shown, "the answer holds no unit ranking or no unit mask")
            expected = query_image(ws, read.image_id, read.roi, loaded, run)
            _expect(sorted(int(u) for u in expected.aligned) == sorted(read.aligned),
                    f"aligned units {read.aligned} != workspace.dissect.query's {list(map(int, expected.aligned))}")
            _expect([int(u) for u in expected.ranking[:len(read.ranking)]] == read.ranking,
                    "the unit ranking differs from workspace.dissect.query's")
            best = max((iou for _u, iou in answer.get("ranking") or []), default=0.0)
            return (f"ROI over the {read.roi_what} ({int(read.roi.sum())} px): {len(read.aligned)} aligned units "
                    f"(IoU >= {expected.iou_threshold:g}), best IoU {best:.2f}, {len(shown)} unit masks shown, "
                    f"= workspace.dissect.query; answered through Label Studio in {seconds:.1f} s")

        roi_ok = prediction_ok and checks.step("roi query", roi_query)
        if not prediction_ok:
            checks.skip("roi query", "no prediction")

        def group_label() -> str:
            from workspace.dissect.concepts import ConceptStore

            with ConceptStore(ws) as store:
                labelled = store.labels(run.model_digest, run.layer)
            read.units = units_to_label(read.aligned, read.ranking, labelled)
            read.before = {u: labelled[u].name for u in read.units if u in labelled}
            _expect(len(read.units) == 2, f"fewer than two units to label ({read.units})")
            mongod = next(s for s in fo_services if s.name == "mongod")
            changed, dataset_labels = _label_through_operator(ws, mongod.url, read.units)
            with ConceptStore(ws) as store:
                now = store.labels(run.model_digest, run.layer)
            _expect(changed == 2, f"the operator changed {changed} labels, expected 2")
            _expect(all(now.get(u) is not None and now[u].name == CHECK_CONCEPT for u in read.units),
                    f"the store does not show units {read.units} as {CHECK_CONCEPT!r}")
            _expect(dataset_labels == [CHECK_CONCEPT] * 2,
                    f"the neurons dataset shows {dataset_labels} for units {read.units}")
            n_aligned = sum(u in read.aligned for u in read.units)
            return (f"units {read.units} ({n_aligned} of them aligned) labelled {CHECK_CONCEPT!r} through "
                    f"@mammo/dissect/label_units on {mongod.url}; store and neurons dataset agree")

        label_ok = roi_ok and fiftyone_ok and checks.step("group label", group_label)
        if not (roi_ok and fiftyone_ok):
            checks.skip("group label", "no ROI answer" if not roi_ok else "FiftyOne is not up")

        def report() -> str:
            from workspace.dissect.reports import report_for_image

            made = report_for_image(ws, read.image_id, read.roi, run=run, loaded=loaded)
            names = [c.name for c in made.concepts]
            _expect(CHECK_CONCEPT in names, f"the report names {names}, not {CHECK_CONCEPT!r}")
            score = made.concept(CHECK_CONCEPT)
            _expect(sorted(score.units) == sorted(read.units), f"the report's {CHECK_CONCEPT!r} units are "
                                                               f"{score.units}, not {read.units}")
            path = made.save(ws.reports_dir / f"demo-check-{read.image_id}.html")
            answer = ask_roi(stack.server, screening.ml_backend_id, read.task["id"], read.roi, region_id="check2")
            text = report_text(answer)
            _expect(CHECK_CONCEPT in text, f"Label Studio's report text does not name {CHECK_CONCEPT!r}:\n{text}")
            value = f"{score.mean_normalised:.2f}xT" if score.mean_normalised is not None else "n/a"
            iou = f"{score.mean_iou:.2f}" if score.mean_iou is not None else "n/a"
            return (f"{CHECK_CONCEPT!r}: {score.n_units} units, mean max activation {value}, ROI IoU {iou}, "
                    f"{score.n_aligned} aligned; {len(names)} concepts in the report ({path.name}); "
                    f"Label Studio's report text names it")

        if label_ok:
            checks.step("report", report)
        else:
            checks.skip("report", "no group label")
    except KeyboardInterrupt:
        echo("[check] interrupted: removing the check's labels and stopping everything")
        try:
            _cleanup(ws, run, read, services, None, echo)
        except Exception as error:  # noqa: BLE001 - stopping the processes matters more
            echo(f"[check] clean-up failed: {error}")
        _stop(services)
        return 130
    except BaseException:
        _stop(services)
        raise
    mongod_url = next((s.url for s in services if s.name == "mongod" and s.alive()), None)
    checks.step("cleanup", lambda: _cleanup(ws, run, read, services, mongod_url, echo))
    return _finish(checks, services, started, echo)


def _label_through_operator(ws: Any, db_uri: str, units: list[int]) -> tuple[int, list]:
    """``@mammo/dissect/label_units`` on the workspace's patches dataset, as the App runs it."""
    from fiftyone_plugins import dataset_names, operator_uri
    from fiftyone_plugins.launch import connect_here

    connect_here(ws, db_uri)
    import fiftyone as fo
    import fiftyone.operators as foo
    from fiftyone import ViewField as F

    patches_name, neurons_name = dataset_names()
    _expect(fo.dataset_exists(patches_name), f"no FiftyOne dataset {patches_name!r} (the sync failed?)")
    previous = os.environ.get("MAMMO_USER")
    os.environ["MAMMO_USER"] = CHECK_ACTOR   # who the operator records as the labeller
    try:
        result = foo.execute_operator(operator_uri("label_units"), dataset=fo.load_dataset(patches_name),
                                      params={"units": ",".join(map(str, units)), "concept": CHECK_CONCEPT})
    finally:
        if previous is None:
            os.environ.pop("MAMMO_USER", None)
        else:
            os.environ["MAMMO_USER"] = previous
    neurons = fo.load_dataset(neurons_name)
    by_unit = dict(zip(*neurons.match(F("unit").is_in(units)).values(["unit", "concept.label"]), strict=True))
    return int((result.result or {}).get("changed", -1)), [by_unit.get(u) for u in units]


def _remove_check_labels(ws: Any, run: Any) -> int:
    from workspace.dissect.concepts import ConceptStore

    with ConceptStore(ws) as store:
        if store.find_concept(CHECK_CONCEPT) is None:
            store.create_concept(CHECK_CONCEPT, CHECK_ACTOR, description=CHECK_DESCRIPTION)
            return 0
        return store.remove_labels(run.model_digest, run.layer, concept=CHECK_CONCEPT, by=CHECK_ACTOR,
                                   source="cli", note="mammo demo --check: clean-up")


def _cleanup(ws: Any, run: Any, read: _Read, services: list, mongod_url: str | None,
             echo: Callable[[str], None]) -> str:
    """Remove the check's labels, give back the concepts units carried before, refresh the dataset."""
    from workspace.dissect.concepts import ConceptStore

    removed = _remove_check_labels(ws, run)
    restored = 0
    with ConceptStore(ws) as store:
        for unit, name in read.before.items():
            restored += store.label_units(run.model_digest, run.layer, [unit], name, by=CHECK_ACTOR, source="cli",
                                          run_id=run.run_id, note="mammo demo --check: label given back")
        left = store.units_of(CHECK_CONCEPT, run.model_digest, run.layer)
    _expect(not left, f"units {left} still carry {CHECK_CONCEPT!r}")
    refreshed = ""
    if mongod_url:
        from fiftyone_plugins import dataset_names, operator_uri
        from fiftyone_plugins.launch import connect_here

        connect_here(ws, mongod_url)   # before FiftyOne's first import
        import fiftyone as fo
        import fiftyone.operators as foo

        patches_name = dataset_names()[0]
        if fo.dataset_exists(patches_name):
            result = foo.execute_operator(operator_uri("refresh_from_store"), dataset=fo.load_dataset(patches_name))
            refreshed = f"; FiftyOne refreshed ({(result.result or {}).get('changed', 0)} units changed)"
    return (f"{removed} {CHECK_CONCEPT!r} labels removed, {restored} earlier labels given back{refreshed}; "
            "the history keeps them")


def _stop(services: list) -> None:
    """Stop what was started here, last first, after closing this process's FiftyOne connection: FiftyOne
    queries its database when the process exits, and would wait 30 s for a stopped mongod."""
    from workspace.app.commands.fiftyone import disconnect_fiftyone
    from workspace.base.services import stop_all

    disconnect_fiftyone()
    stop_all(services)


def _finish(checks: Checks, services: list, started: float, echo: Callable[[str], None]) -> int:
    _stop(services)
    failed = [line.name for line in checks.lines if not line.ok]
    total = time.perf_counter() - started
    if failed:
        echo(f"[check] FAILED: {', '.join(failed)} ({len(checks.lines) - len(failed)}/{len(checks.lines)} passed, "
             f"{total:.0f} s); every process started here is stopped")
        return 1
    echo(f"[check] all {len(checks.lines)} checks passed in {total:.0f} s; every process started here is stopped")
    return 0


__all__ = ["CHECK_CONCEPT", "run_checks", "ask_roi", "retrieve_prediction", "report_text", "task_of_image",
           "roi_on_patch", "units_to_label"]
