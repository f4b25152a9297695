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

import logging
from typing import Protocol

import numpy as np
from scipy import sparse

from recsketch.similarity import normalise

log = logging.getLogger(__name__)

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
    mapping = fit.solve(ridge)
    _say_if_sampled(fit)
    return hybrid_factors(unit, item_factors, liked, mapping)


def _say_if_sampled(fit: RidgeFit) -> None:
    if fit.sampled:
        log.info("hybrid: the cold-start map of %d-d features was fitted in the dual on the first %d of %d liked "
                 "models", fit.kept[0][0].shape[1], fit.dual_max_rows, fit.rows)


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


PRIMAL_MAX_DIM = 4096  # wider features (VGG16 flattened: 25,088-d) are fitted in the dual
DUAL_MAX_ROWS = 4096  # rows kept for a dual fit; past this, the first ones (mids are random)


class RidgeFit:
    """W minimising ||X W - Y||² + ridge ||W||², fitted block by block.

    Up to ``primal_max_dim`` features the d x d Gram matrices are summed over row blocks, so
    the features of a million models never sit in memory at once. Wider features would need a
    d x d matrix of gigabytes (25,088² float64 is 5 GB), so they are fitted in the dual,
    ``W = Xᵀ (X Xᵀ + ridge I)⁻¹ Y``: the same map, from the rows themselves, on at most
    ``dual_max_rows`` of them (a sample of the first rows past that, which the log says)."""

    def __init__(self, dim: int, targets: int, primal_max_dim: int = PRIMAL_MAX_DIM,
                 dual_max_rows: int = DUAL_MAX_ROWS) -> None:
        self.primal = dim <= primal_max_dim
        self.gram = np.zeros((dim, dim)) if self.primal else None
        self.cross = np.zeros((dim, targets)) if self.primal else None
        self.kept: list[tuple[np.ndarray, np.ndarray]] = []
        self.dual_max_rows = dual_max_rows
        self.rows = 0

    @property
    def sampled(self) -> bool:
        return not self.primal and self.rows > self.dual_max_rows

    def add(self, features: np.ndarray, targets: np.ndarray) -> None:
        if self.gram is not None and self.cross is not None:
            block = np.asarray(features, dtype=np.float64)
            self.gram += block.T @ block
            self.cross += block.T @ np.asarray(targets, dtype=np.float64)
        else:
            room = self.dual_max_rows - sum(len(x) for x, _ in self.kept)
            if room > 0:
                self.kept.append((np.array(features[:room], np.float32), np.array(targets[:room], np.float64)))
        self.rows += len(features)

    def solve(self, ridge: float = DEFAULT_RIDGE) -> np.ndarray | None:
        """The map (d x targets), or None when fewer than two rows were added (nothing to fit)."""
        if self.rows < 2:
            return None
        if self.gram is not None and self.cross is not None:
            return np.linalg.solve(self.gram + ridge * np.eye(len(self.gram)), self.cross)
        x = np.concatenate([features for features, _ in self.kept]).astype(np.float64)
        y = np.concatenate([targets for _, targets in self.kept])
        return x.T @ np.linalg.solve(x @ x.T + ridge * np.eye(len(x)), y)


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
    _say_if_sampled(fit)
    sink.open(n, unit.shape[1] + item_factors.shape[1])
    for first, last in blocks:
        sink.put(np.arange(first, last), hybrid_rows(unit[first:last], item_factors[first:last], liked[first:last],
                                                     mapping, cf_weight))
