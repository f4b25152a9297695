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
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import sparse

from recsketch.similarity import exact_largest, normalise

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


@dataclass
class BoundStats:
    """How much of a full blended pass the bounded top-k computed."""

    rows: int = 0
    candidates: int = 0  # pairs that were scored exactly beyond the rows' visual lists
    full_tiles: int = 0  # (row block, column tile) pairs computed in full: too many candidates
    tiles: int = 0

    def add(self, other: BoundStats) -> None:
        self.rows += other.rows
        self.candidates += other.candidates
        self.full_tiles += other.full_tiles
        self.tiles += other.tiles


def bounded_top_k(visual, factors, visual_indices: np.ndarray, visual_scores: np.ndarray, rows: tuple[int, int],
                  k: int, cf_weight: float, query_block: int = 1024, candidate_block: int = 32768,
                  full_tile_share: float = 0.25) -> tuple[np.ndarray, np.ndarray, BoundStats]:
    """The exact hybrid top-k of rows first..last without the blended N x (d + 64) pass.

    A pair's hybrid score is ``h = (1 - w) v + w c`` (``v`` the visual cosine of the unit rows
    ``visual``, ``c`` the cosine of the unit CF ``factors``). Every row's exact visual top-k is
    known (``visual_indices``/``scores``), so any model outside its list has ``v <= v_k``, the
    list's k-th score, and ``h <= (1 - w) v_k + w c``. The CF scores of every pair are computed
    (a 64-d product); a model outside the visual list is scored exactly only when that bound
    reaches the row's running k-th best ``h``: every model left out provably scores below
    k models kept. A tile with too many such models is computed in full. Equal to the blended
    pass (ties by the lower index, near-1.0 scores in float64), at ~64 / (d + 64) of its cost
    plus the models scored exactly.

    Not in the pipeline yet: with visual lists of the served depth (k = 10) the bound leaves
    ~14 % of pairs open on clustered data (20 groups of 100, w = 0.3-0.7) and every tile falls
    back to the full product, so it saves nothing there; it needs visual lists deeper than a
    group (kept by the visual stage, at the price of more rows to refresh a day).
    """
    n = factors.shape[0]
    first, last = rows
    kk = min(k, n - 1)
    w = float(cf_weight)
    indices = np.zeros((last - first, max(kk, 0)), dtype=np.int64)
    scores = np.zeros((last - first, max(kk, 0)), dtype=np.float32)
    stats = BoundStats(rows=last - first)
    if kk <= 0:
        return indices, scores, stats
    if visual_indices.shape[1] < kk:
        raise ValueError(f"the visual lists hold {visual_indices.shape[1]} neighbours, fewer than k = {kk}")
    for q_start in range(first, last, query_block):
        q_stop = min(last, q_start + query_block)
        q_rows = np.arange(q_start, q_stop)
        q_visual = np.asarray(visual[q_start:q_stop], dtype=np.float32)
        q_factors = np.asarray(factors[q_start:q_stop], dtype=np.float32)
        known = visual_indices[q_start:q_stop, :kk]
        known_cf = np.einsum("id,ikd->ik", q_factors, np.asarray(factors[known.ravel()], np.float32).reshape(
            len(q_rows), kk, -1))
        best = known.copy()
        best_scores = ((1 - w) * visual_scores[q_start:q_stop, :kk] + w * known_cf).astype(np.float32)
        order = np.lexsort((best, -best_scores), axis=1)
        best, best_scores = np.take_along_axis(best, order, 1), np.take_along_axis(best_scores, order, 1)
        ceiling = (1 - w) * visual_scores[q_start:q_stop, kk - 1]  # the visual part of the bound
        for c_start in range(0, n, candidate_block):
            c_stop = min(n, c_start + candidate_block)
            stats.tiles += 1
            cf = q_factors @ np.asarray(factors[c_start:c_stop], dtype=np.float32).T
            bound = ceiling[:, None] + w * cf
            open_ = bound >= best_scores[:, -1:]
            own = np.arange(max(q_start, c_start), min(q_stop, c_stop))
            open_[own - q_start, own - c_start] = False  # never a model itself
            rows_in, cols_in = np.nonzero((known >= c_start) & (known < c_stop))
            open_[rows_in, known[rows_in, cols_in] - c_start] = False  # the visual lists' models: scored already
            if not open_.any():
                continue
            tile = np.full(cf.shape, -np.inf, dtype=np.float32)
            columns = np.flatnonzero(open_.any(axis=0))
            if len(columns) > full_tile_share * (c_stop - c_start):
                stats.full_tiles += 1
                visual_tile = q_visual @ np.asarray(visual[c_start:c_stop], dtype=np.float32).T
                exact = (1 - w) * visual_tile + w * cf
                tile[open_] = exact[open_]
                stats.candidates += int(open_.sum())
            else:
                picked = np.asarray(visual[c_start + columns], dtype=np.float32)
                visual_part = q_visual @ picked.T
                sub_open = open_[:, columns]
                sub = np.full(sub_open.shape, -np.inf, dtype=np.float32)
                sub[sub_open] = ((1 - w) * visual_part + w * cf[:, columns])[sub_open]
                tile[:, columns] = sub
                stats.candidates += int(sub_open.sum())
            take = min(kk, c_stop - c_start)
            candidates, values = exact_largest(tile, take)
            merged = np.concatenate([best, candidates + c_start], axis=1)
            merged_scores = np.concatenate([best_scores, values], axis=1)
            order = np.lexsort((merged, -merged_scores), axis=1)[:, :kk]
            best, best_scores = np.take_along_axis(merged, order, 1), np.take_along_axis(merged_scores, order, 1)
        best, best_scores = _rescore_hybrid_near_one(visual, factors, w, q_rows, best, best_scores)
        indices[q_start - first:q_stop - first], scores[q_start - first:q_stop - first] = best, best_scores
    return indices, scores, stats


def _rescore_hybrid_near_one(visual, factors, w: float, q_rows: np.ndarray, best: np.ndarray,
                             best_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Near-identical models score a hair off 1.0 in float32: rescored in float64, as the
    blended pass rescores its rows, and re-sorted."""
    rows_near_one, cols = np.nonzero(best_scores > 1.0 - 1e-5)
    if len(rows_near_one):
        a_rows, b_rows = q_rows[rows_near_one], best[rows_near_one, cols]
        v = _cosine64(np.asarray(visual[a_rows], np.float64), np.asarray(visual[b_rows], np.float64))
        c = _cosine64(np.asarray(factors[a_rows], np.float64), np.asarray(factors[b_rows], np.float64))
        best_scores[rows_near_one, cols] = np.minimum((1 - w) * v + w * c, 1.0)
        order = np.lexsort((best, -best_scores), axis=1)
        best, best_scores = np.take_along_axis(best, order, 1), np.take_along_axis(best_scores, order, 1)
    return best, best_scores


def _cosine64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.where(norms > 0, norms, 1.0)
