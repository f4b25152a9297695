"""recsketch installs as a package: `pip install .` brings what it imports and its migrations."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).parents[2]


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {re.split(r"[<>=\[; ]", r, maxsplit=1)[0] for r in requirements}
    return {n.lower().replace("_", "-") for n in names} - {"recsketch"}


def imported_top_level_modules() -> set[str]:
    """Every module the package imports, lazily imported ones (torch, keras) included."""
    found: set[str] = set()
    for path in (REPO / "recsketch").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"recsketch", "__future__"}


def test_every_imported_library_is_a_declared_dependency() -> None:
    distributions = importlib.metadata.packages_distributions()
    needed = {}
    for module in imported_top_level_modules():
        owners = distributions.get(module)
        assert owners, f"{module} is imported but installed by no distribution"
        needed[module] = {o.lower().replace("_", "-") for o in owners}
    # modules that come with a declared distribution rather than from one of their own name
    via = {"keras": "tensorflow-cpu", "airflow": "apache-airflow", "pydantic_core": "pydantic"}
    missing = {module: owners for module, owners in needed.items()
               if not owners & declared() and via.get(module) not in declared()}
    assert missing == {}
    assert {"torch", "alembic", "sqlalchemy", "numpy"} <= set(needed)


def test_the_wheel_carries_the_code_and_the_migrations(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("recsketch-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("recsketch/cli.py", "recsketch/contracts.py", "recsketch/db/migrations/env.py",
                   "recsketch/db/migrations/script.py.mako",
                   "recsketch/db/migrations/versions/0001_first_release.py"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("tests/", "dags/", "benchmarks/"))]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: sqlalchemy>=2.0" in metadata and 'extra == "lite0"' in metadata
