"""Hybrid neighbours: what the pictures say and what the likes say, in one embedding.

A model's hybrid embedding is ``[sqrt(1 - w) × its unit visual features, sqrt(w) × its likes
row]``, whose dot product with another's is ``(1 - w) × visual cosine + w × likes
similarity``, so the exact top-k machinery of the visual neighbours serves it unchanged
(:class:`BlendedRows`: the rows are made per tile, never written). The likes rows are ALS's
item factors whitened (:func:`likes_rows`): their dot products sum, over the models a user
liked, to ALS's own score for the user, which the cosines of the raw factors do not. Once a
day's exact visual lists are known to some depth, the hybrid lists follow from them and one
scan of the f-d likes rows (:func:`bounded_top_k`), exactly, for a small share of the blended
pass's work. ``w`` is the CF weight ``recsketch evaluate`` tunes on held-out likes. A model
nobody has liked has no ALS factors: its likes row is predicted from its visual features by a
ridge regression fitted on the liked models (the DropoutNet idea, linear), so it still gets
neighbours that carry taste.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from recsketch import kernel

log = logging.getLogger(__name__)

DEFAULT_RIDGE = 1.0  # the cold-start map's regularisation (EvaluationConfig.ridge defaults to it)
DEFAULT_REGULARIZATION = 0.05  # ALS's, where nothing chose one (EvaluationConfig.regularization defaults to it)


def fit_als(likes: sparse.csr_matrix, *, factors: int = 64, regularization: float = DEFAULT_REGULARIZATION,
            alpha: float = 2.0, iterations: int = 15, seed: int = 0, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(user factors, item factors) of implicit's ALS on a users × items like matrix."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit runs its own threads; BLAS threads on top only contend
        model = AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha,
                                        iterations=iterations, random_state=seed, num_threads=threads)
        model.fit(likes.tocsr().astype(np.float32), show_progress=False)
    return np.asarray(model.user_factors), np.asarray(model.item_factors)


def likes_rows(item_factors: np.ndarray, regularization: float, liked: np.ndarray | None = None) -> np.ndarray:
    """ALS's item factors Y as the rows the likes half of the hybrid compares: ``z = W½ y`` with
    ``W = (YᵀY + λI)⁻¹`` (λ: the fit's regularization), so ``z_i · z_j = y_iᵀ W y_j`` and a
    user's summed similarity to the models they liked is ALS's own score for them (ALS's user
    factor is ``W' Σ_liked y_j``, where ``W'`` adds the user's confidence term to ``YᵀY``).
    Cosines of the raw factors drop their norms, which carry what ALS learnt of popularity:
    on MovieLens-100K, summed they rank at NDCG@10 0.168 where ALS ranks at 0.292; these rows
    rank at 0.293. Scaled to a mean squared norm of 1 over the ``liked`` models (default: rows
    that are not zero), so the CF weight reads on the visual cosine's scale."""
    y = np.asarray(item_factors, dtype=np.float32)
    return y @ whitening(y, regularization, liked)


def whitening(item_factors: np.ndarray, regularization: float, liked: np.ndarray | None = None) -> np.ndarray:
    """The f x f map of :func:`likes_rows` (``rows = Y @ map``), kept by a fit that folds new
    models in later (``recsketch.likes_fit``): their rows are then on the fit's scale."""
    y = np.asarray(item_factors, dtype=np.float32)
    gram = np.zeros((y.shape[1], y.shape[1]))
    for first in range(0, len(y), BLOCK_ROWS):  # in float64, by blocks: memory holds one N x f copy, the rows
        block = y[first:first + BLOCK_ROWS].astype(np.float64)
        gram += block.T @ block
    values, vectors = np.linalg.eigh(gram + regularization * np.eye(y.shape[1]))
    root = ((vectors / np.sqrt(np.maximum(values, 1e-12))) @ vectors.T).astype(np.float32)
    squares = np.zeros(len(y))
    for first in range(0, len(y), BLOCK_ROWS):
        part = y[first:first + BLOCK_ROWS] @ root
        squares[first:first + BLOCK_ROWS] = np.einsum("ij,ij->i", part, part, dtype=np.float64)
    chosen = squares > 0 if liked is None else np.asarray(liked, dtype=bool)
    mean = float(squares[chosen].mean()) if chosen.any() else 0.0
    return (root / np.float32(np.sqrt(mean) if mean > 0 else 1.0)).astype(np.float32)


def complete_factors(unit: np.ndarray, item_factors: np.ndarray, liked: np.ndarray,
                     ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """Likes rows (:func:`likes_rows`) for every model: ``item_factors``' where the model was
    liked, else predicted from its visual features by ridge regression fitted on the liked ones."""
    liked = np.asarray(liked, dtype=bool)
    fit = RidgeFit(unit.shape[1], item_factors.shape[1])
    if not liked.all():  # a map only when some model needs one
        fit.add(unit[liked], item_factors[liked])
    mapping = fit.solve(ridge)
    _say_if_sampled(fit)
    return hybrid_factors(unit, item_factors, liked, mapping)


def _say_if_sampled(fit: RidgeFit) -> None:
    if fit.sampled:
        log.info("hybrid: the cold-start map of %d-d features was fitted in the dual on the first %d of %d liked "
                 "models", fit.kept[0][0].shape[1], fit.dual_max_rows, fit.rows)


def hybrid_factors(unit: np.ndarray | None, item_factors: np.ndarray, liked: np.ndarray,
                   mapping: np.ndarray | None) -> np.ndarray:
    """Likes rows of a block of models: ``item_factors``' (already :func:`likes_rows`) where
    liked, else predicted by ``mapping`` (zero without one)."""
    factors = np.array(item_factors, dtype=np.float32)
    cold = ~np.asarray(liked, dtype=bool)
    if mapping is not None and unit is not None and cold.any():
        factors[cold] = (np.asarray(unit[cold], np.float64) @ mapping).astype(np.float32)
    return factors


def hybrid_embedding(unit: np.ndarray, factors: np.ndarray, cf_weight: float) -> np.ndarray:
    """Rows whose dot products are ``(1 - cf_weight) × visual cosine + cf_weight × likes similarity``
    (the dot product of the likes rows)."""
    if not 0.0 <= cf_weight <= 1.0:
        raise ValueError(f"the CF weight is a share: between 0 and 1, not {cf_weight}")
    return np.hstack([np.sqrt(1.0 - cf_weight) * np.asarray(unit, np.float32),
                      np.sqrt(cf_weight) * np.asarray(factors, np.float32)]).astype(np.float32)


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


BLOCK_ROWS = 16_384  # features read per step: 80 MB at 1,280-d


def stream_factors(unit, item_factors: np.ndarray, liked: np.ndarray, block_rows: int | None = None,
                   ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """:func:`complete_factors` over ``unit`` an array or ``NpyRows``, streamed in row blocks:
    the cold-start map is fitted on the liked models' blocks, then each block's cold models get
    theirs. Memory holds the N x f factors and one block of features, never N x d."""
    n, step = unit.shape[0], block_rows or BLOCK_ROWS
    blocks = [(first, min(n, first + step)) for first in range(0, n, step)]
    fit = RidgeFit(unit.shape[1], item_factors.shape[1])
    if not liked.all():  # a map only when some model needs one
        for first, last in blocks:
            keep = liked[first:last]
            fit.add(unit[first:last][keep], item_factors[first:last][keep])
    mapping = fit.solve(ridge)
    _say_if_sampled(fit)
    out = np.zeros(item_factors.shape, dtype=np.float32)
    for first, last in blocks:
        block_liked = liked[first:last]
        needs_map = mapping is not None and not block_liked.all()  # read features only for cold models
        out[first:last] = hybrid_factors(unit[first:last] if needs_map else None, item_factors[first:last],
                                         block_liked, mapping if needs_map else None)
    return out


class BlendedRows:
    """The hybrid embedding's rows, made on demand from the unit visual rows (an array or
    ``NpyRows``) and the likes rows (in memory): what ``similarity.top_k_tiled`` reads as if the
    N x (d + f) matrix were written, which it never is. Its rows are not unit vectors: scores
    are dot products (``cosine = False``), and may pass 1."""

    cosine = False

    def __init__(self, unit, factors: np.ndarray, cf_weight: float) -> None:
        if unit.shape[0] != len(factors):
            raise ValueError(f"{unit.shape[0]} visual rows but {len(factors)} factor rows")
        self.unit, self.factors, self.cf_weight = unit, factors, cf_weight
        self.shape = (unit.shape[0], unit.shape[1] + factors.shape[1])

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        return hybrid_embedding(self.unit[key], self.factors[key], self.cf_weight)

    def exact_scores(self, queries: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """The hybrid score of each (query row, column) pair in float64, ``(1 - w) v + w c`` with
        the visual cosine ``v`` as the visual lists hold it (``kernel.exact_scores``) and the
        factors' dot product ``c``: what ties are settled by, on every path."""
        from recsketch.similarity import _exact_pair_scores

        visual = _exact_pair_scores(self.unit, queries, columns).astype(np.float64)
        likes = np.einsum("ij,ij->i", self.factors[queries].astype(np.float64),
                          self.factors[columns].astype(np.float64))
        return (1 - self.cf_weight) * visual + self.cf_weight * likes

    def product(self, query: np.ndarray, start: int, stop: int) -> np.ndarray:
        """``query @ self[start:stop].T`` for blended query rows, as two products over the
        visual and the factor rows as read: no blended copy of the candidates is made."""
        d, w = self.unit.shape[1], self.cf_weight
        visual = np.asarray(self.unit[start:stop], dtype=np.float32)
        scores = (np.sqrt(1.0 - w) * query[:, :d]).astype(np.float32) @ visual.T
        scores += (np.sqrt(w) * query[:, d:]).astype(np.float32) @ self.factors[start:stop].T
        return scores


@dataclass(frozen=True)
class BoundedResult:
    indices: np.ndarray
    scores: np.ndarray
    fallback_rows: int  # rows computed against every model (worn lists; in exact mode, every unsettled row)
    candidates: int  # (row, model) pairs scored beyond the visual lists
    unproven_rows: int = 0  # rows served from their candidates without the bound's proof (measured mode)
    checked_rows: int = 0  # unproven rows also computed against every model, to measure them
    checked_recall: float | None = None  # recall@k of the unproven rows' candidate lists on the checked ones


SCAN_TILE = 1 << 20  # scores in a scan tile (2 MiB in bfloat16): past ~4 MiB it leaves the cache, 1.7x slower
EPSILON = 1e-6  # slack on the bound for float32 rounding (the blended full pass rounds otherwise)
MIN_RECALL = 0.999  # measured mode: below this on the checked rows, every unproven row is computed in full


def bounded_top_k(unit, factors: np.ndarray, visual_indices: np.ndarray, visual_scores: np.ndarray,
                  rows: tuple[int, int] | np.ndarray, cf_weight: float, k: int, *, exact: bool = True,
                  max_candidates: int | None = None, check_rows: int = 20, query_block: int = 2048,
                  candidate_block: int | None = None,
                  pair_budget: int = 8_000_000) -> BoundedResult:
    """The hybrid top-k of rows ``first..last`` (or of the rows an index array names: a
    refresh's dirty rows) without the N x (d + f) blended pass.

    ``visual_indices``/``visual_scores`` (those rows, in that order, -1 / -inf pads) are each row's exact
    visual top-D. A model j outside row i's list has visual cosine ``v(i, j) ≤ v_D`` (the list's
    last score), so its hybrid score ``(1 - w) v + w c`` is at most ``(1 - w) v_D + w c(i, j)``.
    With ``s_k`` the k-th best hybrid score among the listed models, j can only enter the top-k
    if ``c(i, j) ≥ τ = (s_k - (1 - w) v_D) / w``: one scan of the f-d factors (f = 64 against the
    blended d + f) finds those j, their visual cosines are read for just those pairs, and the
    merged list is exact (proven). A scan tile holds ``SCAN_TILE`` scores (candidate blocks of 512
    for 2,048 queries): a 64-d product is bound by its output, which then stays in cache for the
    threshold.

    A row whose τ admits more than ``max_candidates`` models (default N / 1000, at least 256:
    each pair costs ~30 columns of a full row) is not settled by the bound. ``exact``: such rows
    are computed against every model. Else (measured mode) they are ranked among their visual
    list and their CF top-``max_candidates``, and ``check_rows`` of them are also computed in
    full: if the candidates' recall@k on those is below ``MIN_RECALL``, every unproven row is
    computed in full. A worn list shorter than k is always computed in full. ``unit``: array
    or ``NpyRows``; memory holds the factors, a query block's tiles and the pending pairs."""
    from recsketch.similarity import _empty_lists, recall_at_k, top_k_tiled

    row_ids = query_ids(rows)
    count = len(row_ids)
    n = len(factors)
    kk, indices, scores = _empty_lists(count, n, k)
    if kk <= 0:
        return BoundedResult(indices, scores, 0, 0)
    if cf_weight == 0.0:  # the hybrid is the visual list
        return BoundedResult(visual_indices[:, :kk].copy(), visual_scores[:, :kk].copy(), 0, 0)
    cap = max(256, n // 1000) if max_candidates is None else max_candidates
    factors = np.asarray(factors, dtype=np.float32)
    factor_side = kernel.Side(factors, kernel.scan_precision())  # rounded once for every query block
    fallback = np.zeros(count, dtype=bool)
    overflow = np.zeros(count, dtype=bool)
    listed_scores = np.full(visual_indices.shape, -np.inf, dtype=np.float32)
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    settled_from, pairs_seen = 0, 0
    for q_first in range(0, count, query_block):
        q = slice(q_first, min(count, q_first + query_block))
        block = candidate_block or max(256, SCAN_TILE // (q.stop - q.start))
        found = _scan(factor_side, visual_indices[q], visual_scores[q], row_ids[q], cf_weight, kk, cap, block,
                      listed_scores[q], fallback[q], overflow[q])
        pending.append((found[0] + q.start, found[1], found[2]))
        pairs_seen += len(found[0])
        over = q.start + np.flatnonzero(overflow[q])
        if exact:
            fallback[over] = True
        elif len(over):  # their CF top-cap joins their candidates (unproven)
            cf_indices, cf_values = top_k_tiled(factors, cap + visual_indices.shape[1], row_ids[over])
            owner = np.repeat(over, cf_indices.shape[1])
            listed = visual_indices[over]
            seen = np.isin(owner * n + cf_indices.ravel(),
                           (np.repeat(over, listed.shape[1]) * n + listed.ravel())[listed.ravel() >= 0])
            pending.append((owner[~seen], cf_indices.ravel()[~seen], cf_values.ravel()[~seen]))
            pairs_seen += int((~seen).sum())
        if sum(len(part[0]) for part in pending) >= pair_budget or q.stop == count:
            pair_rows, pair_cols, pair_cf = (np.concatenate(parts) for parts in zip(*pending, strict=True))
            _settle(unit, factors, cf_weight, kk, row_ids, (settled_from, q.stop), visual_indices, listed_scores,
                    fallback, pair_rows, pair_cols, pair_cf, indices, scores)
            pending, settled_from = [], q.stop
    blended = BlendedRows(unit, factors, cf_weight)
    unproven = np.flatnonzero(overflow & ~fallback)
    checked, recall = np.zeros(0, dtype=np.int64), None
    if len(unproven):
        checked = unproven[np.linspace(0, len(unproven) - 1, min(check_rows, len(unproven))).astype(np.int64)]
        exact_indices, exact_scores = top_k_tiled(blended, kk, row_ids[checked])
        recall = recall_at_k(exact_indices, indices[checked])
        indices[checked], scores[checked] = exact_indices, exact_scores
        if recall < MIN_RECALL:
            log.warning("hybrid: the unproven rows' candidates keep recall@%d = %.4f < %.3f on %d checked rows: "
                        "all %d computed in full", kk, recall, MIN_RECALL, len(checked), len(unproven))
            fallback[unproven] = True
    fallback[checked] = False
    again = np.flatnonzero(fallback)
    if len(again):
        indices[again], scores[again] = top_k_tiled(blended, kk, row_ids[again])
    still = int((overflow & ~fallback).sum()) - len(checked)
    return BoundedResult(indices, scores, len(again), pairs_seen, max(0, still), len(checked), recall)


def query_ids(rows: tuple[int, int] | np.ndarray) -> np.ndarray:
    """Row numbers of ``first..last``, or the given ones."""
    if isinstance(rows, tuple):
        return np.arange(rows[0], rows[1], dtype=np.int64)
    return np.asarray(rows, dtype=np.int64)


def _read_rows(unit, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of an array or ``NpyRows``: one read when they are a run, else row by row."""
    if len(ids) and int(ids[-1]) - int(ids[0]) == len(ids) - 1 and bool((np.diff(ids) == 1).all()):
        return np.asarray(unit[int(ids[0]):int(ids[-1]) + 1], dtype=np.float32)
    return np.asarray(unit[ids], dtype=np.float32)


def _scan(factor_side: kernel.Side, listed: np.ndarray, visual: np.ndarray, queries: np.ndarray, w: float, kk: int,
          cap: int, candidate_block: int, listed_scores: np.ndarray, fallback: np.ndarray, overflow: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One query block: its listed models' hybrid scores (into ``listed_scores``), its bound τ,
    and the (row, model, CF cosine) pairs past τ outside the lists, from one scan of the factors.
    Rows whose list is shorter than k are marked in ``fallback``, rows past ``cap`` pairs in
    ``overflow``; neither gives pairs."""
    factors = factor_side.rows
    n = len(factors)
    valid = listed >= 0
    query = factors[queries]
    cf = np.einsum("md,mjd->mj", query, factors[np.maximum(listed, 0)])
    with np.errstate(invalid="ignore"):  # pads: -inf x 0 where w = 1, masked by ``valid``
        listed_scores[:] = np.where(valid, (1 - w) * visual + w * cf, -np.inf)
    count = valid.sum(axis=1)
    kth = -np.sort(-listed_scores, axis=1)[:, kk - 1] if listed.shape[1] >= kk else np.full(len(count), -np.inf)
    last_visual = np.where(count > 0, visual[np.arange(len(count)), np.maximum(count - 1, 0)], -np.inf)
    complete = count >= n - 1  # the list holds every other model: nothing unseen
    threshold = np.where(complete, np.inf, (kth - (1 - w) * last_visual - EPSILON) / w)
    fallback |= (count < kk) & ~complete
    slack = cap + listed.shape[1]  # the listed models pass τ too: they are dropped below
    rows, cols, cfs = _hits(factor_side, factor_side.take(queries), threshold,
                            fallback, overflow, slack, candidate_block)
    listed_keys = (queries[:, None] * n + listed)[valid]
    keep = (cols != queries[rows]) & ~np.isin(queries[rows] * n + cols, listed_keys)  # self, and the listed
    rows, cols, cfs = rows[keep], cols[keep], cfs[keep]
    overflow |= np.bincount(rows, minlength=len(queries)) > cap
    keep = ~(fallback | overflow)[rows]
    return rows[keep], cols[keep], cfs[keep]


def _hits(factors: kernel.Side, query: kernel.Side, threshold: np.ndarray, fallback: np.ndarray,
          overflow: np.ndarray, slack: int, candidate_block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, model, CF cosine) with cosine ≥ the row's threshold, every model scanned: one pass
    over each tile for its rows' maxima, the comparison only for the rows that reach it.

    In bfloat16 (``kernel.scan_precision``: a 64-d product is bound by its output, which
    bfloat16 halves) a tile keeps what reaches threshold - ε (``kernel``'s proven bound), and
    the cosines of those are computed in float32 and compared again: the same pairs and values
    as a float32 scan of the listed models' kind (``np.einsum``), whatever found them."""
    taken = np.zeros(len(query.rows), dtype=np.int64)
    low = query.precision == "bf16"
    slack_f32 = query.rows.shape[1] * 2.0**-23  # the float32 confirmation's own rounding
    floor = kernel.round_down(threshold - kernel.error_bound(query, factors) - slack_f32, "bf16") if low \
        else threshold
    found_rows, found_cols, found_cf = [], [], []
    for c_start in range(0, len(factors.rows), candidate_block):
        block = factors.part(c_start, c_start + candidate_block)
        if low and query.low is not None and block.low is not None:
            torch = kernel.torch_module()
            tile_t = query.low @ block.low.T
            reach = tile_t.amax(dim=1).float().numpy()
            rows = np.flatnonzero((reach >= floor) & ~overflow & ~fallback)  # hits are rare: one pass
            if not len(rows):
                continue
            rows_t = torch.from_numpy(rows)
            near_rows_t, near_cols_t = torch.nonzero(
                tile_t[rows_t] >= torch.from_numpy(floor[rows].astype(np.float32)).to(torch.bfloat16)[:, None],
                as_tuple=True)  # floor is a bfloat16 number: the comparison is exact
            near_rows, near_cols = near_rows_t.numpy(), near_cols_t.numpy()
            values = np.einsum("ij,ij->i", query.rows[rows[near_rows]], block.rows[near_cols])
            hit = values >= threshold[rows[near_rows]]
            hit_rows, hit_cols, hit_cf = near_rows[hit], near_cols[hit], values[hit]
        else:
            tile = query.rows @ block.rows.T
            rows = np.flatnonzero((tile.max(axis=1) >= threshold) & ~overflow & ~fallback)
            if not len(rows):
                continue
            hit_rows, hit_cols = np.nonzero(tile[rows] >= threshold[rows, None])
            hit_cf = tile[rows[hit_rows], hit_cols]
        counts = np.bincount(hit_rows, minlength=len(rows))
        over = taken[rows] + counts > slack
        overflow[rows[over]] = True
        taken[rows] += counts
        keep = ~over[hit_rows]
        found_rows.append(rows[hit_rows[keep]])
        found_cols.append(hit_cols[keep] + c_start)
        found_cf.append(hit_cf[keep])
    return _joined(found_rows, found_cols, found_cf)


def _joined(rows: list[np.ndarray], cols: list[np.ndarray], cfs: list[np.ndarray]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(cfs)


def _settle(unit, factors: np.ndarray, w: float, kk: int, row_ids: np.ndarray, span: tuple[int, int],
            visual_indices: np.ndarray, listed_scores: np.ndarray, fallback: np.ndarray, pair_rows: np.ndarray,
            pair_cols: np.ndarray, pair_cf: np.ndarray, indices: np.ndarray, scores: np.ndarray) -> None:
    """Rows ``span`` (shard-local) that the bound settles: their pairs' visual cosines read,
    the pairs merged with the listed models, exactly by (-score, index)."""
    from recsketch.similarity import TIE_SPARE, merge_lists, settle_ties

    lo, hi = span
    settled = lo + np.flatnonzero(~fallback[lo:hi])
    if not len(settled):
        return
    pair_score = ((1 - w) * pair_visual(unit, row_ids[lo:hi], pair_rows - lo, pair_cols)
                  + w * pair_cf).astype(np.float32)
    slot = np.searchsorted(settled, pair_rows)
    order = np.lexsort((pair_cols, slot))
    slot, column, value = slot[order], pair_cols[order], pair_score[order]
    width = int(np.bincount(slot, minlength=1).max()) if len(slot) else 0
    extra = np.full((len(settled), max(width, 1)), -1, dtype=np.int64)  # each row's pairs, padded
    extra_scores = np.full(extra.shape, -np.inf, dtype=np.float32)
    rank = np.arange(len(slot)) - np.searchsorted(slot, slot)
    extra[slot, rank], extra_scores[slot, rank] = column, value
    wide = kk + TIE_SPARE  # every model tied with the k-th is a candidate (c >= tau): ties settled among them
    best, best_scores = merge_lists(visual_indices[settled], listed_scores[settled], extra, extra_scores, wide)
    best, best_scores = settle_ties(BlendedRows(unit, factors, w), row_ids[settled], best, best_scores)
    indices[settled], scores[settled] = best[:, :kk], best_scores[:, :kk]


def pair_visual(unit, query_rows: np.ndarray, pair_rows: np.ndarray, pair_cols: np.ndarray,
                block_rows: int = BLOCK_ROWS, pairs_per_step: int = 32_768) -> np.ndarray:
    """Visual cosines of (query row ``query_rows[pair_rows]``, model ``pair_cols``) pairs: ``unit``
    read once, block by block, for the blocks the pairs name; memory holds the queries, a block
    and a step of pairs."""
    out = np.zeros(len(pair_rows), dtype=np.float32)
    if not len(pair_rows):
        return out
    queries = _read_rows(unit, np.asarray(query_rows, dtype=np.int64))
    order = np.argsort(pair_cols, kind="stable")
    cols = pair_cols[order]
    for start in range(0, unit.shape[0], block_rows):
        lo, hi = np.searchsorted(cols, [start, start + block_rows])
        if lo == hi:
            continue
        block = np.asarray(unit[start : start + block_rows], dtype=np.float32)
        for step in range(lo, hi, pairs_per_step):
            picked = order[step : min(hi, step + pairs_per_step)]
            out[picked] = np.einsum("ij,ij->i", queries[pair_rows[picked]], block[pair_cols[picked] - start])
    return out


def like_columns(likes: sparse.csr_matrix) -> sparse.csr_matrix:
    """Each model's likers as a unit row (models x users, from a users x models like matrix):
    their dot products are ItemKNN's cosines, zero unless two models share a liker."""
    by_model = sparse.csr_matrix(likes.T, dtype=np.float32)
    by_model.sum_duplicates()
    norms = np.sqrt(np.asarray(by_model.multiply(by_model).sum(axis=1)).ravel())
    by_model.data /= np.repeat(np.where(norms > 0, norms, 1.0), np.diff(by_model.indptr)).astype(np.float32)
    return by_model


KNN_PAIR_BLOCK = 4_000_000  # co-liked pairs found at once (rows grouped by their bound): ~100 MB of pairs
KNN_MAX_SHARE = 0.05  # auto takes ItemKNN's half only while its pairs bound stays under this share of N²...
KNN_MIN_PAIRS = 2e8  # ...or under this many pairs (a small catalogue's full pass costs little)


def knn_pairs_bound(likes: sparse.csr_matrix) -> int:
    """At most how many (model, co-liked model) pairs ItemKNN's hybrid scores for a users x
    models like matrix: each user's likes paired with each other, Σ_u n_u²."""
    counts = np.diff(sparse.csr_matrix(likes).indptr).astype(np.int64)
    return int((counts * counts).sum())


def knn_affordable(likes: sparse.csr_matrix) -> bool:
    """Whether ItemKNN's hybrid costs a day's share of a full pass (``KNN_MAX_SHARE`` of its N²
    pairs; at least ``KNN_MIN_PAIRS``): a catalogue where most pairs share a liker would make
    every day a full blended pass."""
    n = likes.shape[1]
    return knn_pairs_bound(likes) <= max(KNN_MAX_SHARE * float(n) * n, KNN_MIN_PAIRS)


def knn_top_k(unit, columns: sparse.csr_matrix, visual_indices: np.ndarray, visual_scores: np.ndarray,
              rows: tuple[int, int], cf_weight: float, k: int,
              pair_block: int = KNN_PAIR_BLOCK) -> tuple[np.ndarray, np.ndarray, int]:
    """The hybrid top-k of rows ``first..last`` (indices, scores, and the co-liked pairs scored
    beyond the lists) when its likes half is ItemKNN: ``(1 - w) v + w c``
    with ``c`` the cosine of two models' likers (``like_columns``), exactly, from each row's exact
    visual top-D (D ≥ k) and the models that share a liker with it. A model in neither has
    ``c = 0`` and ``v ≤ v_D``, so it scores at most ``(1 - w) v_D``, which each of the D listed
    models reaches (``c ≥ 0``): the best k of the union are the best k of all, ties by the lower
    index as the visual lists break them. A row whose list holds fewer than k models (worn by
    deletions) gets its exact visual top-k first. Cost: the pairs of co-liked models, each read
    once (``pair_visual``); memory holds about ``pair_block`` pairs (rows grouped by how many
    co-liked models they can have; a row past it alone)."""
    from recsketch.similarity import TIE_SPARE, _empty_lists, settle_ties, top_k_tiled

    first, last = rows
    n = columns.shape[0]
    kk, indices, scores = _empty_lists(last - first, n, k)
    if kk <= 0:
        return indices, scores, 0
    wide = min(kk + TIE_SPARE, n - 1)  # ties at the k-th place settled among a few more
    indices = np.full((last - first, wide), -1, dtype=np.int64)
    scores = np.full((last - first, wide), -np.inf, dtype=np.float32)
    pairs = 0
    listed, listed_scores = np.asarray(visual_indices), np.asarray(visual_scores, dtype=np.float32)
    short = np.flatnonzero((listed >= 0).sum(axis=1) < kk)
    if len(short):  # too short to bound anything: the row's exact visual top-k instead
        width = max(listed.shape[1], kk)
        listed = np.pad(listed, ((0, 0), (0, width - listed.shape[1])), constant_values=-1)
        listed_scores = np.pad(listed_scores, ((0, 0), (0, width - listed_scores.shape[1])),
                               constant_values=-np.inf)
        exact_indices, exact_scores = top_k_tiled(unit, kk, first + short)
        listed[short], listed_scores[short] = -1, -np.inf
        listed[short, :kk], listed_scores[short, :kk] = exact_indices, exact_scores
    w = np.float32(cf_weight)
    liked = columns[first:last].copy()
    liked.data[:] = 1.0
    likers_per_user = np.diff(columns.tocsc().indptr).astype(np.float64)
    bound = np.cumsum(liked @ likers_per_user)  # rows' co-liked models, at most (with repeats), running
    r_first = 0
    while r_first < last - first:
        spent = bound[r_first - 1] if r_first else 0.0
        r_last = max(r_first + 1, int(np.searchsorted(bound, spent + pair_block, side="right")))
        co = (columns[first + r_first:first + r_last] @ columns.T).tocoo()
        co_rows, co_cols, co_values = co.row.astype(np.int64), co.col.astype(np.int64), co.data.astype(np.float32)
        keep = co_cols != first + r_first + co_rows  # never a model's own neighbour
        co_rows, co_cols, co_values = co_rows[keep], co_cols[keep], co_values[keep]
        co_keys = co_rows * n + co_cols
        order = np.argsort(co_keys, kind="stable")
        co_keys, co_rows, co_cols, co_values = co_keys[order], co_rows[order], co_cols[order], co_values[order]
        block_listed = listed[r_first:r_last]
        l_rows, l_ranks = np.nonzero(block_listed >= 0)
        l_cols = block_listed[l_rows, l_ranks]
        l_visual = listed_scores[r_first:r_last][l_rows, l_ranks]
        l_keys = l_rows * n + l_cols
        at = np.minimum(np.searchsorted(co_keys, l_keys), max(len(co_keys) - 1, 0))
        found = (co_keys[at] == l_keys) if len(co_keys) else np.zeros(len(l_keys), dtype=bool)
        l_knn = np.where(found, co_values[at] if len(co_keys) else 0.0, 0.0).astype(np.float32)
        extra = ~np.isin(co_keys, l_keys)
        e_rows, e_cols, e_knn = co_rows[extra], co_cols[extra], co_values[extra]
        e_visual = pair_visual(unit, np.arange(first + r_first, first + r_last), e_rows, e_cols)
        pairs += len(e_rows)
        pair_rows = np.concatenate([l_rows, e_rows])
        pair_cols = np.concatenate([l_cols, e_cols])
        pair_scores = np.concatenate([(1 - w) * l_visual + w * l_knn, (1 - w) * e_visual + w * e_knn])
        order = np.lexsort((pair_cols, -pair_scores, pair_rows))
        pair_rows, pair_cols, pair_scores = pair_rows[order], pair_cols[order], pair_scores[order]
        rank = np.arange(len(pair_rows)) - np.searchsorted(pair_rows, pair_rows)
        top = rank < wide
        indices[r_first + pair_rows[top], rank[top]] = pair_cols[top]
        scores[r_first + pair_rows[top], rank[top]] = pair_scores[top]
        r_first = r_last
    indices, scores = settle_ties(KnnBlend(unit, columns, cf_weight), first, indices, scores)
    return np.ascontiguousarray(indices[:, :kk]), np.ascontiguousarray(scores[:, :kk]), pairs


class KnnBlend:
    """ItemKNN's hybrid score of any pair in float64, ``(1 - w) v + w c`` with the visual cosine
    ``v`` as the lists hold it and the likers' cosine ``c`` (``like_columns``): what its ties
    are settled by (``similarity.settle_ties``)."""

    cosine = False

    def __init__(self, unit, columns: sparse.csr_matrix, cf_weight: float) -> None:
        self.unit, self.columns, self.cf_weight = unit, columns, cf_weight

    def exact_scores(self, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        from recsketch.similarity import _exact_pair_scores

        visual = _exact_pair_scores(self.unit, queries, candidates).astype(np.float64)
        likes = np.asarray(self.columns[queries].astype(np.float64).multiply(
            self.columns[candidates].astype(np.float64)).sum(axis=1)).ravel()
        return (1 - self.cf_weight) * visual + self.cf_weight * likes
