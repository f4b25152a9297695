"""Offline evaluation of what recsketch serves: held-out likes, ranked by each method.

The seed's series measured its recommenders this way (precision@k on held-out likes). Here,
on the likes that survive the threshold:

- a **warm split**: each user's likes, 20 % held out at random (seeded); every method ranks all
  models the user has not liked in training, and the held-out ones should come first;
- a **cold-start split**: 10 % of models with all their likes held out before anything is
  trained, ranked among themselves for the users who liked them: what a model nobody has
  liked yet gets from each method.

Methods: ``random`` and ``popularity`` (baselines), ``visual`` (a user's profile is the sum of
the unit features of the models they liked: their held-out likes ranked by cosine to it, the
seed's visual similarity turned into a user ranking), ``cf`` (implicit ALS on the training
likes, user × item factors), and ``hybrid``: the neighbours recsketch serves as "hybrid",
whose item-item similarity is ``(1 - w) × visual cosine + w × likes similarity`` (the dot
product of ALS's whitened item factors, ``hybrid.likes_rows``: summed over a user's liked
models it is ALS's own score); a user's score for a model is its summed similarity to the
models they liked, and ``w`` maximises NDCG@10 on a validation split carved out of training,
as does the likes half itself: ALS's rows, or ItemKNN's like-matrix cosines (``itemknn``).
For cold-start models the visual embedding is mapped into the likes rows' space by ridge
regression fitted on the warm models (the DropoutNet idea, linear), so they get hybrid
neighbours too.

Metrics at each k: precision, recall (hits / held-out likes), NDCG (binary relevance) and
catalogue coverage (share of candidate models recommended to anyone), averaged over the
evaluated users (at most ``max_users``, sampled with the seed).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from recsketch.contracts import PRIMARY_METRIC  # noqa: F401  (what the gate compares, re-exported)
from recsketch.heldout import HELD_OUT_SHARE, held_out
from recsketch.hybrid import (
    DEFAULT_RIDGE,
    KNN_MAX_SHARE,
    fit_als,
    knn_affordable,
    knn_pairs_bound,
    likes_rows,
    stream_factors,
)
from recsketch.significance import beats
from recsketch.similarity import largest, normalise

log = logging.getLogger(__name__)

KS = (10, 20)
USER_BLOCK = 1024
HYBRID_WEIGHTS = tuple(round(float(w), 2) for w in np.linspace(0.0, 1.0, 11))
LIKES_HALVES = ("als", "itemknn")  # the hybrid's likes half: ALS's likes rows, or ItemKNN's like-matrix cosines
KNN_WEIGHTS = HYBRID_WEIGHTS[:-1]  # ItemKNN's hybrid keeps some of the pictures: a model nobody liked has no cosines

Scorer = Callable[[np.ndarray, np.ndarray], Any]  # (users, ascending item codes) -> scores [users, items]


@dataclass(frozen=True)
class Incumbent:
    """The choices the served lists were made with (the live run's report): the tunings keep each
    unless an alternative validates better by more than the standard error of their paired
    difference (``significance.beats``), so that a noisy day neither changes what is served nor
    reblends every list. None: no such choice (the tuning chooses freely)."""

    als: dict[str, float] | None = None
    likes: str | None = None
    cf_weight: float | None = None
    cold_cf_weight: float | None = None


@dataclass(frozen=True)
class EvaluationConfig:
    holdout: float = 0.2  # share of each user's training likes carved for validation (and the test's, for likes
    # without held-out ones or under random_holdout)
    random_holdout: bool = False  # test on a random share of each user's likes, not the held-out likes: only for likes
    # no served list was fitted on (another data set), as served lists were fitted on all but the held-out ones
    cold_items: float = 0.1  # share of models held out with all their likes
    seed: int = 0
    max_users: int = 10_000  # users evaluated (sampled): bounds the cost at any catalogue size
    tune_users: int = 4_096  # validation users the CF weight is chosen on (11 weights compared on the same users)
    factors: int = 64  # ALS's start: the tuning's first candidate (``tune_als``), what runs when tune_fits is 0
    iterations: int = 15
    regularization: float = 0.05
    alpha: float = 2.0  # ALS confidence of a like
    tune_fits: float = 8.0  # the ALS tuning's budget, in fits of the start's work (factors x iterations)
    tune_max_work: float = 2e10  # and at most this ``AlsParams.work``: big catalogues tune less (1 M: the start)
    ridge: float = DEFAULT_RIDGE
    hybrid_likes: str = "auto"  # the hybrid's likes half: "als", "itemknn", or "auto" (the one that validates better)
    knn_max_products: float = 4e9  # ItemKNN's sparse products per ranking (~1 min on 2 cores): past it, fewer users
    threads: int = 0  # 0: every core
    ks: tuple[int, ...] = KS
    incumbent: Incumbent | None = None  # yesterday's choices: kept unless an alternative beats them by their noise


@dataclass
class Likes:
    """Likes as integer codes: user u liked item i; items are the catalogue's models in order.
    ``held_out``: which of them are the held-out likes no served list is fitted on
    (``recsketch.heldout``), known when they were read from names; None for likes made as codes
    (the splits then hold out a random share of each user's likes)."""

    users: np.ndarray
    items: np.ndarray
    item_ids: list[str]
    n_users: int
    held_out: np.ndarray | None = None

    @classmethod
    def from_frame(cls, likes: pd.DataFrame, item_ids: Sequence[str] | None = None) -> Likes:
        """From a (mid, uid) frame; ``item_ids`` (e.g. the models with features) restricts and orders
        the items, else every liked model, sorted."""
        mids = likes["mid"].astype(str).to_numpy()
        ids = sorted(set(mids)) if item_ids is None else list(item_ids)
        position = pd.Index(ids).get_indexer(mids)
        keep = position >= 0
        uid_codes, _ = pd.factorize(likes["uid"].astype(str).to_numpy()[keep], sort=True)  # not storage order
        width = max(1, len(ids))  # (user, item) pairs as one sorted key: np.unique(axis=1) was 50x slower
        pairs = (uid_codes.astype(np.int64) * width + position[keep].astype(np.int64)) * 2
        pairs += held_out(likes)[keep]  # the same like is held out or not wherever it repeats
        pairs.sort()
        pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]] if len(pairs) else pairs
        users, items = np.divmod(pairs >> 1, width)
        return cls(users, items, ids, int(uid_codes.max()) + 1 if len(uid_codes) else 0, (pairs & 1).astype(bool))

    def matrix(self, mask: np.ndarray | None = None) -> sparse.csr_matrix:
        users, items = (self.users, self.items) if mask is None else (self.users[mask], self.items[mask])
        return sparse.csr_matrix((np.ones(len(users), np.float32), (users, items)),
                                 shape=(self.n_users, len(self.item_ids)))


