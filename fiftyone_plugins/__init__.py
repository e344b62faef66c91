"""FiftyOne side of mammo-dissect: the datasets (:mod:`.sync`), the services (:mod:`.launch`) and the
App plugin (``mammo_dissect/``: the "Neuron map" panel and its operators).

Dataset names and the workspace they belong to are recorded in each dataset's ``info["mammo"]``, so
the plugin, running inside the App's server process, finds the workspace and run it shows.
"""

from __future__ import annotations

from pathlib import Path

PLUGIN_NAME = "@mammo/dissect"
PLUGIN_DIR = Path(__file__).resolve().parent / "mammo_dissect"
PANEL_NAME = "neuron_map"
DEFAULT_PREFIX = "mammo"


def dataset_names(prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """The (patches, neurons) dataset names of a workspace."""
    return f"{prefix}-patches", f"{prefix}-neurons"


def reads_dataset_name(prefix: str = DEFAULT_PREFIX) -> str:
    """The reads dataset of a workspace: one sample per mammogram read by the run's model."""
    return f"{prefix}-reads"


def operator_uri(name: str) -> str:
    return f"{PLUGIN_NAME}/{name}"
