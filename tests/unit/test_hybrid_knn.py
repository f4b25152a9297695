"""The hybrid whose likes half is ItemKNN (``hybrid.knn_top_k``): from the exact visual lists and
each row's co-liked models, it equals the exact blend of visual cosines and like-matrix cosines
over every pair, whatever the weight, the lists' depth, or how worn a list is."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from recsketch.hybrid import knn_top_k, like_columns
from recsketch.similarity import normalise, top_k_cosine


def catalogue(seed: int, n: int = 400, users: int = 300) -> tuple[np.ndarray, sparse.csr_matrix]:
    """Clustered unit features and sparse likes of clustered tastes; some models nobody liked."""
    rng = np.random.default_rng(seed)
    unit = normalise(rng.normal(size=(10, 16))[rng.integers(10, size=n)] + 0.7 * rng.normal(size=(n, 16)))
    taste = rng.integers(8, size=users)
    group = rng.integers(8, size=n)
    liked = (rng.random((users, n)) < np.where(taste[:, None] == group[None, :], 0.08, 0.005))
    liked[:, ::9] = False  # nobody liked these: ItemKNN has no cosines for them
    return unit.astype(np.float32), sparse.csr_matrix(liked.astype(np.float32))


def exact(unit: np.ndarray, likes: sparse.csr_matrix, w: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    columns = like_columns(likes).toarray().astype(np.float64)
    scores = (1 - w) * (unit.astype(np.float64) @ unit.T) + w * (columns @ columns.T)
    np.fill_diagonal(scores, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(scores)), scores.shape), -scores), axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, 1)


def test_like_columns_are_itemknn_cosines() -> None:
    likes = sparse.csr_matrix(np.array([[1, 1, 0], [1, 0, 1], [1, 1, 0]], dtype=np.float32))
    columns = like_columns(likes).toarray()
    assert columns @ columns.T == pytest.approx(np.array([[1, 2 / np.sqrt(6), 1 / np.sqrt(3)],
                                                           [2 / np.sqrt(6), 1, 0],
                                                           [1 / np.sqrt(3), 0, 1]]), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("w", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("depth", [5, 30])
@pytest.mark.parametrize("pair_block", [1, 400])  # every row alone (each past the block), or rows grouped
def test_knn_hybrid_equals_the_exact_blend(seed: int, w: float, depth: int, pair_block: int) -> None:
    unit, likes = catalogue(seed)
    visual_indices, visual_scores = top_k_cosine(unit, depth, normalised=True)
    visual_indices[::4, 8:], visual_scores[::4, 8:] = -1, -np.inf  # worn by deletions, still >= k
    visual_indices[1::7, 2:], visual_scores[1::7, 2:] = -1, -np.inf  # shorter than k: recomputed
    expected_indices, expected_scores = exact(unit, likes, w, 5)
    indices, scores, pairs = knn_top_k(unit, like_columns(likes), visual_indices[50:350], visual_scores[50:350],
                                       (50, 350), w, 5, pair_block=pair_block)
    assert pairs > 0
    np.testing.assert_allclose(scores, expected_scores[50:350], atol=1e-6)
    differ = indices != expected_indices[50:350]
    assert differ.mean() <= 0.002  # only float32 near-ties may order otherwise
    assert (indices != np.arange(50, 350)[:, None]).all()  # never a model's own neighbour
    visual_top = top_k_cosine(unit, 5, normalised=True)[0][50:350]
    assert (indices != visual_top).any(axis=1).mean() > 0.2  # the likes half moved lists: not the visual ones again


def test_auto_leaves_itemknn_out_where_most_pairs_share_a_liker() -> None:
    """ItemKNN's hybrid scores every co-liked pair: where users like most of the catalogue it
    would be a full blended pass every day, so auto does not take it there."""
    from recsketch.hybrid import knn_affordable, knn_pairs_bound

    _, sparse_likes = catalogue(0)
    assert knn_pairs_bound(sparse_likes) == int((np.diff(sparse_likes.indptr) ** 2).sum())
    dense = sparse.csr_matrix(np.ones((3000, 2000), dtype=np.float32))  # 3,000 users liking all 2,000 models
    assert knn_affordable(sparse_likes) and not knn_affordable(dense)


def test_identical_models_tie_exactly_and_come_by_index() -> None:
    """Re-uploads liked by the same users: their ItemKNN hybrid scores are bit-equal and the
    lower index comes first, the same models as the exact float64 blend (issue 36)."""
    unit, likes = catalogue(3)
    likes = likes.tolil()
    rng = np.random.default_rng(3)
    copies = rng.choice(np.arange(1, 400, 9) + 1, size=(20, 2), replace=False)  # liked models only
    for source, copy in copies:
        unit[copy] = unit[source]
        likes[:, copy] = likes[:, source]
    likes = likes.tocsr()
    visual_indices, visual_scores = top_k_cosine(unit, 30, normalised=True)
    indices, scores, _ = knn_top_k(unit, like_columns(likes), visual_indices, visual_scores, (0, 400), 0.5, 5)
    expected, _ = exact(unit, likes, 0.5, 5)
    assert (indices == expected).all()
    identical = {(int(a), int(b)) for a, b in copies} | {(int(b), int(a)) for a, b in copies}
    tied = [(row, rank) for row in range(400) for rank in range(4)
            if (int(indices[row, rank]), int(indices[row, rank + 1])) in identical]
    assert len(tied) > 10
    assert all(scores[row, rank] == scores[row, rank + 1] and indices[row, rank] < indices[row, rank + 1]
               for row, rank in tied)
