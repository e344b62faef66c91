"""The Label Studio projects of a workspace, made through ``label-studio-sdk``, idempotently.

- **Screening reads**: one task per mammogram (the display PNG, chest wall on the left).
- **Patch review**: one task per suspicious patch of the model's read (the patch crop, shown enlarged,
  beside a small copy of the mammogram with the patch outlined).

Each project gets a Local Files storage over the workspace's ``derived/`` folder (so Label Studio
serves the images; no sync: tasks are imported as JSON with ``/data/local-files/?d=`` URLs, which keeps
their metadata), the backend connected as interactive, a webhook to the backend's ``/webhook``, and
``model_version`` set to the backend's, so its predictions show. Task data carries pseudonymous ids
only (``image_id``, laterality, view; never patient identifiers) and the concept names offered in
the ``concept`` choice. Running it again adds only what is missing (tasks keyed by image id, or image
id and patch box), updates the label config, the backend URL and the concept lists, and creates no
duplicates. What was made is remembered in ``labelstudio/projects.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend import label_configs as lc
from ml_backend.labelstudio import LabelStudioError, LabelStudioServer
from workspace.base.config import Workspace
from workspace.base.errors import MammoError
from workspace.base.progress import progress

KINDS = (lc.SCREENING, lc.PATCH_REVIEW)
WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]
BACKEND_TITLE = "mammo-dissect"
PROJECTS_FILE = "projects.json"
CONTEXT_MAX_SIDE = 768


@dataclass
class ProvisionedProject:
    kind: str
    project_id: int
    title: str
    tasks_total: int
    tasks_added: int
    ml_backend_id: int | None
    storage_id: int
    webhook_id: int | None


@dataclass
class ProvisionResult:
    url: str
    projects: dict[str, ProvisionedProject] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)   # images that could not be read (with the reason)

    def to_dict(self) -> dict:
        return {"url": self.url, "projects": {k: asdict(v) for k, v in self.projects.items()},
                "skipped": self.skipped}


def local_files_url(path: Path, document_root: Path) -> str:
    """The URL Label Studio serves a file under (relative to its LOCAL_FILES_DOCUMENT_ROOT)."""
    try:
        rel = Path(path).resolve().relative_to(Path(document_root).resolve())
    except ValueError:
        raise MammoError(f"{path} is not under Label Studio's document root {document_root}: the workspace must "
                         "be inside the folder the server may serve (LOCAL_FILES_DOCUMENT_ROOT)") from None
    return f"/data/local-files/?d={rel.as_posix()}"


def _items(pager: Any) -> list:
    return list(pager) if pager is not None else []


def _concept_choices(ws: Workspace) -> list[dict]:
    from workspace.dissect.concepts import ConceptStore

    with ConceptStore(ws) as store:
        return [{"value": c.name} for c in store.list_concepts()]


def _image_rows(ws: Workspace, image_ids: list[str] | None) -> list[dict]:
    from workspace.base.catalog import open_catalog

    db = open_catalog(ws)
    try:
        sql = "SELECT image_id, laterality, view, rows, cols, display_path, split, modality FROM images"
        rows = [dict(r) for r in db.query(sql + " ORDER BY image_id")]
    finally:
        db.conn.close()
    if image_ids is not None:
        wanted = set(image_ids)
        rows = [r for r in rows if r["image_id"] in wanted]
    return rows


def _display_path(ws: Workspace, row: dict) -> Path:
    stored = row.get("display_path")
    path = Path(stored) if stored else ws.display_dir / f"{row['image_id']}.png"
    return path if path.is_absolute() else ws.root / path


def review_dir(ws: Workspace) -> Path:
    return ws.root / "derived" / "review"


def _title(row: dict) -> str:
    side = " ".join(v for v in (row.get("laterality"), row.get("view")) if v)
    return f"{row['image_id']} · {side}" if side else row["image_id"]


def screening_task(row: dict, display: Path, document_root: Path, concepts: list[dict],
                   model_card: str = "") -> dict:
    return {"image": local_files_url(display, document_root), "image_id": row["image_id"],
            "laterality": row.get("laterality"), "view": row.get("view"), "title": _title(row),
            "concepts": concepts, "model_card": model_card}


def write_review_images(ws: Workspace, row: dict, box: list[int]) -> tuple[Path, Path]:
    """The patch crop of the display image and a small copy of the mammogram with the patch outlined."""
    from PIL import Image, ImageDraw

    x, y, w, h = box
    out = review_dir(ws)
    out.mkdir(parents=True, exist_ok=True)
    patch_path = out / f"{row['image_id']}_{x}_{y}_{w}_patch.png"
    context_path = out / f"{row['image_id']}_{x}_{y}_{w}_context.png"
    if patch_path.exists() and context_path.exists():
        return patch_path, context_path
    with Image.open(_display_path(ws, row)) as display:
        display = display.convert("L")
        crop = Image.new("L", (w, h), 0)
        crop.paste(display.crop((x, y, min(x + w, display.width), min(y + h, display.height))), (0, 0))
        crop.save(patch_path)
        scale = min(1.0, CONTEXT_MAX_SIDE / max(display.size))
        small = display.resize((max(1, round(display.width * scale)), max(1, round(display.height * scale))))
        context = small.convert("RGB")
        draw = ImageDraw.Draw(context)
        draw.rectangle([x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1], outline=(255, 122, 0),
                       width=max(2, round(6 * scale)))
        context.save(context_path)
    return patch_path, context_path


def review_tasks(ws: Workspace, row: dict, read: Any, document_root: Path, concepts: list[dict],
                 model_card: str, score_label: str) -> list[dict]:
    tasks = []
    scores = np.asarray(read.scores, dtype=np.float64)
    for i in np.asarray(read.suspicious).ravel():
        box = [int(v) for v in np.asarray(read.boxes)[int(i)]]
        patch, context = write_review_images(ws, row, box)
        score = float(scores[int(i)])
        tasks.append({"patch": local_files_url(patch, document_root), "image": local_files_url(context, document_root),
                      "image_id": row["image_id"], "box": box, "score": round(score, 4),
                      "laterality": row.get("laterality"), "view": row.get("view"),
                      "title": f"{_title(row)} · patch at ({box[0]}, {box[1]}) · {score_label} = {score:.2f}",
                      "concepts": concepts, "model_card": model_card})
    return tasks


def _task_key(kind: str, data: dict) -> tuple:
    if kind == lc.PATCH_REVIEW:
        return (data.get("image_id"), tuple(data.get("box") or ()))
    return (data.get("image_id"),)


def project_config(kind: str, loaded: Any, rows: list[dict]) -> str:
    """The label config of a project for this model (its classes as the assessment) and these images
    (called mammograms when all are mammography, images otherwise)."""
    from workspace.base.modality import MAMMOGRAPHY, modality_of

    subjects = {modality_of(r.get("modality")).subject for r in rows} or {MAMMOGRAPHY.subject}
    subject = subjects.pop() if len(subjects) == 1 else "image"
    return lc.label_config(kind, positive=loaded.positive_name, negative=loaded.negative_name, subject=subject)


def _ensure_project(client, title: str, kind: str, version: str | None, label_config: str,
                    notes: list[str]) -> Any:
    found = [p for p in _items(client.projects.list(title=title)) if p.title == title]
    description = (f"mammo-dissect {lc.TITLES[kind]}: the model's suspicious patches; draw an ROI with the "
                   "smart box to see which neurons align with it.")
    settings = dict(label_config=label_config, description=description, show_collab_predictions=True,
                    evaluate_predictions_automatically=True)
    if version:
        settings["model_version"] = version
    if found:
        project = found[0]
        # Label Studio 1.23 accepts a new model_version on an existing project only once a backend (or a
        # prediction) of that version exists, so it is set after the backend is connected (_set_version).
        settings.pop("model_version", None)
        changed = {k: v for k, v in settings.items() if getattr(project, k, None) != v}
        if "label_config" in changed:
            # another model's classes: Label Studio refuses a config that drops choices its annotations
            # use; the old config is kept then (the backend answers with the choices the project has)
            try:
                project = client.projects.update(id=project.id, label_config=changed.pop("label_config"))
            except Exception as error:  # the SDK's ApiError with Label Studio's validation message
                notes.append(f"{title}: Label Studio kept the project's label config ({getattr(error, 'body', error)})")
        if changed:
            project = client.projects.update(id=project.id, **changed)
        return project
    return client.projects.create(title=title, **settings)


def _set_version(client, project: Any, version: str | None) -> str | None:
    """Point the project at the backend's model version; a refusal is returned as a note, not raised."""
    if not version or getattr(project, "model_version", None) == version:
        return None
    try:
        client.projects.update(id=project.id, model_version=version)
    except Exception as error:  # the SDK raises ApiError with Label Studio's validation message
        return f"{project.title}: Label Studio kept model version {project.model_version!r} ({getattr(error, 'body', error)})"
    return None


