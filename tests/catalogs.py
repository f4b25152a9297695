"""Test catalogues in rec-a-sketch format built from real model ids and names.

The tests use ``fixtures/model_urls_sample.psv``: 332 rows of the real ``model_urls.psv``
(the first 300, 30 legacy ids, 20 names quoted with backslashes or holding newlines, and two
duplicate rows), so they run anywhere. The whole file (``../shared/data``) is only for the
benchmarks and the one test that checks the seed's counts.
"""

from __future__ import annotations

from pathlib import Path

from recsketch.demo import build_catalog_from_psv

SAMPLE_CATALOGUE = Path(__file__).parent / "fixtures" / "model_urls_sample.psv"
REAL_CATALOGUE = Path(__file__).parents[2] / "shared" / "data" / "model_urls.psv"


def build_real_catalog(folder: Path, n_models: int, seed: int = 0) -> dict[str, set[str]]:
    return build_catalog_from_psv(folder, SAMPLE_CATALOGUE, n_models, seed)
