"""The quality gate (DESIGN §9): a run is served only if every method it serves scores at least
``RECSKETCH_GATE_MIN_RATIO`` × the best of the kept served runs, and ``RECSKETCH_GATE_MIN_NDCG``
if that is set, all scored on the same held-out likes.

What is scored is what each run would serve: its neighbour lists of each method
(``TopKStore.for_run``) read as item-item recommendations, a user's score for a model being the sum
of its scores in the lists of the models the user liked. The candidate's lists and every kept
loaded run's are ranked for the same users on today's split of today's likes, so the bar is the
best run retention still keeps, not yesterday's (a slide of a few percent a day is stopped, not
ratcheted down), and a catalogue that grows does not move it by itself: an older run is scored
on the same split, its lists simply lack the new models.

The lists were made from all of a run's likes, the held-out ones among them (the hybrid's ALS
saw them): every run compared had the same advantage, so the comparison stands, but the
figures are not the held-out quality that ``evaluate`` reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import sparse

from recsketch.contracts import Method, TopK
from recsketch.evaluation import EvaluationConfig, Likes, _users_with, rank_metrics, split_likes

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
    scores: dict[str, float] = field(default_factory=dict)  # the candidate's, per method


def served_scores(likes: pd.DataFrame, candidate: Mapping[str, TopK], kept: Mapping[str, Mapping[str, TopK]],
                  config: EvaluationConfig) -> tuple[dict[str, float], dict[str, dict[str, float]], int]:
    """NDCG@10 of the candidate's lists and of each kept run's, per method, on one split of
    ``likes`` over the candidate's models; and how many users were ranked."""
    mids = candidate[Method.VISUAL.value].mids
    data = Likes.from_frame(likes, mids)
    split = split_likes(data, config)
    position = {mid: code for code, mid in enumerate(mids)}
    users = _users_with(split.test, split.train, config.max_users, np.random.default_rng(config.seed + 5))
    everything = np.arange(len(mids))

    def ndcg(lists: TopK) -> float:
        scorer = list_scorer(split.train, list_matrix(lists, position, len(mids)))
        return rank_metrics(scorer, users, split.test, split.train, everything, (10,))[METRIC]

    ours = {method: ndcg(lists) for method, lists in candidate.items()}
    theirs = {run_id: {method: ndcg(lists) for method, lists in by_method.items() if method in candidate}
              for run_id, by_method in kept.items()}
    return ours, theirs, len(users)


def judge(likes: pd.DataFrame, candidate: Mapping[str, TopK], kept: Mapping[str, Mapping[str, TopK]], *,
          min_ratio: float, min_ndcg: float, config: EvaluationConfig | None = None) -> Verdict:
    """Whether each served method of the candidate reaches max(min_ratio × the best kept run's,
    min_ndcg); the lines say each comparison."""
    config = config or EvaluationConfig(cold_items=0.0)
    ours, theirs, users = served_scores(likes, candidate, kept, config)
    verdict = Verdict(True, scores=ours)
    for method, value in ours.items():
        scored = {run_id: values[method] for run_id, values in theirs.items() if method in values}
        best_run = max(scored, key=lambda run_id: (scored[run_id], run_id)) if scored else None
        floor = max(min_ratio * scored[best_run] if best_run is not None else 0.0, min_ndcg)
        reference = (f"the best kept run {best_run} {scored[best_run]:.4f}" if best_run is not None
                     else "no kept run to compare with")
        ok = value >= floor
        verdict.passed &= ok
        verdict.lines.append(f"{method} served {METRIC} = {value:.4f}, {reference} (floor {floor:.4f}: "
                             f"max({min_ratio} x best, RECSKETCH_GATE_MIN_NDCG {min_ndcg})) on {users} users: "
                             + ("passed" if ok else "FAILED"))
    return verdict


def trend(history: list[dict], methods: tuple[str, ...] = ("visual", "hybrid")) -> list[str]:
    """Lines of each loaded run's served NDCG@10 at its load (``store.metrics_history``, oldest
    first) beside the best of the runs before it: the reference the gate held it to, per method."""
    lines = [f"{'served ' + METRIC + ' at load':<40}" + "".join(f"{m:>10}{'best before':>13}" for m in methods)]
    best: dict[str, float] = {}
    for run in history:
        cells = []
        for method in methods:
            value = run["metrics"].get(f"{SPLIT}/{method}/{METRIC}")
            reference = best.get(method)
            cells.append((f"{value:>10.4f}" if value is not None else f"{'-':>10}")
                         + (f"{reference:>13.4f}" if reference is not None else f"{'-':>13}"))
            if value is not None:
                best[method] = max(value, reference if reference is not None else value)
        name = run["run_id"] + (" (live)" if run["is_live"] else "")
        lines.append(f"{name[:39]:<40}" + "".join(cells))
    return lines
