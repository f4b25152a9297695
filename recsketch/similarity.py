"""Exact cosine top-k, one row block at a time: memory grows with block×N, never N×N."""

from __future__ import annotations

import numpy as np

DEFAULT_BLOCK_BYTES = 256 * 1024 * 1024


def normalise(features: np.ndarray) -> np.ndarray:
    """L2-normalised float32 rows; all-zero rows stay zero (cosine 0 with everything)."""
    matrix = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


def block_rows_for(n_items: int, budget_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per block so that a block's float32 score matrix (plus sort scratch) fits the budget."""
    return max(1, min(n_items, budget_bytes // max(1, n_items * 4 * 3)))


def top_k_cosine(
    features: np.ndarray, k: int, block_rows: int | None = None, rows: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the ``k`` most cosine-similar other rows, best first.

    Returns (indices int64 [m, k'], scores float32 [m, k']) with k' = min(k, n - 1). A row is
    never its own neighbour; ties are broken by the lower index, so results are deterministic.
    ``rows=(first, last)`` computes only those query rows against all items (m = last - first):
    a shard, independent of the others.
    """
    features = np.asarray(features, dtype=np.float32)
    unit = normalise(features)
    n = unit.shape[0]
    first, last = rows or (0, n)
    kk = min(k, n - 1)
    indices = np.zeros((last - first, max(kk, 0)), dtype=np.int64)
    scores = np.zeros((last - first, max(kk, 0)), dtype=np.float32)
    if kk <= 0:
        return indices, scores
    step = block_rows or block_rows_for(n)
    for start in range(first, last, step):
        stop = min(last, start + step)
        block = unit[start:stop] @ unit.T  # [rows, n]
        rows = np.arange(stop - start)
        block[rows, rows + start] = -np.inf  # never recommend a model to itself
        candidates = np.argpartition(-block, kk - 1, axis=1)[:, :kk]
        candidate_scores = np.take_along_axis(block, candidates, axis=1)
        order = np.lexsort((candidates, -candidate_scores), axis=1)
        best = np.take_along_axis(candidates, order, axis=1)
        best_scores = np.take_along_axis(candidate_scores, order, axis=1)
        # argpartition picks arbitrarily among values tied with the k-th: redo those rows exactly
        kth = best_scores[:, -1:]
        tied = np.flatnonzero((block >= kth).sum(axis=1) > kk)
        for row in tied:
            exact = np.lexsort((np.arange(n), -block[row]))[:kk]
            best[row], best_scores[row] = exact, block[row, exact]
        # float32 dot products of identical unit vectors land a hair off 1.0: rescore those exactly
        rows_near_one, cols = np.nonzero(best_scores > 1.0 - 1e-5)
        if len(rows_near_one):
            a = features[start + rows_near_one].astype(np.float64)
            b = features[best[rows_near_one, cols]].astype(np.float64)
            exact = np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            best_scores[rows_near_one, cols] = np.minimum(exact, 1.0)
            order = np.lexsort((best, -best_scores), axis=1)
            best, best_scores = np.take_along_axis(best, order, 1), np.take_along_axis(best_scores, order, 1)
        indices[start - first : stop - first], scores[start - first : stop - first] = best, best_scores
    return indices, scores