def _ensure_storage(client, project_id: int, folder: Path) -> int:
    folder = folder.resolve()
    for storage in _items(client.import_storage.local.list(project=project_id)):
        if Path(storage.path or "").resolve() == folder:
            return int(storage.id)
    try:
        storage = client.import_storage.local.create(project=project_id, path=str(folder), title="mammo-dissect images",
                                                     use_blob_urls=True, regex_filter=r".*\.png$")
    except Exception as error:  # the SDK raises ApiError with Label Studio's message
        raise LabelStudioError(f"Label Studio refused a Local Files storage over {folder}: "
                               f"{getattr(error, 'body', error)}") from None
    return int(storage.id)


def _ensure_backend(client, project_id: int, url: str, auth: tuple[str, str] | None) -> int:
    extra: dict[str, Any] = {"auth_method": "BASIC_AUTH", "basic_auth_user": auth[0],
                             "basic_auth_pass": auth[1]} if auth else {"auth_method": "NONE"}
    ours = [b for b in _items(client.ml.list(project=project_id)) if getattr(b, "title", None) == BACKEND_TITLE]
    try:
        if ours:
            backend = ours[0]
            if backend.url != url or not backend.is_interactive or auth:
                # Label Studio 1.23 validates an update by calling the backend's /setup, which needs
                # the project: without it the PATCH fails with a 500 (a changed backend port).
                client.ml.update(id=backend.id, project=project_id, url=url, is_interactive=True, **extra)
            return int(backend.id)
        backend = client.ml.create(project=project_id, url=url, title=BACKEND_TITLE, is_interactive=True,
                                   timeout=120, **extra)
    except Exception as error:
        raise LabelStudioError(f"Label Studio could not connect the backend at {url}: "
                               f"{getattr(error, 'body', error)}") from None
    return int(backend.id)


