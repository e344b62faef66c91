"""Where a workspace keeps things, and the environment its services run in.

A workspace is one folder (default ``./mammo-workspace``; ``--workspace`` or ``MAMMO_WORKSPACE``
override it) that holds everything a user made. Nothing is written outside it: the services'
home, cache and config folders are pointed inside it by :meth:`Workspace.service_env`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "MAMMO_WORKSPACE"
DEFAULT_DIR = "mammo-workspace"


def resolve_root(path: str | os.PathLike | None = None) -> Path:
    """The workspace folder: an explicit path, else ``$MAMMO_WORKSPACE``, else ``./mammo-workspace``."""
    chosen = path or os.environ.get(ENV_VAR) or DEFAULT_DIR
    return Path(chosen).expanduser().resolve()


@dataclass(frozen=True)
class Workspace:
    """Paths inside one workspace folder. Creating the object creates nothing on disk;
    :meth:`ensure` makes the folders."""

    root: Path

    @classmethod
    def open(cls, path: str | os.PathLike | None = None, create: bool = True) -> Workspace:
        ws = cls(resolve_root(path))
        if create:
            ws.ensure()
        return ws

    # -- the catalog and the derived data ---------------------------------------------
    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.sqlite"

    @property
    def dicom_dir(self) -> Path:
        """DICOM files the workspace itself made (the synthetic cohort). Imported files stay where they are."""
        return self.root / "dicom"

    @property
    def display_dir(self) -> Path:
        """Windowed 8-bit PNG views of each image, chest wall on the left (what people see)."""
        return self.root / "derived" / "display"

    @property
    def annotated_dir(self) -> Path:
        """Low-resolution annotated copies (white ellipses around findings), as in the paper's data."""
        return self.root / "derived" / "annotated"

    @property
    def masks_dir(self) -> Path:
        """Lesion masks (PNG, original pixel coordinates)."""
        return self.root / "derived" / "masks"

    @property
    def foreground_dir(self) -> Path:
        """Breast foreground masks (PNG, normalised orientation, downsampled)."""
        return self.root / "derived" / "foreground"

    @property
    def patches_dir(self) -> Path:
        return self.root / "patches"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def reads_dir(self) -> Path:
        """Cached whole-mammogram reads (patch scores and kept feature maps) per image and model."""
        return self.root / "cache" / "reads"

    @property
    def runs_dir(self) -> Path:
        """Dissection runs, one immutable folder each."""
        return self.root / "runs"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def labelstudio_dir(self) -> Path:
        return self.root / "labelstudio"

    @property
    def fiftyone_dir(self) -> Path:
        return self.root / "fiftyone"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def home_dir(self) -> Path:
        """HOME for service processes, so nothing lands in the user's home folder."""
        return self.root / "home"

    def ensure(self) -> Workspace:
        for folder in (self.root, self.dicom_dir, self.display_dir, self.annotated_dir, self.masks_dir,
                       self.foreground_dir, self.patches_dir, self.models_dir, self.reads_dir,
                       self.runs_dir, self.reports_dir, self.logs_dir, self.home_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def service_env(self) -> dict[str, str]:
        """Environment overrides that keep torch, Label Studio and FiftyOne inside the workspace."""
        home = self.home_dir
        fo = self.fiftyone_dir
        return {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "TORCH_HOME": str(self.root / "cache" / "torch"),
            "MPLCONFIGDIR": str(home / ".config" / "matplotlib"),
            "FIFTYONE_CONFIG_PATH": str(fo / "config.json"),
            "FIFTYONE_DATABASE_DIR": str(fo / "db"),
            "FIFTYONE_PLUGINS_DIR": str(fo / "plugins"),
            "FIFTYONE_DEFAULT_DATASET_DIR": str(fo / "datasets"),
            "FIFTYONE_DATASET_ZOO_DIR": str(fo / "zoo" / "datasets"),
            "FIFTYONE_MODEL_ZOO_DIR": str(fo / "zoo" / "models"),
            "FIFTYONE_DO_NOT_TRACK": "true",
            "FIFTYONE_DATABASE_VALIDATION": "false",
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.labelstudio_dir),
            MAMMO_ENV: str(self.root),
        }


MAMMO_ENV = ENV_VAR
