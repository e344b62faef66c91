"""The project installs the way Python projects install: a wheel built from the repository, into a fresh
virtual environment, gives a working ``mammo`` with its package data (the shipped model and its card, the
FiftyOne plugin's ``fiftyone.yml`` and ``requirements.txt``, the LICENSE), and every third-party package the
code imports is declared.

The fresh environment borrows the already installed dependencies through a path entry (not the repository's
editable install: ``.pth`` files of a borrowed folder are not processed), so the test checks the wheel itself
in well under a minute; CI's ``make test`` installs the dependencies from ``requirements.lock`` as a user would.
"""

from __future__ import annotations

import ast
import json
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workspace", "models", "ml_backend", "fiftyone_plugins")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    import shutil

    base = tmp_path_factory.mktemp("install")
    # built from a copy of the sources: an in-tree build would reuse (and package) whatever build/ holds
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                 "mammo-workspace", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(base / "dist"), str(source)], check=True, cwd=base, timeout=600)
    wheel = next((base / "dist").glob("mammo_dissect-*.whl"))
    env_dir = base / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    target = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    (Path(target) / "borrowed_dependencies.pth").write_text(site.getsitepackages()[0] + "\n")
    # pip run for the new interpreter (scripts get its shebang); --ignore-installed: never touch the borrowed
    # environment's own (editable) mammo-dissect
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--ignore-installed", "--quiet", str(wheel)], check=True, timeout=600)
    return env_dir


def _run(env_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "MAMMO_QUIET": "1", "HOME": str(cwd)})


def test_the_wheel_gives_a_working_mammo_with_its_data(installed, tmp_path):
    python = str(installed / "bin" / "python")
    probe = ("import json, models, workspace, ml_backend, fiftyone_plugins\n"
             "from pathlib import Path\n"
             "from models.checkpoint import SHIPPED_DEMO, load_checkpoint\n"
             "loaded = load_checkpoint(SHIPPED_DEMO, device='cpu')\n"
             "plugin = Path(fiftyone_plugins.__file__).parent / 'mammo_dissect'\n"
             "print(json.dumps({'models': models.__file__, 'weights': str(SHIPPED_DEMO), 'digest': loaded.digest,\n"
             "                  'card': loaded.card.trained,\n"
             "                  'plugin': all((plugin / f).is_file() for f in ('fiftyone.yml', 'requirements.txt'))}))\n")
    out = _run(installed, python, "-c", probe, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    # imported from the environment, not the repository; the model, its card and the plugin came in the wheel
    assert found["models"].startswith(str(installed)) and found["weights"].startswith(str(installed))
    assert found["digest"] == "474e330dc920ff1b" and found["card"] and found["plugin"]
    cli = _run(installed, str(installed / "bin" / "mammo"), "--help", cwd=tmp_path)
    assert cli.returncode == 0 and "dissect" in cli.stdout
    synth = _run(installed, str(installed / "bin" / "mammo"), "synth", "--patients", "1", "--small", "--no-variants",
                 "--workspace", str(tmp_path / "ws"), cwd=tmp_path)
    assert synth.returncode == 0, synth.stderr[-2000:]
    licence = _run(installed, python, "-c", "import importlib.metadata as m; print(m.metadata('mammo-dissect')"
                   "['License-File'] or ''); print(any('LICENSE' in str(f) for f in m.files('mammo-dissect')))",
                   cwd=tmp_path)
    assert licence.stdout.split()[-1] == "True"


def _third_party_imports() -> set[str]:
    names: set[str] = set()
    stdlib = set(sys.stdlib_module_names)
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found = [node.module]
                else:
                    continue
                names.update(n.split(".")[0] for n in found)
    return {n for n in names if n not in stdlib and n not in PACKAGES and n != "__future__"}


def test_every_imported_package_is_declared():
    """Each top-level module the code imports comes from a distribution the project declares (its
    dependencies or an extra): an undeclared import works here only by accident of the lock."""
    import importlib.metadata as metadata
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements.extend(extra)
    declared = {re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    providers = metadata.packages_distributions()
    missing = {}
    for module in sorted(_third_party_imports()):
        distributions = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if not distributions & declared:
            missing[module] = sorted(distributions)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