@dataclass
class Split:
    train: sparse.csr_matrix
    test: sparse.csr_matrix  # warm held-out likes
    cold_items: np.ndarray  # item codes held out with all their likes
    cold_test: sparse.csr_matrix  # the likes of the cold items
    info: dict = field(default_factory=dict)


def _holdout_mask(users: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Per user, round(share × their likes) of them (at least one when they have two or more)."""
    order = np.lexsort((rng.random(len(users)), users))  # each user's likes in random order
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    take = np.where(counts >= 2, np.maximum(1, np.rint(counts * share)), 0).astype(np.int64)
    rank = np.arange(len(users)) - np.repeat(starts, counts)
    held = np.zeros(len(users), dtype=bool)
    held[order] = rank < np.repeat(take, counts)
    return held


def split_likes(likes: Likes, config: EvaluationConfig) -> Split:
    rng = np.random.default_rng(config.seed)
    n_items = len(likes.item_ids)
    n_cold = round(n_items * config.cold_items) if config.cold_items > 0 else 0
    cold = np.sort(rng.choice(n_items, size=n_cold, replace=False)) if n_cold else np.zeros(0, np.int64)
    is_cold = np.isin(likes.items, cold)
    warm_users, warm_items = likes.users[~is_cold], likes.items[~is_cold]
    if likes.held_out is not None and not config.random_holdout:  # the likes no served list was fitted on
        held, holdout = likes.held_out[~is_cold], f"held-out likes ({HELD_OUT_SHARE:.0%}, by a hash of the like)"
    else:
        held = _holdout_mask(warm_users, config.holdout, rng)
        holdout = f"{config.holdout:.0%} of each user's, at random"
    warm = Likes(warm_users, warm_items, likes.item_ids, likes.n_users)
    info = {"seed": config.seed, "holdout": holdout, "cold_share": config.cold_items,
            "users": likes.n_users, "models": n_items, "likes": len(likes.users),
            "train_likes": int((~held).sum()), "test_likes": int(held.sum()),
            "cold_models": n_cold, "cold_likes": int(is_cold.sum())}
    return Split(warm.matrix(~held), warm.matrix(held), cold, likes.matrix(is_cold), info)


ITEM_BLOCK = 32_768  # candidates scored per step: a user block's scores are USER_BLOCK x ITEM_BLOCK floats
UNRANKED = np.float32(-3e38)  # a model never recommended to that user (finite, so that blends of it stay defined)
BLEND_DEPTH = 64  # each part's best per row: their union settles every blend weight's top-k, or the row is blended


def top_columns(scores: np.ndarray, kk: int) -> np.ndarray:
    """Each row's ``kk`` best columns, best first (``similarity.largest``: torch.topk where
    installed, several times faster than argpartition on these user x model blocks)."""
    return largest(scores, kk, ordered=True)[0]


class RunningTop:
    """Each user's ``kk`` best items over item blocks seen one at a time: memory holds a block's
    scores and the lists, never users x N."""

    def __init__(self, users: int, kk: int) -> None:
        self.kk = kk
        self.items = np.zeros((users, 0), dtype=np.int64)
        self.values = np.zeros((users, 0), dtype=np.float32)

    def add(self, scores: np.ndarray, first_item: int) -> None:
        take = min(self.kk, scores.shape[1])
        if take <= 0:
            return
        items, values = largest(scores, take)
        self.add_best(items + first_item, values)

    def add_best(self, items: np.ndarray, values: np.ndarray) -> None:
        """A block's own best per row (items, values), at most ``kk`` of each."""
        merged = np.concatenate([self.items, items], axis=1)
        merged_values = np.concatenate([self.values, values.astype(np.float32)], axis=1)
        if merged.shape[1] > self.kk:
            keep, merged_values = largest(merged_values, self.kk)
            merged = np.take_along_axis(merged, keep, axis=1)
        self.items, self.values = merged, merged_values

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """(items, values), best first."""
        order = np.argsort(-self.values, axis=1, kind="stable")
        return np.take_along_axis(self.items, order, 1), np.take_along_axis(self.values, order, 1)


class _Accumulator:
    """Sums of precision, recall and NDCG at each k over user blocks, and the models shown."""

    def __init__(self, ks: Sequence[int], n_candidates: int) -> None:
        self.ks, self.users = tuple(ks), 0
        self.totals = {f"{name}@{k}": 0.0 for k in ks for name in ("precision", "recall", "ndcg")}
        self.shown = {k: np.zeros(n_candidates, dtype=bool) for k in ks}
        self.discounts = 1.0 / np.log2(np.arange(2, max(ks) + 2))
        self.per_user: dict[int, list[np.ndarray]] = {k: [] for k in ks}  # NDCG@k of each user, blocks in order

    def add(self, best: np.ndarray, truth: sparse.csr_matrix) -> None:
        """``best`` [users, kk]: each user's ranked candidate positions (-1: nothing there),
        ``truth`` [users, candidates]: their held-out likes."""
        kk = best.shape[1]
        relevant = np.diff(truth.indptr)
        rows, cols = truth.nonzero()
        width = truth.shape[1]
        users = np.repeat(np.arange(best.shape[0]), kk).reshape(best.shape)
        hit = (best >= 0) & np.isin(users * width + best, rows.astype(np.int64) * width + cols)
        for k in self.ks:
            hits = hit[:, :k].sum(axis=1)
            self.totals[f"precision@{k}"] += float((hits / k).sum())
            self.totals[f"recall@{k}"] += float((hits / np.maximum(relevant, 1)).sum())
            dcg = (hit[:, :k] * self.discounts[:min(k, kk)]).sum(axis=1)
            ideal = np.cumsum(self.discounts[:k])[np.clip(relevant, 1, k) - 1]
            self.totals[f"ndcg@{k}"] += float((dcg / ideal).sum())
            self.per_user[k].append(dcg / ideal)
            shown = best[:, :k]
            self.shown[k][np.unique(shown[shown >= 0])] = True
        self.users += best.shape[0]

    def user_ndcg(self, k: int = 10) -> np.ndarray:
        """Each ranked user's NDCG@k, in the order of the users ranked: paired comparisons of
        two rankings of the same users (the gate, the choices' hysteresis) read these."""
        return np.concatenate([np.zeros(0), *self.per_user[k]])

    def result(self) -> dict[str, float]:
        count = max(self.users, 1)
        result = {name: round(value / count, 5) for name, value in self.totals.items()}
        for k in self.ks:
            result[f"coverage@{k}"] = round(float(self.shown[k].mean()) if len(self.shown[k]) else 0.0, 5)
        return dict(sorted(result.items(), key=lambda item: (int(item[0].split("@")[1]), item[0])))


