"""Test catalogues in rec-a-sketch format built from the real model_urls.psv."""

from __future__ import annotations

from pathlib import Path

from recsketch.demo import build_catalog_from_psv

REAL_CATALOGUE = Path(__file__).parents[2] / "shared" / "data" / "model_urls.psv"


def build_real_catalog(folder: Path, n_models: int, seed: int = 0) -> dict[str, set[str]]:
    return build_catalog_from_psv(folder, REAL_CATALOGUE, n_models, seed)
