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
    np.testing.assert_array_equal(completed[liked], factors[liked])  # the liked keep their rows
    assert (np.linalg.norm(completed[~liked], axis=1) > 0).all()  # the cold get a predicted one
    assert peak < 200 * 2**20  # the primal fit would allocate 5 GB here


def test_likes_rows_sum_to_als_own_scores() -> None:
    """The likes half compares whitened factors: summed over what a user liked, their dot
    products rank models as ALS's user factors do (the cosines of the raw factors do not)."""
    from scipy import sparse

    from recsketch.hybrid import fit_als, likes_rows

    rng = np.random.default_rng(8)
    tastes = rng.normal(size=(6, 8))
    items = rng.normal(size=(300, 8)) @ np.diag(np.linspace(2, 0.5, 8)) + 1.0  # popular and niche ones
    users = tastes[rng.integers(0, 6, size=400)] + 0.3 * rng.normal(size=(400, 8))
    likes = sparse.csr_matrix((users @ items.T > np.quantile(users @ items.T, 0.9)).astype(np.float32))
    user_factors, item_factors = fit_als(likes, factors=8, regularization=0.5, iterations=20)
    rows = likes_rows(item_factors, 0.5)
    liked = np.asarray(likes.sum(axis=0)).ravel() > 0
    assert abs(float(np.mean(np.einsum("ij,ij->i", rows[liked], rows[liked]))) - 1.0) < 1e-4  # on the cosine's scale

    def agreement(scores: np.ndarray) -> float:  # share of each user's ALS top-10 that these scores rank top-10
        als = np.argsort(-np.where(likes.toarray() > 0, -np.inf, user_factors @ item_factors.T), axis=1)[:, :10]
        ours = np.argsort(-np.where(likes.toarray() > 0, -np.inf, scores), axis=1)[:, :10]
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(als, ours, strict=True)]))

    whitened = agreement(likes @ rows @ rows.T)
    cosines = agreement(likes @ normalise(item_factors) @ normalise(item_factors).T)
    assert whitened > 0.9 and whitened > cosines + 0.2, (whitened, cosines)  # measured: 0.97 and 0.67
