"""The hybrid lists from the exact visual lists and one scan of the CF factors
(``hybrid.bounded_top_k``) equal the full blended pass, whatever the weight, the depth of the
visual lists, how many rows fall back to a full row, or how short a worn list is."""

from __future__ import annotations

import numpy as np
import pytest

from recsketch.hybrid import BlendedRows, bounded_top_k, hybrid_embedding
from recsketch.similarity import normalise, top_k_cosine, top_k_tiled


def catalogue(seed: int, n: int = 600, d: int = 24, f: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit visual features and unit CF factors that cluster otherwise."""
    rng = np.random.default_rng(seed)
    visual = normalise(rng.normal(size=(12, d))[rng.integers(12, size=n)] + 0.6 * rng.normal(size=(n, d)))
    taste = normalise(rng.normal(size=(6, f))[rng.integers(6, size=n)] + 0.8 * rng.normal(size=(n, f)))
    visual[1] = visual[0]  # identical pictures and tastes: a tie at exactly 1.0
    taste[1] = taste[0]
    return visual.astype(np.float32), taste.astype(np.float32)


def assert_same_lists(unit: np.ndarray, factors: np.ndarray, w: float, rows: np.ndarray, indices: np.ndarray,
                      scores: np.ndarray, exact_indices: np.ndarray, exact_scores: np.ndarray) -> None:
    """Rank by rank the same scores within 1e-6; where the models differ, float32 rounding
    ordered a near-tie otherwise: the model listed scores (in float64) what the exact one does."""
    assert np.abs(scores - exact_scores).max() <= 1e-6
    blended = hybrid_embedding(unit, factors, w).astype(np.float64)
    differ_rows, differ_ranks = np.nonzero(indices != exact_indices)
    for row, rank in zip(differ_rows, differ_ranks, strict=True):
        ours = blended[rows[row]] @ blended[indices[row, rank]]
        assert abs(ours - exact_scores[row, rank]) <= 2e-6, (row, rank)
    assert len(differ_rows) <= 0.002 * indices.size


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("w", [0.0, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("depth", [10, 40])
def test_bounded_equals_the_blended_full_pass(seed: int, w: float, depth: int) -> None:
    unit, factors = catalogue(seed)
    visual_indices, visual_scores = top_k_cosine(unit, depth, normalised=True)
    exact_indices, exact_scores = top_k_cosine(hybrid_embedding(unit, factors, w), 5, normalised=True)
    result = bounded_top_k(unit, factors, visual_indices[100:400], visual_scores[100:400], (100, 400), w, 5,
                           query_block=64, candidate_block=97, max_candidates=60, pair_budget=500)
    assert_same_lists(unit, factors, w, np.arange(100, 400), result.indices, result.scores,
                      exact_indices[100:400], exact_scores[100:400])
    if depth == 40 and w <= 0.5:  # deep enough lists settle most rows: not a full pass in disguise
        assert result.fallback_rows < 100, result.fallback_rows
    assert result.indices[0, 0] != 100


@pytest.mark.parametrize("w", [0.3, 0.7])
def test_bounded_rows_named_by_an_index_array_equal_the_blended_full_pass(w: float) -> None:
    """A refresh's dirty rows are scattered: named by an array, in any order, they get the
    same lists as the full pass gives them (query blocks, pair flushes and fallbacks included)."""
    unit, factors = catalogue(3)
    rows = np.random.default_rng(3).permutation(len(unit))[:150]
    visual_indices, visual_scores = top_k_cosine(unit, 20, normalised=True)
    exact_indices, exact_scores = top_k_cosine(hybrid_embedding(unit, factors, w), 5, normalised=True)
    result = bounded_top_k(unit, factors, visual_indices[rows], visual_scores[rows], rows, w, 5,
                           query_block=32, candidate_block=97, max_candidates=40, pair_budget=300)
    assert_same_lists(unit, factors, w, rows, result.indices, result.scores, exact_indices[rows],
                      exact_scores[rows])
    assert result.fallback_rows < len(rows)  # the bound settled some: not every row in full


def exact_blend(unit: np.ndarray, factors: np.ndarray, w: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The oracle in float64: every pair's blended dot product, ties by the lower index."""
    blended = hybrid_embedding(unit, factors, w).astype(np.float64)
    products = blended @ blended.T
    np.fill_diagonal(products, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(products)), products.shape), -products), axis=1)[:, :k]
    return order, np.take_along_axis(products, order, 1).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("w", [0.2, 0.5, 0.9, 1.0])
def test_bounded_and_the_blended_pass_are_exact_when_the_likes_rows_are_not_unit(seed: int, w: float) -> None:
    """The likes rows are whitened ALS factors (``hybrid.likes_rows``): their norms vary (what ALS
    learnt of popularity), so blended scores are dot products that may pass 1. Both ways of
    computing the lists still equal the exact blend."""
    unit, taste = catalogue(seed)
    factors = (taste * np.random.default_rng(seed + 9).lognormal(0.0, 0.6, size=(len(taste), 1))).astype(np.float32)
    visual_indices, visual_scores = top_k_cosine(unit, 40, normalised=True)
    exact_indices, exact_scores = exact_blend(unit, factors, w, 5)
    assert exact_scores.max() > 1.0  # not the unit case again
    result = bounded_top_k(unit, factors, visual_indices[100:400], visual_scores[100:400], (100, 400), w, 5,
                           query_block=64, candidate_block=97, max_candidates=60, pair_budget=500)
    assert_same_lists(unit, factors, w, np.arange(100, 400), result.indices, result.scores,
                      exact_indices[100:400], exact_scores[100:400])
    tiled = top_k_tiled(BlendedRows(unit, factors, w), 5, (100, 400), query_block=64, candidate_block=97)
    assert_same_lists(unit, factors, w, np.arange(100, 400), *tiled, exact_indices[100:400], exact_scores[100:400])


