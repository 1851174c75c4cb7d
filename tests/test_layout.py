"""The package layout: each subpackage imports only from those below it, and the module paths
of the flat layout (kd-optuna 0.1) still import, as the very same modules."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from kd_optuna._moved import MOVED

PACKAGE = Path(__file__).resolve().parents[1] / "kd_optuna"

#: Bottom first: a unit may import from the units before it, never from one after it.
LAYERS = ["errors", "optuna_private", "files", "ops", "space", "distill", "models", "data", "train",
          "search", "proxy", "export", "run"]


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "kd_optuna" and len(parts) > 1 else None


def _imports(path: Path) -> set[str]:
    """Every kd_optuna module ``path`` imports, relative imports resolved."""
    package = ["kd_optuna", *path.relative_to(PACKAGE).parts[:-1]]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module == "kd_optuna" or not node.module:
                found |= {f"{module}.{alias.name}" for alias in node.names}
            else:
                found.add(module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_every_unit_of_the_package_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").exists()) and not p.name.startswith("_")}
    assert units - {"studies"} == set(LAYERS)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own not in LAYERS:
            continue
        for module in _imports(path):
            unit = _unit(module)
            if unit in LAYERS and LAYERS.index(unit) > LAYERS.index(own):
                upward.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not upward, upward


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_flat_layout_path_is_the_moved_module_itself(old):
    assert importlib.import_module(f"kd_optuna.{old}") is importlib.import_module(MOVED[old])


def test_readme_in_python_imports_and_an_old_submodule_path_work_in_a_fresh_process():
    code = (
        "from kd_optuna.space import SearchSpace, suggest_distiller\n"
        "from kd_optuna.loss import DistillerLoss\n"
        "from kd_optuna.sampler import EvolutionSampler\n"
        "from kd_optuna.export import train_with_distiller\n"
        "from kd_optuna.proxy import ProxySettings\n"
        "import kd_optuna.baselines.dkd, kd_optuna.distill.baselines.dkd as new\n"
        "import kd_optuna.search.sampler as sampler\n"
        "assert kd_optuna.baselines.dkd is new and EvolutionSampler is sampler.EvolutionSampler\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
