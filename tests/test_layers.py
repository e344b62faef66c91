"""The house's layers: each module imports only its own layer and the layers below it (also inside
functions). docs/ARCHITECTURE.md, "Layers", is the map this test keeps true."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [  # lowest first
    ("base", ["workspace.config", "workspace.errors", "workspace.schema", "workspace.catalog", "workspace.progress",
              "workspace.services", "workspace.modality", "workspace"]),
    ("data", ["workspace.dicom_io", "workspace.view_text", "workspace.ingest", "workspace.importers",
              "workspace.synth", "workspace.patches", "workspace.domain"]),
    ("models", ["models"]),
    ("dissect", ["workspace.dissection", "workspace.runningstats", "workspace.dissect_run", "workspace.query",
                 "workspace.concepts", "workspace.reports", "workspace.session"]),
    ("surfaces", ["ml_backend", "fiftyone_plugins"]),
    ("app", ["workspace.cli", "workspace.commands", "workspace.demo", "workspace.demo_check"]),
]


def layer_of(module: str) -> int | None:
    """The layer index of a project module (the longest matching prefix), None for a third-party one."""
    best = None
    for index, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return None if best is None else best[0]


def _module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from workspace import ingest` imports the submodule
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if (REPO / node.module.replace(".", "/") / f"{alias.name}.py").is_file()
                      or (REPO / node.module.replace(".", "/") / alias.name / "__init__.py").is_file()]
    return found


def upward_imports(files: list[Path], root: Path = REPO) -> list[str]:
    wrong = []
    for path in files:
        module = _module_name(path, root)
        own = layer_of(module)
        assert own is not None, f"{module} is in no layer: add it to LAYERS and to docs/ARCHITECTURE.md"
        for line, imported in _imports(path):
            theirs = layer_of(imported)
            if theirs is not None and theirs > own:
                wrong.append(f"{path.relative_to(root)}:{line} ({LAYERS[own][0]}) imports {imported} "
                             f"({LAYERS[theirs][0]})")
    return wrong


def test_every_module_imports_only_its_layer_and_the_layers_below():
    files = [p for top in ("workspace", "models", "ml_backend", "fiftyone_plugins") for p in (REPO / top).rglob("*.py")]
    assert len(files) > 40
    wrong = upward_imports(files)
    assert not wrong, "\n".join(wrong)


def test_the_rule_sees_a_lazy_upward_import(tmp_path):
    module = tmp_path / "workspace" / "patches.py"
    module.parent.mkdir()
    module.write_text("import numpy\n\n\ndef f():\n    from workspace.session import Session\n    return Session\n")
    assert upward_imports([module], tmp_path) == [
        "workspace/patches.py:5 (data) imports workspace.session (dissect)"]
