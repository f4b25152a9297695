"""Likes thresholding, as in rec-a-sketch: keep users and models with ≥ N likes, until stable.

Removing a sparse user can push a model under the threshold and vice versa, so one pass is
not enough; the loop stops when a pass removes nothing.

The work is done on integer codes (each mid and uid factorised once): a pass is two
``np.bincount``s and a mask, so 60 M likes cost a few hundred MB and seconds, not a Python
object per like.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
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
        return sorted(str(mid) for mid in self.likes["mid"].unique())

    def summary(self) -> str:
        return (f"threshold: {self.likes_before} likes, {self.users_before} users, "
                f"{self.models_before} models -> {len(self.likes)} likes, "
                f"{self.likes['uid'].nunique()} users, {self.likes['mid'].nunique()} models "
                f"in {self.iterations} passes")


def threshold_codes(mids: np.ndarray, uids: np.ndarray, min_likes: int) -> tuple[np.ndarray, int]:
    """(mask of the likes that survive, passes) for likes given as integer codes (each pair once)."""
    n_models = int(mids.max()) + 1 if len(mids) else 0
    n_users = int(uids.max()) + 1 if len(uids) else 0
    keep = np.ones(len(mids), dtype=bool)
    kept = len(mids)
    passes = 0
    while True:
        passes += 1
        model_likes = np.bincount(mids[keep], minlength=n_models)
        user_likes = np.bincount(uids[keep], minlength=n_users)
        keep &= (model_likes[mids] >= min_likes) & (user_likes[uids] >= min_likes)
        now = int(keep.sum())
        if now == kept:
            return keep, passes
        kept = now


def threshold_likes(pairs: Iterable[tuple[str, str]] | pd.DataFrame, min_likes: int = 5) -> ThresholdResult:
    """Drop duplicate (mid, uid) pairs, then users and models with fewer than ``min_likes``."""
    likes = pairs if isinstance(pairs, pd.DataFrame) else pd.DataFrame(list(pairs), columns=["mid", "uid"])
    mid_codes, mid_names = pd.factorize(likes["mid"], sort=False)
    uid_codes, uid_names = pd.factorize(likes["uid"], sort=False)
    n_users = max(len(uid_names), 1)
    keys = mid_codes.astype(np.int64) * n_users + uid_codes
    del mid_codes, uid_codes
    keys.sort()  # in place; duplicates become neighbours (the order of likes does not matter here)
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if len(keys) else keys
    mids, uids = keys // n_users, keys % n_users
    del keys
    before = (len(mids), int(np.count_nonzero(np.bincount(uids))) if len(uids) else 0,
              int(np.count_nonzero(np.bincount(mids))) if len(mids) else 0)
    keep, passes = threshold_codes(mids, uids, min_likes)
    # categoricals over the codes: no Python string per surviving like. The names are passed as
    # plain values: factorize() of a categorical returns a CategoricalIndex, and from_codes()
    # would read that index's categories (in another order), not its values
    survivors = pd.DataFrame({"mid": pd.Categorical.from_codes(mids[keep], pd.Index(np.asarray(mid_names))),
                              "uid": pd.Categorical.from_codes(uids[keep], pd.Index(np.asarray(uid_names)))})
    return ThresholdResult(survivors, passes, *before)


def like_hashes(likes: pd.DataFrame) -> np.ndarray:
    """A 64-bit hash of each row's (uid, mid) of a (mid, uid) frame: the same like hashes the
    same on every day, in every process (each name hashed once)."""
    if not len(likes):
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):  # the mix wraps around 2^64 by design
        return _hashed(likes["uid"]) * np.uint64(0x9E3779B97F4A7C15) ^ _hashed(likes["mid"])


def _hashed(column: pd.Series) -> np.ndarray:
    names, codes = names_and_codes(column)
    return pd.util.hash_array(np.asarray(names, dtype=object))[codes]


def names_and_codes(column: pd.Series) -> tuple[list[str], np.ndarray]:
    """A column's distinct names and each row's code into them (categories kept as they are)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [str(name) for name in column.cat.categories], column.cat.codes.to_numpy().astype(np.int64)
    codes, names = pd.factorize(column.astype(str).to_numpy(), sort=True)
    return [str(name) for name in names], codes.astype(np.int64)