def _ensure_webhook(client, project_id: int, backend_url: str, auth: tuple[str, str] | None) -> int:
    url = backend_url.rstrip("/") + "/webhook"
    headers = {}
    if auth:
        import base64

        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    hooks = [h for h in _items(client.webhooks.list(project=str(project_id)))
             if getattr(h, "project", None) == project_id]
    for hook in hooks:
        if hook.url.endswith("/webhook"):
            if hook.url != url or auth:
                client.webhooks.update(id=hook.id, url=url, headers=headers, actions=WEBHOOK_ACTIONS,
                                       send_payload=True, send_for_all_actions=False, is_active=True)
            return int(hook.id)
    hook = client.webhooks.create(url=url, project=project_id, actions=WEBHOOK_ACTIONS, headers=headers,
                                  send_payload=True, send_for_all_actions=False, is_active=True)
    return int(hook.id)


def _existing_tasks(client, project_id: int) -> dict[tuple, Any]:
    found = {}
    # review=True: listing must not make Label Studio ask the backend for every unpredicted task on the page
    # (evaluate_predictions_automatically), which cost ~60 s per 500 tasks on a restart
    for task in _items(client.tasks.list(project=project_id, page_size=500, review=True)):
        found.setdefault(_task_key_from(task), task)
    return found


def _task_key_from(task: Any) -> tuple:
    data = task.data or {}
    return (data.get("image_id"), tuple(data.get("box") or ())) if "patch" in data else (data.get("image_id"),)