@dataclass(frozen=True)
class Candidates:
    """The models a split ranks among (``positions``: their codes, ascending), scored in groups
    of consecutive candidates: a split of 10 % of the models reads and scores only those."""

    positions: np.ndarray
    n_items: int

    @functools.cached_property
    def rank_of(self) -> np.ndarray:
        """Item code -> its position among the candidates (-1: not one)."""
        rank = np.full(self.n_items, -1, dtype=np.int64)
        rank[self.positions] = np.arange(len(self.positions))
        return rank

    def groups(self, size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(position of the first, item codes) of up to ``size`` consecutive candidates."""
        size = size or ITEM_BLOCK
        for first in range(0, len(self.positions), size):
            yield first, self.positions[first:first + size]


class BlockRows:
    """The rows of a group of item codes, read once for every user block that scores them (an
    array or ``NpyRows``, read by contiguous slices of at most ``ITEM_BLOCK`` rows)."""

    def __init__(self, rows) -> None:
        self.rows = rows
        self._codes: np.ndarray | None = None
        self._block = np.zeros((0, rows.shape[1]), dtype=np.float32)

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        if codes is not self._codes:
            self._codes, self._block = codes, gather_rows(self.rows, codes)
        return self._block


def gather_rows(rows, codes: np.ndarray) -> np.ndarray:
    """``rows[codes]`` (ascending codes) as float32, read slice by slice: one read for a run of
    consecutive codes, never a row at a time."""
    if not len(codes):
        return np.zeros((0, rows.shape[1]), dtype=np.float32)
    first, last = int(codes[0]), int(codes[-1]) + 1
    if last - first == len(codes):
        return np.asarray(rows[first:last], dtype=np.float32)
    out = np.empty((len(codes), rows.shape[1]), dtype=np.float32)
    for start in range(first, last, ITEM_BLOCK):
        lo, hi = np.searchsorted(codes, [start, start + ITEM_BLOCK])
        if lo < hi:
            out[lo:hi] = np.asarray(rows[start:min(last, start + ITEM_BLOCK)], dtype=np.float32)[codes[lo:hi] - start]
    return out


class _Exclusions:
    """A user block's training likes as (row, candidate position), ordered by position: what a
    group of candidates must never recommend to them."""

    def __init__(self, liked: sparse.csr_matrix, candidates: Candidates) -> None:
        coo = liked.tocoo()
        rank = candidates.rank_of[coo.col]
        keep = rank >= 0
        order = np.argsort(rank[keep], kind="stable")
        self.rows, self.ranks = coo.row[keep][order], rank[keep][order]

    def apply(self, scores: np.ndarray, first: int) -> None:
        lo, hi = np.searchsorted(self.ranks, [first, first + scores.shape[1]])
        scores[self.rows[lo:hi], self.ranks[lo:hi] - first] = UNRANKED


def _blended_best(parts: tuple[np.ndarray, np.ndarray], weights: Sequence[float], kk: int
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each weight w's best ``kk`` columns per row of ``(1 - w) a + w b``, exactly, from the union
    of each part's best D: a column outside it has ``a <= a_D`` and ``b <= b_D``, so it scores at
    most ``(1 - w) a_D + w b_D``, and a row whose k-th best in the union reaches that bound is
    settled. Rows left unsettled at some weight try a 4x deeper union, then are blended in full:
    every weight for a few top-k's work when the parts agree, never more than blending each."""
    a, b = parts
    rows, width = a.shape
    take = min(kk, width)
    out = [(np.zeros((rows, take), np.int64), np.zeros((rows, take), np.float32)) for _ in weights]
    pending = [np.arange(rows) for _ in weights]  # per weight: rows not settled yet
    for slot, w in enumerate(weights):  # a part alone, or a single blend: its own top-k is cheaper than unions
        if w in (0.0, 1.0) or sum(0.0 < other < 1.0 for other in weights) <= 1:
            full = a if w == 0.0 else b if w == 1.0 else ((1 - w) * a + w * b).astype(np.float32)
            out[slot] = largest(full, take)
            pending[slot] = pending[slot][:0]
    depth = max(BLEND_DEPTH, kk)
    while depth < width // 2 and any(len(left) for left in pending):
        todo = np.unique(np.concatenate(pending))
        sub_a, sub_b = (a, b) if len(todo) == rows else (a[todo], b[todo])
        top_a, value_a = largest(sub_a, depth)
        top_b, value_b = largest(sub_b, depth)
        union = np.sort(np.concatenate([top_a, top_b], axis=1), axis=1)
        repeated = np.zeros(union.shape, dtype=bool)
        repeated[:, 1:] = union[:, 1:] == union[:, :-1]
        union_a, union_b = np.take_along_axis(sub_a, union, 1), np.take_along_axis(sub_b, union, 1)
        floor_a, floor_b = value_a.min(axis=1), value_b.min(axis=1)
        for slot, w in enumerate(weights):
            mine = np.flatnonzero(np.isin(todo, pending[slot]))
            if not len(mine):
                continue
            blend = ((1 - w) * union_a[mine] + w * union_b[mine]).astype(np.float32)
            blend[repeated[mine]] = UNRANKED
            pick, values = largest(blend, take)
            settled = values.min(axis=1) >= (1 - w) * floor_a[mine] + w * floor_b[mine]
            done = todo[mine[settled]]
            out[slot][0][done] = np.take_along_axis(union[mine], pick, 1)[settled]
            out[slot][1][done] = values[settled]
            pending[slot] = todo[mine[~settled]]
        depth *= 4
    for slot, w in enumerate(weights):
        left = pending[slot]
        if len(left):
            full = ((1 - w) * a[left] + w * b[left]).astype(np.float32)
            out[slot][0][left], out[slot][1][left] = largest(full, take)
    return out


def _writable(scores: Any) -> np.ndarray:
    """Scores as a float32 array of their own (a product's output as it is; a view or another type copied)."""
    if isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.flags.owndata \
            and scores.flags.writeable:
        return scores
    return np.array(scores, dtype=np.float32)


def rank_users(scorer: Scorer, users: np.ndarray, test: sparse.csr_matrix, exclude: sparse.csr_matrix | None,
               candidates: Candidates, accumulators: Sequence[_Accumulator] | None = None,
               ks: Sequence[int] = KS, blend: Sequence[float] | None = None, halves: int = 1) -> list[_Accumulator]:
    """Users ranking the candidates: groups of candidates outside (each group's features read
    once), blocks of users inside, each with a running top-k; ``exclude`` (their training likes)
    never counts as a recommendation. ``blend``: the scorer gives two parts (visual, cf) and each
    weight w ranks ``(1 - w) visual + w cf`` (w = 0 is visual alone), all from one product; with
    ``halves`` > 1 it gives visual and that many likes halves, each blended at every weight (the
    totals half by half), the visual product made once for all of them."""
    weights = [None] if blend is None else list(blend) * halves
    totals = list(accumulators) if accumulators is not None else [_Accumulator(ks, len(candidates.positions))
                                                                  for _ in weights]
    kk = min(max(totals[0].ks), len(candidates.positions))
    blocks = [users[start:start + USER_BLOCK] for start in range(0, len(users), USER_BLOCK)]
    running = [[RunningTop(len(block), kk) for _ in weights] for block in blocks]
    excluded = [_Exclusions(exclude[block], candidates) if exclude is not None else None for block in blocks]
    for first, codes in candidates.groups():
        for block, tops, skip in zip(blocks, running, excluded, strict=True):
            parts = scorer(block, codes)
            scored = [_writable(part) for part in (parts if blend is not None else [parts])]
            for scores in scored:
                if skip is not None:
                    skip.apply(scores, first)
            if blend is None:
                tops[0].add(scored[0], first)
                continue
            per_weight = [pair for half in range(1, halves + 1)
                          for pair in _blended_best((scored[0], scored[half]), blend, kk)]
            for top, (items, values) in zip(tops, per_weight, strict=True):
                top.add_best(items + first, values)
    for block, tops in zip(blocks, running, strict=True):
        truth = test[block][:, candidates.positions].tocsr()
        for top, total in zip(tops, totals, strict=True):
            best, values = top.best()
            total.add(np.where(values > UNRANKED / 2, best, -1), truth)
    return totals


def rank_metrics(scorer: Scorer, users: np.ndarray, test: sparse.csr_matrix, exclude: sparse.csr_matrix | None,
                 candidates: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Precision, recall, NDCG and coverage at each k for ``users`` ranking ``candidates``
    (item codes); ``scorer(users, codes)`` scores a group of them (ascending item codes)."""
    return rank_users(scorer, users, test, exclude, Candidates(np.asarray(candidates), test.shape[1]),
                      ks=ks)[0].result()


@dataclass(frozen=True)
class AlsParams:
    """ALS's hyperparameters: what the tuning chooses and plan_hybrid fits the run's likes with."""

    factors: int = 64
    regularization: float = 0.05
    alpha: float = 2.0
    iterations: int = 15

    @classmethod
    def of(cls, config: EvaluationConfig) -> AlsParams:
        return cls(config.factors, config.regularization, config.alpha, config.iterations)

    def work(self, likes: int) -> float:
        """What a fit costs, in like x factor x iteration products: what the tuning's budget
        counts. A like also costs ``ALS_LIKE_COST`` factors' worth whatever the factors (its read
        of the other side's row): at 1 M models, 15 M likes, an iteration took 2.6 s at 8 factors,
        3.5 at 16, 5.6 at 64 (Zen 4), not 8x less at 8."""
        return float(likes) * (self.factors + ALS_LIKE_COST) * self.iterations


ALS_LIKE_COST = 40  # factors' worth of a like's fixed cost in a fit (fitted to the timings above)


def _fit_als(train: sparse.csr_matrix, config: EvaluationConfig,
             params: AlsParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    params = params or AlsParams.of(config)
    return fit_als(train, factors=params.factors, regularization=params.regularization, alpha=params.alpha,
                   iterations=params.iterations, seed=config.seed, threads=config.threads)


ALS_GRID = {  # tried one hyperparameter at a time from the best so far, in this order (a coordinate search)
    "factors": (8, 16, 32, 128, 256),  # 256: a catalogue of ~1,000 tastes needs it (seed scale: 0.117 vs 0.037 at 128)
    "regularization": (0.005, 0.5, 5.0),
    "alpha": (0.5, 8.0, 32.0),
    "iterations": (5, 30),
}


@dataclass(frozen=True)
class AlsChoice:
    params: AlsParams
    validation_ndcg: float  # NDCG@10 of the chosen fit on the validation likes
    item_factors: np.ndarray  # the chosen fit's, on the tuning's fit split (the hybrid weight is tuned on them)
    tried: list[dict]  # each candidate's hyperparameters and validation NDCG@10, in the order tried
    skipped: int  # candidates past the budget

    def summary(self) -> dict:
        return {"params": self.params.__dict__, "validation_ndcg@10": self.validation_ndcg, "tried": self.tried,
                "skipped": self.skipped}


def tune_als(fit: sparse.csr_matrix, valid: sparse.csr_matrix, users: np.ndarray, config: EvaluationConfig,
             progress: Callable[[str], None] = log.info) -> AlsChoice:
    """ALS's hyperparameters chosen by NDCG@10 on ``valid`` (models fitted on ``fit``): the start
    (``config``'s) first, then each of ``ALS_GRID``'s values one hyperparameter at a time from the
    best so far, while the budget lasts (``tune_fits`` fits of the start's work, at most
    ``tune_max_work``); candidates that would pass it are skipped, so the choice depends on the
    seed and the data, never on the machine's speed. Ties go to the cheaper fit."""
    start = AlsParams.of(config)
    incumbent = _incumbent_params(config)
    budget = min(config.tune_fits * start.work(fit.nnz), max(config.tune_max_work, start.work(fit.nnz)))
    everything = Candidates(np.arange(fit.shape[1]), fit.shape[1])
    spent, skipped, tried = 0.0, 0, []
    best: tuple[float, float, AlsParams, np.ndarray, np.ndarray] | None = None
    kept: tuple[float, float, AlsParams, np.ndarray, np.ndarray] | None = None  # the incumbent's trial

    def trial(params: AlsParams) -> None:
        nonlocal spent, best, kept
        started = time.monotonic()
        user_factors, item_factors = _fit_als(fit, config, params)
        spent += params.work(fit.nnz)
        total = rank_users(_cf_scorer((user_factors, item_factors)), users, valid, fit, everything, ks=(10,))[0]
        ndcg = total.result()["ndcg@10"]
        tried.append({**params.__dict__, "ndcg@10": ndcg})
        progress(f"evaluate: ALS {params.__dict__}: validation NDCG@10 {ndcg:.4f} "
                 f"[{time.monotonic() - started:.1f} s]")
        result = (ndcg, -params.work(1), params, item_factors, total.user_ndcg(10))
        if params == incumbent:
            kept = result
        if best is None or (ndcg, -params.work(1)) > (best[0], best[1]):
            best = result

    trial(incumbent or start)  # yesterday's choice first: the search moves from it
    for name, values in ALS_GRID.items():
        assert best is not None
        centre = best[2]
        for value in values:
            params = AlsParams(**{**centre.__dict__, name: value})
            if params.factors >= min(fit.shape):  # more factors than users or models: nothing to learn
                continue
            if spent + params.work(fit.nnz) > budget:
                skipped += 1
                continue
            trial(params)
    assert best is not None
    if kept is not None and best is not kept and not beats(best[4], kept[4]):
        progress(f"evaluate: ALS {best[2].__dict__} validated {best[0]:.4f}, not better than the served "
                 f"{kept[2].__dict__}'s {kept[0]:.4f} by more than the standard error: the served kept")
        best = kept
    return AlsChoice(best[2], best[0], best[3], tried, skipped)


def _incumbent_params(config: EvaluationConfig) -> AlsParams | None:
    """Yesterday's ALS hyperparameters, if there are any."""
    if config.incumbent is None or not config.incumbent.als:
        return None
    kinds = {"factors": int, "regularization": float, "alpha": float, "iterations": int}
    return AlsParams(**{name: cast(config.incumbent.als[name]) for name, cast in kinds.items()
                        if name in config.incumbent.als})


class UserSums:
    """Each evaluated user's sum of ``rows`` over the models they liked in ``train``, for every
    user asked for at once, in one pass over ``rows`` (an array or ``NpyRows``) by item blocks:
    memory holds users x d (at most ``max_users``), never N x d."""

    def __init__(self, train: sparse.csr_matrix, users: np.ndarray, rows, *, unit: bool = False) -> None:
        users = np.unique(users)
        liked = train[users].tocsc()
        sums = np.zeros((len(users), rows.shape[1]), dtype=np.float64)
        for start in range(0, rows.shape[0], ITEM_BLOCK):
            stop = min(rows.shape[0], start + ITEM_BLOCK)
            part = liked[:, start:stop]
            if part.nnz:
                sums += part @ np.asarray(rows[start:stop], dtype=np.float32)
        self.sums = normalise(sums.astype(np.float32), copy=False) if unit else sums.astype(np.float32)
        self.row_of = {int(user): row for row, user in enumerate(users)}

    def __call__(self, users: np.ndarray) -> np.ndarray:
        return self.sums[[self.row_of[int(u)] for u in users]]


def users_with(matrix: sparse.csr_matrix, train: sparse.csr_matrix, limit: int,
                rng: np.random.Generator) -> np.ndarray:
    """Users with held-out likes here and training likes to rank from (at most ``limit``, sampled)."""
    users = np.flatnonzero((np.diff(matrix.indptr) > 0) & (np.diff(train.indptr) > 0))
    if len(users) > limit:
        users = np.sort(rng.choice(users, size=limit, replace=False))
    return users


def _cf_scorer(als: tuple[np.ndarray, np.ndarray]) -> Scorer:
    """ALS's scores of item codes (``als``: user and item factors trained on the training likes)."""
    user_factors, item_factors = als
    return lambda users, codes: user_factors[users] @ item_factors[codes].T


class ItemKnnScorer:
    """ItemKNN: a model's score for a user is the sum of its cosines, on the training like
    matrix, to the models the user liked (every neighbour counted, no truncation or shrinkage).
    Sparse throughout: each user's co-likers weighted once (users x users' likers), then
    multiplied into each group of candidates' likers; never N x N."""

    def __init__(self, train: sparse.csr_matrix, users: np.ndarray) -> None:
        likes = train.tocsr().astype(np.float32)
        counts = np.asarray(likes.sum(axis=0)).ravel()
        self.inverse_norms = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0).astype(np.float32)
        users = np.unique(users)
        self.row_of = {int(user): row for row, user in enumerate(users)}
        self.co_likers = ((likes[users] @ sparse.diags(self.inverse_norms)) @ likes.T).tocsr()
        self.columns = likes.tocsc()
        self._codes: np.ndarray | None = None
        self._likers = self.columns[:, :0]

    def __call__(self, block: np.ndarray, codes: np.ndarray) -> np.ndarray:
        if codes is not self._codes:
            self._codes, self._likers = codes, self.columns[:, codes].tocsr()
        weights = self.co_likers[[self.row_of[int(u)] for u in block]]
        return np.asarray((weights @ self._likers).todense(), dtype=np.float32) * self.inverse_norms[codes]


def _knn_costs(train: sparse.csr_matrix, users: np.ndarray, block: int) -> Iterator[np.ndarray]:
    """``knn_products`` of ``users`` a block at a time (the like matrix and its transpose made once)."""
    likes = sparse.csr_matrix(train, dtype=np.float32)
    likers = likes.T.tocsr()
    counts = np.diff(likes.indptr).astype(np.float64)
    for start in range(0, len(users), block):
        co = (likes[users[start:start + block]] @ likers).tocsr()
        co.data[:] = 1.0
        yield co @ counts


def knn_products(train: sparse.csr_matrix, users: np.ndarray, block: int = 2048) -> np.ndarray:
    """Each user's multiply-adds in ``ItemKnnScorer`` over every candidate: the likes of every
    user who shares a model with them (Σ over co-likers v of n_v). Power-law likes make it grow
    much faster than N: ~3 M a user at 1 M models (17 M likes), ~50 s a 1,000 users here."""
    return np.concatenate([np.zeros(0), *_knn_costs(train, users, block)])


def knn_users_within(train: sparse.csr_matrix, users: np.ndarray, budget: float, block: int = 512) -> np.ndarray:
    """The first ``users`` (a random sample already) whose ``knn_products`` sum to at most
    ``budget``, costed a block at a time until it is spent; at least one, so that ItemKNN is
    still measured."""
    spent = 0.0
    for start, costs in zip(range(0, len(users), block), _knn_costs(train, users, block), strict=True):
        total = spent + np.cumsum(costs)
        if total[-1] > budget:
            return users[:max(1, start + int(np.searchsorted(total, budget, side="right")))]
        spent = float(total[-1])
    return users


def rank_at_random(users: np.ndarray, test: sparse.csr_matrix, exclude: sparse.csr_matrix | None,
                   candidates: np.ndarray, ks: Sequence[int], rng: np.random.Generator) -> dict[str, float]:
    """``rank_metrics`` of a uniformly random order of the candidates, less each user's
    ``exclude``: the first k of a random permutation, drawn as k + (the user's excluded) distinct
    positions, the order i.i.d. uniform scores give, without drawing and ranking N per user."""
    candidates = np.asarray(candidates)
    total = _Accumulator(ks, len(candidates))
    width = len(candidates)
    kk = min(max(ks), width)
    rank_of = Candidates(candidates, test.shape[1]).rank_of
    for start in range(0, len(users), USER_BLOCK):
        block = users[start:start + USER_BLOCK]
        skip = exclude[block].tocsr() if exclude is not None else None
        best = np.full((len(block), kk), -1, dtype=np.int64)
        for row in range(len(block)):
            banned = np.zeros(0, dtype=np.int64)
            if skip is not None:
                banned = rank_of[skip.indices[skip.indptr[row]:skip.indptr[row + 1]]]
                banned = banned[banned >= 0]
            drawn = rng.choice(width, size=min(width, kk + len(banned)), replace=False)
            drawn = drawn[~np.isin(drawn, banned)][:kk]
            best[row, :len(drawn)] = drawn
        total.add(best, test[block][:, candidates].tocsr())
    return total.result()


def rank_by_popularity(train: sparse.csr_matrix, users: np.ndarray, test: sparse.csr_matrix,
                       candidates: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """``rank_metrics`` of the most liked candidates first (ties by item code): one order for
    every user, less their training likes, so each user reads the order's head, not N scores."""
    popularity = np.asarray(train.sum(axis=0)).ravel()
    total = _Accumulator(ks, len(candidates))
    kk = min(max(ks), len(candidates))
    order = np.argsort(-popularity[candidates], kind="stable")  # candidate positions, most liked first
    rank_of = Candidates(np.asarray(candidates), train.shape[1]).rank_of
    for start in range(0, len(users), USER_BLOCK):
        block = users[start:start + USER_BLOCK]
        liked = train[block].tocoo()
        liked_rank = rank_of[liked.col]
        head = order[:min(len(order), kk + int(np.bincount(liked.row, minlength=len(block)).max(initial=0)))]
        width = len(candidates)
        rows = np.repeat(np.arange(len(block)), len(head)).reshape(len(block), len(head))
        allowed = ~np.isin(rows * width + head[None, :],
                           (liked.row.astype(np.int64) * width + liked_rank)[liked_rank >= 0])
        place = np.cumsum(allowed, axis=1) - 1
        keep = allowed & (place < kk)
        best = np.full((len(block), kk), -1, dtype=np.int64)
        best[rows[keep], place[keep]] = np.broadcast_to(head, rows.shape)[keep]
        total.add(best, test[block][:, candidates].tocsr())
    return total.result()


@dataclass(frozen=True)
class _RowSums:
    """ALS's likes half: each user's summed likes rows, dotted with a group's rows."""

    sums: UserSums
    rows: np.ndarray

    def __call__(self, block: np.ndarray, codes: np.ndarray) -> np.ndarray:
        return self.sums(block) @ self.rows[codes].T


def _parts_scorer(train: sparse.csr_matrix, users: np.ndarray, unit, factors: np.ndarray | None,
                  halves: Sequence[str] = ("als",)) -> Scorer:
    """A user's summed similarities to a model over the models they liked: ``Σ visual``, then
    each likes half's (``"als"``: ``Σ`` of the likes rows ``factors``' dot products; ``"itemknn"``:
    ``Σ`` of like-matrix cosines), from users' sums (the embedding is never built) and one
    visual product. Blended with weight w they rank as the served hybrid lists do; w = 0 ranks
    as the visual profile (the sum of the liked models' unit features: its cosine and its dot
    product differ by a factor per user, which changes no ranking)."""
    visual, rows = UserSums(train, users, unit), BlockRows(unit)
    likes: list[Scorer] = []
    for half in halves:
        if half == "itemknn":
            likes.append(ItemKnnScorer(train, users))
        else:
            assert factors is not None
            likes.append(_RowSums(UserSums(train, users, factors), factors))
    return lambda block, codes: (visual(block) @ rows(codes).T, *(part(block, codes) for part in likes))


@dataclass(frozen=True)
class Validation:
    """A validation split carved out of the training likes (the test likes are never seen):
    models are fitted on ``fit`` and chosen by ``valid``, ranked for ``users``."""

    fit: sparse.csr_matrix
    valid: sparse.csr_matrix
    users: np.ndarray


def _as_likes(matrix: sparse.csr_matrix) -> Likes:
    """A like matrix as codes again, to be split further."""
    coo = matrix.tocoo()
    return Likes(coo.row.astype(np.int64), coo.col.astype(np.int64), [""] * matrix.shape[1], matrix.shape[0])


def _best_weight(totals: Sequence[_Accumulator], weights: Sequence[float] = HYBRID_WEIGHTS,
                 incumbent: float | None = None) -> tuple[float, dict]:
    """The weight whose NDCG@10 is best (ties: the lower weight), from ``rank_users``'s totals
    for ``weights``; ``incumbent`` (yesterday's) is kept unless the best beats it by more than
    the standard error."""
    by_weight = {w: total.result()["ndcg@10"] for w, total in zip(weights, totals, strict=True)}
    best = max(by_weight, key=lambda w: (by_weight[w], -w))
    users = {w: total for w, total in zip(weights, totals, strict=True)}
    kept = _keep_incumbent(best, incumbent, lambda w: users[w].user_ndcg(10)) if incumbent in users else best
    return kept, {"weights": by_weight, "chosen": kept, **({"best": best} if kept != best else {})}


def _keep_incumbent(best, incumbent, per_user: Callable[[Any], np.ndarray]):
    """``incumbent`` unless ``best`` beats it by more than the standard error of their paired
    difference (``significance.beats``)."""
    if incumbent is None or best == incumbent or beats(per_user(best), per_user(incumbent)):
        return best
    return incumbent


def validation_split(train: sparse.csr_matrix, config: EvaluationConfig) -> Validation:
    rng = np.random.default_rng(config.seed + 2)
    inner = _as_likes(train)
    held = _holdout_mask(inner.users, config.holdout, rng)
    fit, valid = inner.matrix(~held), inner.matrix(held)
    return Validation(fit, valid, users_with(valid, fit, min(config.max_users, config.tune_users), rng))


def tune_hybrid_weight(validation: Validation, unit, rows: np.ndarray, likes: str = "auto",
                       incumbent: Incumbent | None = None) -> tuple[str, float, dict]:
    """The hybrid's likes half and CF weight (0: visual only, 1: the likes only) with the best
    NDCG@10 on the validation split: ``rows``, the likes rows of an ALS fit on its fit likes, and
    ItemKNN's cosines on them, each at every weight from one pass; ``likes`` "als" or "itemknn"
    tries that half only. Ties: ALS, the lower weight."""
    fit, valid, users = validation.fit, validation.valid, validation.users
    if likes not in ("auto", *LIKES_HALVES):
        raise ValueError(f"the hybrid's likes half is one of auto, {', '.join(LIKES_HALVES)}: not {likes!r}")
    halves = LIKES_HALVES if likes == "auto" else (likes,)
    totals = rank_users(_parts_scorer(fit, users, unit, rows, halves), users, valid, fit,
                        Candidates(np.arange(fit.shape[1]), fit.shape[1]), ks=(10,), blend=HYBRID_WEIGHTS,
                        halves=len(halves))  # one pass: the visual product shared by the halves
    width = len(HYBRID_WEIGHTS)
    tried: dict[str, tuple[float, dict]] = {}
    per_user: dict[tuple[str, float], _Accumulator] = {}
    for slot, half in enumerate(halves):  # ItemKNN's totals at w = 1 (its last) are not a candidate
        weights = KNN_WEIGHTS if half == "itemknn" else HYBRID_WEIGHTS
        tried[half] = _best_weight(totals[slot * width:slot * width + len(weights)], weights)
        per_user |= {(half, w): total for w, total in zip(weights, totals[slot * width:], strict=False)}
    best = max(tried, key=lambda half: (tried[half][1]["weights"][tried[half][0]], half == "als"))
    served = None if incumbent is None else (incumbent.likes or "als", incumbent.cf_weight)
    choice = _keep_incumbent((best, tried[best][0]), served if served in per_user else None,
                             lambda key: per_user[key].user_ndcg(10))
    if choice != (best, tried[best][0]):  # the served half and weight: not beaten by more than the noise
        best = choice[0]
        tried[best] = (choice[1], {**tried[best][1], "chosen": choice[1], "best": tried[best][0]})
    weight, tuning = tried[best]
    return best, weight, {**tuning, "likes": best,
                          "by_likes": {half: t[1]["weights"][t[0]] for half, t in tried.items()}}


def cold_validation(train: sparse.csr_matrix, config: EvaluationConfig) -> tuple[Validation, np.ndarray] | None:
    """Liked models carved out of the training likes with all their likes, as the cold start
    carves models out of all of them: ``fit`` lacks them, ``valid`` holds their likes. None when
    fewer than two would be carved."""
    rng = np.random.default_rng(config.seed + 5)
    liked = np.flatnonzero(np.diff(train.tocsc().indptr) > 0)
    n_cold = round(len(liked) * config.cold_items) if config.cold_items > 0 else 0
    if n_cold < 2:
        return None
    cold = np.sort(rng.choice(liked, size=n_cold, replace=False))
    inner = _as_likes(train)
    is_cold = np.isin(inner.items, cold)
    fit, valid = inner.matrix(~is_cold), inner.matrix(is_cold)
    return Validation(fit, valid, users_with(valid, fit, min(config.max_users, config.tune_users), rng)), cold


def tune_cold_weight(train: sparse.csr_matrix, unit, config: EvaluationConfig, params: AlsParams
                     ) -> tuple[float, dict] | None:
    """The CF weight for models nobody has liked yet, chosen apart from the warm one: their
    factors are predicted from their pictures (``stream_factors``), which carry less than ALS's,
    so the blend that suits them differs. Models carved from the training likes
    (``cold_validation``) are ranked among themselves, as the cold start ranks its models, from
    an ALS fit (the chosen ``params``) without them; every weight from one pass."""
    carved = cold_validation(train, config)
    if carved is None:
        return None
    validation, cold = carved
    rows = likes_rows(_fit_als(validation.fit, config, params)[1], params.regularization)  # the raw fit freed
    liked = np.diff(validation.fit.tocsc().indptr) > 0
    factors = stream_factors(unit, rows, liked, ridge=config.ridge)
    del rows
    totals = rank_users(_parts_scorer(validation.fit, validation.users, unit, factors), validation.users,
                        validation.valid, None, Candidates(cold, train.shape[1]), ks=(10,), blend=HYBRID_WEIGHTS)
    return _best_weight(totals, incumbent=None if config.incumbent is None else config.incumbent.cold_cf_weight)


def _visual_and_hybrid(scorer: Scorer, users: np.ndarray, test: sparse.csr_matrix,
                       exclude: sparse.csr_matrix | None, candidates: np.ndarray, weight: float,
                       ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """Visual (w = 0) and hybrid (the tuned w) from one pass of the parts scorer."""
    visual, hybrid = rank_users(scorer, users, test, exclude, Candidates(candidates, test.shape[1]), ks=ks,
                                blend=(0.0, weight))
    return {"visual": visual.result(), "hybrid": hybrid.result()}


def _likes_halves(train: sparse.csr_matrix, validation: Validation, config: EvaluationConfig,
                  progress: Callable[[str], None]) -> str:
    """The likes halves the hybrid's tuning tries: ``config.hybrid_likes`` as set, or for auto,
    ALS's alone where ItemKNN would cost too much, to serve (``knn_affordable``) or to validate
    (``knn_max_products``)."""
    if config.hybrid_likes != "auto":
        return config.hybrid_likes
    if not knn_affordable(train):
        progress(f"evaluate: ItemKNN's hybrid is not a candidate: its {knn_pairs_bound(train):,} co-liked pairs "
                 f"would cost more than {KNN_MAX_SHARE} of a full pass")
        return "als"
    within = knn_users_within(validation.fit, validation.users, config.knn_max_products)
    if len(within) < len(validation.users):
        progress(f"evaluate: ItemKNN's hybrid is not a candidate: its validation of {len(validation.users):,} "
                 f"users would pass knn_max_products {config.knn_max_products:.2g} after {len(within):,}")
        return "als"
    return "auto"


def evaluate(likes: Likes, unit, config: EvaluationConfig | None = None,
             progress: Callable[[str], None] = log.info) -> dict:
    """Every method on the warm split, and (with features) visual and hybrid on the cold start.
    ``unit``: L2-normalised features, one row per ``likes.item_ids`` entry (None: likes only), an
    array or ``NpyRows``: read by item blocks, so memory holds blocks, never N x d. The features
    are read in four passes: the weight's tuning, the cold-start weight's (the ridge map's fit
    reads the liked models' blocks), the warm split's visual and hybrid together, and the cold
    start's, which reads only its cold models."""
    config = config or EvaluationConfig()
    started = time.monotonic()
    if config.threads == 0:
        config = EvaluationConfig(**{**config.__dict__, "threads": os.cpu_count() or 1})
    split = split_likes(likes, config)
    rng = np.random.default_rng(config.seed + 3)
    weight = None
    tuning: dict = {}
    validation = validation_split(split.train, config)
    choice = tune_als(validation.fit, validation.valid, validation.users, config, progress)
    progress(f"evaluate: ALS chosen on validation: {choice.params.__dict__} (NDCG@10 {choice.validation_ndcg:.4f}; "
             f"{len(choice.tried)} tried, {choice.skipped} past the budget) after {time.monotonic() - started:.1f} s")
    half = "als"
    halves = _likes_halves(split.train, validation, config, progress) if unit is not None else "als"
    if unit is not None:
        half, weight, tuning = tune_hybrid_weight(validation, unit,
                                                  likes_rows(choice.item_factors, choice.params.regularization),
                                                  halves, config.incumbent)
        progress(f"evaluate: hybrid likes half {half} (validation NDCG@10 {tuning['by_likes']}), CF weight {weight} "
                 f"(validation NDCG@10 by weight: {tuning['weights']}) after {time.monotonic() - started:.1f} s")
    choice = replace(choice, item_factors=choice.item_factors[:0])  # its N x f no longer needed: not held to the end
    del validation
    cold_weight, cold_tuning = None, None
    if unit is not None and half == "als":  # ItemKNN has no cosines for a model nobody liked: its lists are visual
        cold = tune_cold_weight(split.train, unit, config, choice.params)
        if cold is not None:
            cold_weight, cold_tuning = cold
            progress(f"evaluate: cold-start CF weight {cold_weight} (validation NDCG@10 by weight: "
                     f"{cold_tuning['weights']}) after {time.monotonic() - started:.1f} s")
    als = _fit_als(split.train, config, choice.params)  # once: the warm methods and the cold start share it
    rows = likes_rows(als[1], choice.params.regularization)
    warm_items = np.setdiff1d(np.arange(len(likes.item_ids)), split.cold_items)
    users = users_with(split.test, split.train, config.max_users, rng)
    results = {"random": rank_at_random(users, split.test, split.train, warm_items, config.ks,
                                        np.random.default_rng(config.seed + 1)),
               "popularity": rank_by_popularity(split.train, users, split.test, warm_items, config.ks)}
    results["cf"] = rank_metrics(_cf_scorer(als), users, split.test, split.train, warm_items, config.ks)
    del als  # the likes rows serve the rest
    knn_users = knn_users_within(split.train, users, config.knn_max_products)
    if len(knn_users) < len(users):
        progress(f"evaluate: itemknn ranked for {len(knn_users):,} of the {len(users):,} users (knn_max_products "
                 f"{config.knn_max_products:.2g})")
    results["itemknn"] = rank_metrics(ItemKnnScorer(split.train, knn_users), knn_users, split.test, split.train,
                                      warm_items, config.ks)
    if unit is not None and weight is not None:
        results |= _visual_and_hybrid(_parts_scorer(split.train, users, unit, rows, (half,)), users, split.test,
                                      split.train, warm_items, weight, config.ks)
    for name, metrics in results.items():
        progress(f"evaluate: {name:<10} " + "  ".join(f"{m}={v:.4f}" for m, v in metrics.items()))
    report: dict = {"k": list(config.ks), "split": {**split.info, "evaluated_users": len(users),
                                                    "itemknn_users": len(knn_users)},
                    "methods": results, "als": choice.summary()}
    if unit is not None and len(split.cold_items) >= 2:
        cold_start_weight = (weight or 0.0) if cold_weight is None else cold_weight
        report["cold_start"] = _cold_start(split, unit, config, cold_start_weight, rng, rows, half)
        for name, metrics in report["cold_start"].items():
            progress(f"evaluate: cold-start {name:<10} " + "  ".join(f"{m}={v:.4f}" for m, v in metrics.items()))
        report["hybrid"] = {"likes": half, "likes_validation_ndcg@10": tuning["by_likes"],
                            "cf_weight": weight, "validation_ndcg@10": tuning["weights"],
                            "cold_cf_weight": cold_start_weight,
                            "cold_validation_ndcg@10": (cold_tuning or {}).get("weights")}
    report["seconds"] = round(time.monotonic() - started, 2)
    progress(f"evaluate: done in {report['seconds']} s")
    return report


def _cold_start(split: Split, unit, config: EvaluationConfig, weight: float, rng: np.random.Generator,
                rows: np.ndarray, half: str = "als") -> dict[str, dict[str, float]]:
    """Cold models ranked among themselves for the users who liked them: visual, and hybrid at the
    cold-start weight: with ALS's half, likes rows predicted from the visual embedding (ridge
    fitted on the warm models' ``rows``); with ItemKNN's, their cosines (none: nobody liked them)."""
    users = users_with(split.cold_test, split.train, config.max_users, rng)
    random = rank_at_random(users, split.cold_test, None, split.cold_items, config.ks,
                            np.random.default_rng(config.seed + 4))
    if half == "itemknn":
        scorer = _parts_scorer(split.train, users, unit, None, ("itemknn",))
    else:
        liked = np.asarray(split.train.sum(axis=0)).ravel() > 0
        scorer = _parts_scorer(split.train, users, unit, stream_factors(unit, rows, liked, ridge=config.ridge))
    return {"random": random, **_visual_and_hybrid(scorer, users, split.cold_test, None, split.cold_items, weight,
                                                   config.ks)}
