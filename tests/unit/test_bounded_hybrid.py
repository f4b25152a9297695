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


def test_wide_features_fit_the_same_ridge_map_in_the_dual() -> None:
    """VGG16's 25,088-d features would need a 5 GB Gram matrix: past the primal limit the map is
    fitted in the dual, and it is the same map."""
    from recsketch.hybrid import RidgeFit

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 300)), rng.normal(size=(40, 6))
    primal, dual = RidgeFit(300, 6), RidgeFit(300, 6, primal_max_dim=100)
    for first in range(0, 40, 16):  # in blocks, as plan_hybrid streams them
        primal.add(x[first:first + 16], y[first:first + 16])
        dual.add(x[first:first + 16], y[first:first + 16])
    assert primal.primal and not dual.primal and dual.gram is None and not dual.sampled
    np.testing.assert_allclose(dual.solve(), primal.solve(), atol=1e-5)
    sampled = RidgeFit(300, 6, primal_max_dim=100, dual_max_rows=25)
    sampled.add(x, y)
    assert sampled.sampled and sampled.solve().shape == (300, 6)


def test_the_seeds_25088_d_features_get_cold_start_factors_without_a_5_gb_gram() -> None:
    """``recsketch run --backbone vgg16`` (flattened, 25,088-d) once crashed in evaluate: the
    primal Gram matrix alone is 5 GB. The dual fit holds the rows, not d x d."""
    import tracemalloc

    from recsketch.hybrid import complete_factors

    rng = np.random.default_rng(6)
    unit = normalise(rng.normal(size=(80, 25_088)).astype(np.float32))
    factors = rng.normal(size=(80, 16)).astype(np.float32)
    liked = np.arange(80) % 5 != 0
    tracemalloc.start()
    try:
        completed = complete_factors(unit, factors, liked)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert completed.shape == (80, 16) and np.isfinite(completed).all()
    assert np.allclose(np.linalg.norm(completed, axis=1), 1.0, atol=1e-5)
    assert peak < 200 * 2**20  # the primal fit would allocate 5 GB here