def test_rows_the_bound_cannot_settle_and_worn_lists_are_computed_in_full() -> None:
    unit, factors = catalogue(7)
    visual_indices, visual_scores = top_k_cosine(unit, 30, normalised=True)
    visual_indices[::3, 12:], visual_scores[::3, 12:] = -1, -np.inf  # lists worn by deletions: shorter
    visual_indices[1::5, 3:], visual_scores[1::5, 3:] = -1, -np.inf  # shorter than k: no bound at all
    exact_indices, exact_scores = top_k_cosine(hybrid_embedding(unit, factors, 0.5), 5, normalised=True)
    for cap in (0, 5, None):
        result = bounded_top_k(unit, factors, visual_indices, visual_scores, (0, len(unit)), 0.5, 5,
                               max_candidates=cap)
        assert_same_lists(unit, factors, 0.5, np.arange(len(unit)), result.indices, result.scores,
                          exact_indices, exact_scores)
        assert result.fallback_rows >= len(unit) // 5
    assert result.candidates > 0


def test_blended_rows_read_as_the_written_embedding_would() -> None:
    unit, factors = catalogue(3, n=90)
    exact = top_k_cosine(hybrid_embedding(unit, factors, 0.3), 4, normalised=True)
    tiled = top_k_tiled(BlendedRows(unit, factors, 0.3), 4, (0, 90), query_block=16, candidate_block=20)
    assert (tiled[0] == exact[0]).mean() > 0.99 and np.abs(tiled[1] - exact[1]).max() <= 1e-6


def test_measured_mode_serves_unproven_rows_from_their_candidates_only_while_they_measure_up() -> None:
    """Rows the bound cannot settle are ranked among their visual list and CF top-cap; some of
    them are computed in full to measure that: a recall below 0.999 sends every unproven row to
    the full computation (the result is then exact), and the measurement is reported."""
    from recsketch.similarity import recall_at_k

    unit, factors = catalogue(11, n=800)
    visual_indices, visual_scores = top_k_cosine(unit, 20, normalised=True)
    exact_indices, exact_scores = top_k_cosine(hybrid_embedding(unit, factors, 0.6), 5, normalised=True)
    rows = np.arange(len(unit))
    generous = bounded_top_k(unit, factors, visual_indices, visual_scores, (0, len(unit)), 0.6, 5, exact=False,
                             max_candidates=150, check_rows=40)
    assert generous.unproven_rows > 0 and generous.checked_rows == 40 and generous.checked_recall is not None
    if generous.checked_recall >= 0.999:  # served from the candidates: near the exact lists, measured
        assert recall_at_k(exact_indices, generous.indices) >= 0.99
        assert generous.fallback_rows < len(unit) // 2
    starved = bounded_top_k(unit, factors, visual_indices, visual_scores, (0, len(unit)), 0.6, 5, exact=False,
                            max_candidates=1, check_rows=40)
    assert starved.checked_recall is not None and starved.checked_recall < 0.999
    assert starved.unproven_rows == 0  # every unproven row was computed in full instead
    assert_same_lists(unit, factors, 0.6, rows, starved.indices, starved.scores, exact_indices, exact_scores)
    proven = bounded_top_k(unit, factors, visual_indices, visual_scores, (0, len(unit)), 0.6, 5, exact=True,
                           max_candidates=1)
    assert proven.unproven_rows == 0 and proven.checked_recall is None
    assert_same_lists(unit, factors, 0.6, rows, proven.indices, proven.scores, exact_indices, exact_scores)



@pytest.mark.parametrize("w", [0.3, 0.7])
def test_identical_rows_tie_exactly_and_come_by_index_on_every_hybrid_path(w: float) -> None:
    """Re-uploads: models whose picture and likes row are another's score exactly equal in the
    bound, the blended full pass and a refresh, and are listed by the lower index (issue 36)."""
    unit, factors = catalogue(4)
    rng = np.random.default_rng(4)
    copies = rng.choice(np.arange(2, len(unit)), size=(60, 2), replace=False)
    for source, copy in copies:  # each a copy of another: ties everywhere, at every rank
        unit[copy], factors[copy] = unit[source], factors[source]
    k, rows = 5, np.arange(len(unit))
    visual_indices, visual_scores = top_k_cosine(unit, 30, normalised=True)
    bounded = bounded_top_k(unit, factors, visual_indices, visual_scores, (0, len(unit)), w, k, query_block=64,
                            candidate_block=97, max_candidates=60, pair_budget=500)
    full_indices, full_scores = top_k_tiled(BlendedRows(unit, factors, w), k, (0, len(unit)), candidate_block=97)
    assert (bounded.indices == full_indices).all()  # the same models in the same order, ties included
    assert np.abs(bounded.scores - full_scores).max() <= 1e-6  # each path's float32 rounding elsewhere
    identical = {(int(a), int(b)) for a, b in copies} | {(int(b), int(a)) for a, b in copies}
    tied_pairs = 0
    for indices, scores in ((full_indices, full_scores), (bounded.indices, bounded.scores)):
        for row in rows:  # identical rows listed side by side score bit-equal, the lower index first
            for rank in range(k - 1):
                if (int(indices[row, rank]), int(indices[row, rank + 1])) in identical:
                    tied_pairs += 1
                    assert scores[row, rank] == scores[row, rank + 1]
                    assert indices[row, rank] < indices[row, rank + 1]
    assert tied_pairs > 100