def provision(ws: Workspace, server: LabelStudioServer, *, backend_url: str,
              backend_auth: tuple[str, str] | None = None, kinds: tuple[str, ...] = KINDS,
              image_ids: list[str] | None = None, title_suffix: str = "", loaded: Any = None, run: Any = None,
              connect_backend: bool = True) -> ProvisionResult:
    """Make (or bring up to date) the workspace's projects on ``server``; see the module docstring.

    ``image_ids`` limits the images (default: all); ``title_suffix`` tells projects of several workspaces
    apart on one server; ``loaded``/``run``: the backend's model and dissection run (default: loaded as
    the backend does) for the model version and the Patch review reads.
    """
    from ml_backend.app import load_model_and_run, model_version

    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise MammoError(f"unknown project kind(s) {unknown}: {', '.join(KINDS)}")
    document_root = Path(server.document_root or ws.root)
    if loaded is None or run is None:
        loaded, run = load_model_and_run(ws)
    version = model_version(loaded, run)
    card = loaded.card.summary()  # shown on every task beside the model's scores
    client = server.client()
    concepts = _concept_choices(ws)
    rows = _image_rows(ws, image_ids)
    result = ProvisionResult(url=server.url)
    for kind in kinds:
        title = f"{lc.TITLES[kind]}{title_suffix}"
        project = _ensure_project(client, title, kind, version, project_config(kind, loaded, rows), result.skipped)
        storage_id = _ensure_storage(client, project.id, ws.root / "derived")
        existing = _existing_tasks(client, project.id)
        wanted: list[dict] = []
        for row in progress(rows, desc=f"{title}: tasks", unit="image"):
            display = _display_path(ws, row)
            if not display.exists():
                result.skipped.append(f"{row['image_id']}: no display image ({display})")
                continue
            if kind == lc.SCREENING:
                wanted.append(screening_task(row, display, document_root, concepts, card))
            else:
                from models.inference import read_mammogram

                try:
                    read = read_mammogram(ws, row["image_id"], loaded, keep_maps=True)
                except MammoError as error:
                    result.skipped.append(f"{row['image_id']}: {error}")
                    continue
                wanted.extend(review_tasks(ws, row, read, document_root, concepts, card, loaded.score_label))
        new = [t for t in wanted if _task_key(kind, t) not in existing]
        if new:
            client.projects.import_tasks(id=project.id, request=new, commit_to_project=True, return_task_ids=True)
        for task_data in wanted:  # keep the offered concepts and the model card current on tasks made earlier
            task = existing.get(_task_key(kind, task_data))
            if task is None:
                continue
            current = task.data or {}
            if (current.get("concepts"), current.get("model_card")) != (concepts, card):
                client.tasks.update(id=str(task.id), data={**current, "concepts": concepts, "model_card": card})
        ml_id = webhook_id = None
        if connect_backend:
            ml_id = _ensure_backend(client, project.id, backend_url, backend_auth)
            webhook_id = _ensure_webhook(client, project.id, backend_url, backend_auth)
            note = _set_version(client, project, version)
            if note:
                result.skipped.append(note)
        result.projects[kind] = ProvisionedProject(
            kind=kind, project_id=int(project.id), title=title, tasks_total=len(existing) + len(new),
            tasks_added=len(new), ml_backend_id=ml_id, storage_id=storage_id, webhook_id=webhook_id)
    _remember(ws, result)
    return result


def _remember(ws: Workspace, result: ProvisionResult) -> None:
    ws.labelstudio_dir.mkdir(parents=True, exist_ok=True)
    path = ws.labelstudio_dir / PROJECTS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=2))
    os.replace(tmp, path)


def remembered(ws: Workspace) -> dict | None:
    path = ws.labelstudio_dir / PROJECTS_FILE
    return json.loads(path.read_text()) if path.exists() else None


__all__ = ["KINDS", "ProvisionResult", "ProvisionedProject", "provision", "remembered", "local_files_url",
           "screening_task", "review_tasks", "write_review_images"]
