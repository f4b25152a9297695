"""The cold-start ridge map: wide features are fitted in the dual, to the same map, in bounded memory."""

from __future__ import annotations

import numpy as np

from recsketch.similarity import normalise


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
