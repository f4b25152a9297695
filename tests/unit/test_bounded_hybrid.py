"""The bounded hybrid top-k equals the blended pass, and computes far less of it on clustered data."""

from __future__ import annotations

import numpy as np
import pytest

from recsketch.hybrid import bounded_top_k, hybrid_embedding
from recsketch.similarity import normalise, top_k_cosine


def _catalogue(seed: int, n: int = 600, dim: int = 32, factors: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 20, size=n)
    visual = normalise(rng.normal(size=(20, dim))[groups] + 0.4 * rng.normal(size=(n, dim)))
    taste = normalise(rng.normal(size=(20, factors))[groups] + 0.6 * rng.normal(size=(n, factors)))
    visual[5] = visual[6]  # identical pictures: scores at 1.0, ties broken by the lower index
    return visual.astype(np.float32), taste.astype(np.float32)


@pytest.mark.parametrize(("seed", "weight"), [(0, 0.3), (1, 0.5), (2, 0.7), (3, 0.0), (4, 1.0)])
def test_equals_the_blended_pass(seed: int, weight: float) -> None:
    k = 10
    visual, factors = _catalogue(seed)
    visual_indices, visual_scores = top_k_cosine(visual, k, normalised=True)
    want_indices, want_scores = top_k_cosine(hybrid_embedding(visual, factors, weight), k)
    got_indices, got_scores, stats = bounded_top_k(visual, factors, visual_indices, visual_scores, (0, 600), k, weight,
                                                   query_block=128, candidate_block=200)
    assert (got_indices == want_indices).all()
    assert np.abs(got_scores - want_scores).max() <= 1e-6
    assert stats.rows == 600 and stats.tiles == 5 * 3


def test_a_row_block_alone_and_few_pairs_scored_beyond_the_lists() -> None:
    visual, factors = _catalogue(7, n=2000)
    visual_indices, visual_scores = top_k_cosine(visual, 10, normalised=True)
    want, _ = top_k_cosine(hybrid_embedding(visual, factors, 0.4), 10, rows=(500, 900))
    got, _, stats = bounded_top_k(visual, factors, visual_indices, visual_scores, (500, 900), 10, 0.4)
    assert (got == want).all()
    assert stats.candidates < 0.2 * 400 * 2000  # most pairs ruled out by the bound
