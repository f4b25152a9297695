"""The held-out likes (DESIGN §11): a fixed share of likes, chosen by a hash of (user, model),
that no served method is ever fitted on, so that every run's lists can be scored on them.

A served hybrid fitted on all likes scores its own training likes when the gate holds some out:
it measures how much a configuration memorises, not what it recommends (issue 36: signal-free
likes scored 0.51 on lists built from them, 0.12 on lists built without). A hash makes the share
the same likes on every day and in every process, whatever else changes, so a kept run's lists
never saw today's held-out likes either: the gate compares runs on likes none of them saw.
``evaluate`` takes them as its test split (its validation is carved from the rest), plan_hybrid
and the ItemKNN shards fit on the rest only (``fitting_likes``).

What it costs: the served likes half learns from 80 % of the likes. The share is a constant, not
a setting: changing it would put likes some kept run was fitted on into the held-out share.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from recsketch.likes import like_hashes

HELD_OUT_SHARE = 0.2
_SALT = np.uint64(0xD6E8FEB86659FD93)  # the held-out draw independent of other uses of the like hashes


def held_out(likes: pd.DataFrame) -> np.ndarray:
    """Whether each row of a (mid, uid) frame is a held-out like."""
    hashes = like_hashes(likes)
    with np.errstate(over="ignore"):  # splitmix64's finaliser: every bit of the hash reaches the top ones
        mixed = hashes ^ _SALT
        mixed = (mixed ^ (mixed >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        mixed ^= mixed >> np.uint64(31)
    return (mixed >> np.uint64(40)) < np.uint64(round(HELD_OUT_SHARE * (1 << 24)))


def fitting_likes(likes: pd.DataFrame) -> pd.DataFrame:
    """The likes a served method may fit on: all but the held-out ones."""
    return likes[~held_out(likes)].reset_index(drop=True)
