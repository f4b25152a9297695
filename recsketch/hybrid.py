"""Hybrid neighbours: what the pictures say and what the likes say, in one embedding.

A model's hybrid embedding is ``[sqrt(1 - w) × its unit visual features, sqrt(w) × its unit
ALS item factors]``: a unit vector whose cosine with another's is ``(1 - w) × visual cosine
+ w × CF cosine``, so the exact top-k machinery of the visual neighbours serves it unchanged.
``w`` is the CF weight ``recsketch evaluate`` tunes on held-out likes. A model nobody has
liked has no ALS factors: its factors are predicted from its visual features by a ridge
regression fitted on the liked models (the DropoutNet idea, linear), so it still gets
neighbours that carry taste.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from scipy import sparse

from recsketch.similarity import normalise

DEFAULT_RIDGE = 1.0  # the cold-start map's regularisation (EvaluationConfig.ridge defaults to it)


def fit_als(likes: sparse.csr_matrix, *, factors: int = 64, regularization: float = 0.05, alpha: float = 2.0,
            iterations: int = 15, seed: int = 0, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(user factors, item factors) of implicit's ALS on a users × items like matrix."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit runs its own threads; BLAS threads on top only contend
        model = AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha,
                                        iterations=iterations, random_state=seed, num_threads=threads)
        model.fit(likes.tocsr().astype(np.float32), show_progress=False)
    return np.asarray(model.user_factors), np.asarray(model.item_factors)


def complete_factors(unit: np.ndarray, item_factors: np.ndarray, liked: np.ndarray,
                     ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """Unit CF factors for every model: ALS's where the model was liked, else predicted from its
    visual features by ridge regression fitted on the liked ones."""
    liked = np.asarray(liked, dtype=bool)
    fit = RidgeFit(unit.shape[1], item_factors.shape[1])
    if not liked.all():  # a map only when some model needs one
        fit.add(unit[liked], normalise(item_factors[liked]))
    return hybrid_factors(unit, item_factors, liked, fit.solve(ridge))


def hybrid_factors(unit: np.ndarray, item_factors: np.ndarray, liked: np.ndarray,
                   mapping: np.ndarray | None) -> np.ndarray:
    """Unit CF factors of a block of models: ALS's where liked, else predicted by ``mapping``."""
    factors = normalise(item_factors)
    cold = ~np.asarray(liked, dtype=bool)
    if mapping is not None and cold.any():
        factors[cold] = normalise(np.asarray(unit[cold], np.float64) @ mapping)
    return factors


def hybrid_embedding(unit: np.ndarray, factors: np.ndarray, cf_weight: float) -> np.ndarray:
    """Unit rows whose dot products are ``(1 - cf_weight) × visual cosine + cf_weight × CF cosine``."""
    if not 0.0 <= cf_weight <= 1.0:
        raise ValueError(f"the CF weight is a share: between 0 and 1, not {cf_weight}")
    return np.hstack([np.sqrt(1.0 - cf_weight) * np.asarray(unit, np.float32),
                      np.sqrt(cf_weight) * normalise(factors)]).astype(np.float32)


class RidgeFit:
    """W minimising ||X W - Y||² + ridge ||W||², fitted block by block (the Gram matrices summed
    over row blocks), so the features of a million models never sit in memory at once."""

    def __init__(self, dim: int, targets: int) -> None:
        self.gram = np.zeros((dim, dim))
        self.cross = np.zeros((dim, targets))
        self.rows = 0

    def add(self, features: np.ndarray, targets: np.ndarray) -> None:
        block = np.asarray(features, dtype=np.float64)
        self.gram += block.T @ block
        self.cross += block.T @ np.asarray(targets, dtype=np.float64)
        self.rows += len(block)

    def solve(self, ridge: float = DEFAULT_RIDGE) -> np.ndarray | None:
        """The map, or None when fewer than two rows were added (nothing to fit)."""
        if self.rows < 2:
            return None
        return np.linalg.solve(self.gram + ridge * np.eye(len(self.gram)), self.cross)


def hybrid_rows(unit: np.ndarray, item_factors: np.ndarray, liked: np.ndarray, mapping: np.ndarray | None,
                cf_weight: float) -> np.ndarray:
    """A block of :func:`hybrid_embedding` rows, the cold models' factors predicted by ``mapping``
    (a :class:`RidgeFit` solved over every block first)."""
    return hybrid_embedding(unit, hybrid_factors(unit, item_factors, liked, mapping), cf_weight)


BLOCK_ROWS = 16_384  # features read per step: 80 MB at 1,280-d


class RowWriter(Protocol):
    def open(self, rows: int, dim: int) -> None: ...
    def put(self, positions: np.ndarray, rows: np.ndarray) -> None: ...


def write_embedding(unit, item_factors: np.ndarray, liked: np.ndarray, cf_weight: float, sink: RowWriter,
                    block_rows: int = BLOCK_ROWS) -> None:
    """Every model's hybrid row into ``sink``, streaming ``unit`` (an array or ``NpyRows``) twice
    in row blocks: first to fit the cold-start map on the liked models, then to write the rows.
    Memory holds the factors and one block of features, never N x d."""
    n = unit.shape[0]
    blocks = [(first, min(n, first + block_rows)) for first in range(0, n, block_rows)]
    fit = RidgeFit(unit.shape[1], item_factors.shape[1])
    for first, last in blocks:
        keep = liked[first:last]
        fit.add(unit[first:last][keep], normalise(item_factors[first:last][keep]))
    mapping = None if liked.all() else fit.solve()
    sink.open(n, unit.shape[1] + item_factors.shape[1])
    for first, last in blocks:
        sink.put(np.arange(first, last), hybrid_rows(unit[first:last], item_factors[first:last], liked[first:last],
                                                     mapping, cf_weight))
