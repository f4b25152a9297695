"""Likes thresholding, as in rec-a-sketch: keep users and models with ≥ N likes, until stable.

Removing a sparse user can push a model under the threshold and vice versa, so one pass is
not enough; the loop stops when a pass removes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class ThresholdResult:
    likes: pd.DataFrame  # columns mid, uid: the surviving likes
    iterations: int
    likes_before: int
    users_before: int
    models_before: int

    @property
    def models(self) -> list[str]:
        return sorted(self.likes["mid"].unique())

    def summary(self) -> str:
        return (f"threshold: {self.likes_before} likes, {self.users_before} users, "
                f"{self.models_before} models -> {len(self.likes)} likes, "
                f"{self.likes['uid'].nunique()} users, {self.likes['mid'].nunique()} models "
                f"in {self.iterations} passes")


def threshold_likes(pairs: Iterable[tuple[str, str]] | pd.DataFrame, min_likes: int = 5) -> ThresholdResult:
    """Drop duplicate (mid, uid) pairs, then users and models with fewer than ``min_likes``."""
    likes = pairs if isinstance(pairs, pd.DataFrame) else pd.DataFrame(list(pairs), columns=["mid", "uid"])
    likes = likes[["mid", "uid"]].drop_duplicates().reset_index(drop=True)
    before = (len(likes), likes["uid"].nunique(), likes["mid"].nunique())
    iterations = 0
    while True:
        iterations += 1
        user_likes = likes.groupby("uid")["mid"].transform("size")
        model_likes = likes.groupby("mid")["uid"].transform("size")
        keep = (user_likes >= min_likes) & (model_likes >= min_likes)
        if keep.all():
            break
        likes = likes[keep].reset_index(drop=True)
    return ThresholdResult(likes, iterations, *before)
