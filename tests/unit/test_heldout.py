"""The held-out likes (DESIGN §11): a fixed share chosen by a hash of the like, the same likes
whatever else the frame holds, never among the likes a served method fits on."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recsketch.evaluation import EvaluationConfig, Likes, split_likes
from recsketch.heldout import HELD_OUT_SHARE, fitting_likes, held_out


def frame(users: int = 400, models: int = 300, likes: int = 20_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"mid": [f"m{i}" for i in rng.integers(0, models, likes)],
                         "uid": [f"u{i}" for i in rng.integers(0, users, likes)]}).drop_duplicates()


def test_the_share_is_held_out_and_a_like_is_held_out_whatever_else_the_frame_holds() -> None:
    likes = frame()
    mask = held_out(likes)
    assert abs(mask.mean() - HELD_OUT_SHARE) < 0.015  # ~17,000 likes: 4 standard errors
    # another day: a third of the likes gone, others added, rows shuffled, names as categories
    later = pd.concat([likes.iloc[::3], frame(seed=1)]).sample(frac=1.0, random_state=2)
    later_mask = held_out(later.astype("category"))
    before = dict(zip(zip(likes["uid"], likes["mid"], strict=True), mask, strict=True))
    again = [before[pair] == held
             for pair, held in zip(zip(later["uid"], later["mid"], strict=True), later_mask, strict=True)
             if pair in before]
    assert len(again) > 5_000 and all(again)
    fitted = fitting_likes(likes)
    assert len(fitted) == int((~mask).sum()) and not held_out(fitted).any()


def test_the_split_tests_on_the_held_out_likes_and_validation_never_sees_them() -> None:
    likes = frame()
    data = Likes.from_frame(pd.concat([likes, likes.iloc[:500]]))  # repeats count once
    assert data.held_out is not None and len(data.users) == len(likes)
    split = split_likes(data, EvaluationConfig(cold_items=0.0))
    uids, mids = sorted(set(likes["uid"])), data.item_ids  # the codes: sorted names
    expected = likes[held_out(likes)]
    assert set(zip(*split.test.nonzero(), strict=True)) == {
        (uids.index(uid), mids.index(mid)) for uid, mid in zip(expected["uid"], expected["mid"], strict=True)}
    assert split.train.multiply(split.test).nnz == 0 and split.train.nnz + split.test.nnz == len(likes)
    assert "held-out" in split.info["holdout"]
    random = split_likes(data, EvaluationConfig(cold_items=0.0, random_holdout=True))
    assert (random.test != split.test).nnz > 0
