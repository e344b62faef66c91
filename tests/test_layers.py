"""The house's layers: each module imports only its own layer and the layers below it (also inside
functions). docs/ARCHITECTURE.md, "Layers", is the map this test keeps true."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [  # lowest first: the folders of workspace/, models/ and the two surfaces
    ("base", ["workspace.base", "workspace"]),
    ("data", ["workspace.data"]),
    ("models", ["models"]),
    ("dissect", ["workspace.dissect"]),
    ("surfaces", ["ml_backend", "fiftyone_plugins"]),
    ("app", ["workspace.app"]),
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
    module = tmp_path / "workspace" / "data" / "patches.py"
    module.parent.mkdir(parents=True)
    module.write_text("import numpy\n\n\ndef f():\n    from workspace.dissect.session import Session\n    return Session\n")
    assert upward_imports([module], tmp_path) == [
        "workspace/data/patches.py:5 (data) imports workspace.dissect.session (dissect)"]
