"""Paired comparisons of two rankings of the same users (DESIGN §11): what the gate refuses on
and what evaluate's choices must beat to change.

Two means of per-user NDCG differ by noise alone: at 40 users a signal-free day's difference had
a standard error of 0.063 (issue 36), three times what the gate's old rule missed by. Each user
ranks under both, so the difference is taken user by user and its standard error is that of a
mean of differences (a paired t interval), far smaller than two separate means' errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Paired:
    """mean(candidate − ratio × reference) over the same users, with its standard error and a
    one-sided upper bound at ``confidence``, Bonferroni-corrected for ``comparisons`` made at
    once (each at 1 − (1 − confidence) / comparisons)."""

    candidate: float  # mean per-user score
    reference: float
    ratio: float
    difference: float
    se: float
    users: int
    comparisons: int = 1
    confidence: float = 0.95

    @property
    def level(self) -> float:
        """The confidence of each one of the comparisons."""
        return 1.0 - (1.0 - self.confidence) / max(1, self.comparisons)

    @property
    def upper(self) -> float:
        """The one-sided upper bound of the mean difference (inf with fewer than two users)."""
        if self.users < 2 or not math.isfinite(self.se):
            return math.inf
        from scipy import stats  # 1.3 s to import: only where a bound is asked for

        return self.difference + float(stats.t.ppf(self.level, self.users - 1)) * self.se

    @property
    def below(self) -> bool:
        """Whether the candidate is below ratio × the reference with the confidence asked."""
        return self.upper < 0

    def describe(self) -> str:
        scaled = f"{self.ratio:g} x " if self.ratio != 1 else ""
        return (f"{self.candidate:.4f} vs {scaled}{self.reference:.4f}: difference {self.difference:+.4f} "
                f"(standard error {self.se:.4f}, {self.level:.1%} upper bound {self.upper:+.4f}) "
                f"on {self.users} users")


def paired(candidate: np.ndarray, reference: np.ndarray, ratio: float = 1.0, comparisons: int = 1,
           confidence: float = 0.95) -> Paired:
    """The paired comparison of per-user scores (the same users, in the same order)."""
    candidate, reference = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    if candidate.shape != reference.shape:
        raise ValueError(f"paired scores need the same users: {candidate.shape} vs {reference.shape}")
    users = len(candidate)
    differences = candidate - ratio * reference
    se = float(differences.std(ddof=1) / math.sqrt(users)) if users >= 2 else math.inf
    means = [float(values.mean()) if users else 0.0 for values in (candidate, reference, differences)]
    return Paired(means[0], means[1], ratio, means[2], se, users, comparisons, confidence)


def beats(challenger: np.ndarray, incumbent: np.ndarray) -> bool:
    """Whether the challenger's per-user scores beat the incumbent's by more than the standard
    error of their mean difference: what a choice must show to replace yesterday's, so that
    noise neither flips it nor reblends every served list."""
    comparison = paired(challenger, incumbent)
    return comparison.users >= 2 and comparison.difference > comparison.se
