"""The quality gate (DESIGN §9, §11): a run is served unless a method it serves scores below
``RECSKETCH_GATE_MIN_RATIO`` × a kept served run's with 95 % confidence (or below
``RECSKETCH_GATE_MIN_NDCG``, if that is set), all scored on the same held-out likes.

What is scored is what each run would serve: its neighbour lists of each method
(``TopKStore.for_run``) read as item-item recommendations, a user's score for a model being the sum
of its scores in the lists of the models the user liked. The candidate's lists and every kept
loaded run's are ranked for the same users: their training likes are the run's likes less the
held-out ones (``recsketch.heldout``), their test the held-out likes, which no run's lists were
fitted on, whatever day it was made. So the bar is the kept runs' honest quality, not how much
each memorised, and a catalogue that grows does not move it by itself: an older run is scored
on the same split, its lists simply lack the new models.

Each comparison is paired, user by user (``recsketch.significance``): the run is refused only
when the one-sided upper bound of mean(candidate − ratio × kept run) is below zero, each kept run
compared at 95 % / (the number of kept runs) so that taking the worst of several noisy
comparisons does not refuse a good run more often than 5 % of the time. With fewer than
``RECSKETCH_GATE_MIN_USERS`` held-out users it warns and loads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import sparse

from recsketch.contracts import Method, TopK
from recsketch.evaluation import Candidates, EvaluationConfig, Likes, rank_users, split_likes, users_with
from recsketch.significance import Paired, paired

METRIC = "ndcg@10"
SPLIT = "served"  # the run_metrics split of the served lists' scores


def list_matrix(lists: TopK, position: Mapping[str, int], n_items: int) -> sparse.csr_matrix:
    """Model j's list as row j: the score of each model it lists, in today's item codes (models
    not in today's catalogue dropped, on either side)."""
    rows = np.array([position.get(mid, -1) for mid in lists.mids], dtype=np.int64)
    listed = np.asarray(lists.indices)
    valid = listed >= 0
    codes = np.full(listed.shape, -1, dtype=np.int64)
    codes[valid] = rows[listed[valid]]
    keep = valid & (codes >= 0) & (rows[:, None] >= 0)
    owner = np.broadcast_to(rows[:, None], listed.shape)[keep]
    return sparse.csr_matrix((np.asarray(lists.scores, np.float64)[keep], (owner, codes[keep])),
                             shape=(n_items, n_items))


def list_scorer(train: sparse.csr_matrix, lists: sparse.csr_matrix
                ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A user's score for each model of a group (ascending item codes): the summed list scores
    over the models they liked (-inf for a model none of their liked models lists: it is never
    recommended)."""
    lists = lists.tocsc()  # sliced by columns (item blocks) below: one slice reads only its columns
    shown = lists.copy()
    shown.data[:] = 1.0

    def score(users: np.ndarray, codes: np.ndarray) -> np.ndarray:
        contiguous = len(codes) and int(codes[-1]) - int(codes[0]) + 1 == len(codes)
        items = slice(int(codes[0]), int(codes[-1]) + 1) if contiguous else codes
        liked = train[users]
        scores = (liked @ lists[:, items]).toarray()
        scores[(liked @ shown[:, items]).toarray() == 0] = -np.inf
        return scores

    return score


@dataclass
class Verdict:
    passed: bool
    lines: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # the candidate's mean, per method
    comparisons: dict[str, Paired] = field(default_factory=dict)  # per method, the one that decided

    def metrics(self) -> dict[str, dict[str, float]]:
        """Per method, what ``run_metrics`` keeps of the gate's comparison (split ``served``)."""
        rows: dict[str, dict[str, float]] = {}
        for method, value in self.scores.items():
            rows[method] = {METRIC: value}
            if (comparison := self.comparisons.get(method)) is not None:
                rows[method] |= {f"reference_{METRIC}": comparison.reference, "difference": comparison.difference,
                                 "difference_se": comparison.se, "users": float(comparison.users)}
        return rows


@dataclass(frozen=True)
class ServedScores:
    """Per-user NDCG@10 of each method's lists, the candidate's and each kept run's, for the same
    users in the same order."""

    candidate: dict[str, np.ndarray]
    kept: dict[str, dict[str, np.ndarray]]
    users: int


def served_scores(likes: pd.DataFrame, candidate: Mapping[str, TopK], kept: Mapping[str, Mapping[str, TopK]],
                  config: EvaluationConfig) -> ServedScores:
    """Each user's NDCG@10 under the candidate's lists and under each kept run's, per method, on
    the held-out likes of ``likes`` over the candidate's models."""
    mids = candidate[Method.VISUAL.value].mids
    data = Likes.from_frame(likes, mids)
    split = split_likes(data, config)
    position = {mid: code for code, mid in enumerate(mids)}
    users = users_with(split.test, split.train, config.max_users, np.random.default_rng(config.seed + 5))
    everything = Candidates(np.arange(len(mids)), len(mids))

    def ndcg(lists: TopK) -> np.ndarray:
        scorer = list_scorer(split.train, list_matrix(lists, position, len(mids)))
        return rank_users(scorer, users, split.test, split.train, everything, ks=(10,))[0].user_ndcg(10)

    ours = {method: ndcg(lists) for method, lists in candidate.items()}
    theirs = {run_id: {method: ndcg(lists) for method, lists in by_method.items() if method in candidate}
              for run_id, by_method in kept.items()}
    return ServedScores(ours, theirs, len(users))


def judge(likes: pd.DataFrame, candidate: Mapping[str, TopK], kept: Mapping[str, Mapping[str, TopK]], *,
          min_ratio: float, min_ndcg: float, min_users: int = 0, config: EvaluationConfig | None = None,
          confidence: float = 0.95) -> Verdict:
    """Whether each served method of the candidate holds: refused only when it is below
    ``min_ratio`` × some kept run's (or below ``min_ndcg``) with ``confidence``, Bonferroni-
    corrected over the kept runs; with fewer than ``min_users`` users nothing is refused. The
    lines say each method's deciding comparison: both means, the difference, its standard error
    and the users."""
    config = config or EvaluationConfig(cold_items=0.0)
    scored = served_scores(likes, candidate, kept, config)
    verdict = Verdict(True, scores={method: float(values.mean()) if len(values) else 0.0
                                    for method, values in scored.candidate.items()})
    for method, ours in scored.candidate.items():
        references = {run_id: values[method] for run_id, values in scored.kept.items() if method in values}
        comparisons = {f"kept run {run_id}": paired(ours, theirs, min_ratio, len(references), confidence)
                       for run_id, theirs in references.items()} if min_ratio > 0 else {}
        if min_ndcg > 0:
            comparisons[f"RECSKETCH_GATE_MIN_NDCG {min_ndcg}"] = paired(ours, np.full(len(ours), min_ndcg),
                                                                        confidence=confidence)
        if not comparisons:
            verdict.lines.append(f"{method} served {METRIC} = {verdict.scores[method]:.4f} on {scored.users} users, "
                                 "no kept run to compare with: passed")
            continue
        against = min(comparisons, key=lambda name: (comparisons[name].upper, name))
        deciding = verdict.comparisons[method] = comparisons[against]
        head = (f"{method} served {METRIC} {deciding.describe()}, against {against}"
                + (f" (the lowest bound of {len(references)} kept runs)" if len(references) > 1 else ""))
        if scored.users < min_users:
            verdict.lines.append(f"{head}: fewer than RECSKETCH_GATE_MIN_USERS {min_users} held-out users, "
                                 "not judged: WARNING, loaded")
            continue
        verdict.passed &= not deciding.below
        verdict.lines.append(f"{head}: " + ("FAILED" if deciding.below else "passed"))
    return verdict


def comparison_cell(metrics: Mapping[str, float], method: str) -> str:
    """The gate's comparison of a method as stored with a run (``served/{method}/...``): its
    NDCG@10 / the kept run's, the difference ± its standard error (users)."""
    value = metrics.get(f"{SPLIT}/{method}/{METRIC}")
    if value is None:
        return "-"
    cell = f"{value:.4f}"
    reference = metrics.get(f"{SPLIT}/{method}/reference_{METRIC}")
    cell += f" / {reference:.4f}" if reference is not None else " / -"
    difference, se = metrics.get(f"{SPLIT}/{method}/difference"), metrics.get(f"{SPLIT}/{method}/difference_se")
    if difference is not None and se is not None:
        cell += f", {difference:+.4f} ± {se:.4f}"
    if (users := metrics.get(f"{SPLIT}/{method}/users")) is not None:
        cell += f" ({int(users)})"
    return cell


def trend(history: list[dict], methods: tuple[str, ...] = ("visual", "hybrid")) -> list[str]:
    """Lines of each loaded run's gate comparison at its load (``store.metrics_history``, oldest
    first), per method: ``comparison_cell``."""
    width = 58
    lines = [f"{'at load':<40}" + "".join(f"{m + ': served / kept, difference ± s.e. (users)':<{width}}"
                                          for m in methods).rstrip()]
    for run in history:
        name = run["run_id"] + (" (live)" if run["is_live"] else "")
        cells = "".join(f"{comparison_cell(run['metrics'], method):<{width}}" for method in methods)
        lines.append(f"{name[:39]:<40}{cells}".rstrip())
    return lines
