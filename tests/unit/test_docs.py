"""The docs say what the code does: every setting is documented, the README stays a manual."""

from __future__ import annotations

import re
from pathlib import Path

from recsketch.config import Settings

REPO = Path(__file__).parents[2]


def test_every_setting_is_documented_and_nothing_else() -> None:
    page = (REPO / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"`RECSKETCH_([A-Z0-9_]+)`", page))
    fields = {name.upper() for name in Settings.model_fields}
    outside_settings = {"STORAGE_CONN_ID", "CACHE_DIR", "KERNEL"}  # read by hooks.py, runtimes.py, kernel.py
    assert fields - documented == set(), "settings missing from docs/configuration.md"
    assert documented - fields - outside_settings == set(), "documented variables no code reads"


def test_the_readme_is_a_manual_with_the_two_commands_first() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    first_screen = "\n".join(readme.splitlines()[:25])
    assert "make demo" in first_screen and "make test" in first_screen
    for page in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / page).is_file(), page


def test_the_architecture_map_names_modules_that_exist() -> None:
    page = (REPO / "docs" / "architecture.md").read_text()
    block = page.split("```")[1]
    assert len(block.strip().splitlines()) <= 30
    for name in re.findall(r"^\s*([\w/]+\.py|[\w]+/)\s", block, flags=re.M):
        assert list(REPO.glob(f"**/{name.rstrip('/')}")), name
