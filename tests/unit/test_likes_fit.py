"""When the hybrid's ALS fit is kept and when it is fitted again (``recsketch.likes_fit``): the
likes' drift is a count of the likes added or gone, whatever the frame's column types, and each
reason to refit is named."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recsketch.contracts import TopK
from recsketch.likes_fit import HybridLatest, LikesFit, drift, like_keys, refit_reason

PARAMS = {"factors": 4.0, "regularization": 0.05}


def frame(pairs: list[tuple[str, str]], categorical: bool = False) -> pd.DataFrame:
    likes = pd.DataFrame(pairs, columns=["mid", "uid"])
    return likes.astype({"mid": "category", "uid": "category"}) if categorical else likes


def test_the_drift_counts_likes_added_and_gone_whatever_the_column_types() -> None:
    fitted = [(f"m{i}", f"u{j}") for i in range(10) for j in range(i % 3 + 1)]  # 19 likes
    keys = like_keys(frame(fitted))
    assert len(keys) == len(fitted)
    assert (like_keys(frame(fitted[::-1] + fitted[:3], categorical=True)) == keys).all()  # order, repeats, dtype
    assert (like_keys(frame([("u1", "m1")])) != like_keys(frame([("m1", "u1")]))).all()  # (mid, uid) is ordered
    day = [*fitted[2:], ("m99", "u0"), ("m98", "u7"), ("m1", "u5")]  # 2 gone, 3 added
    assert drift(keys, like_keys(frame(day))) == 5 / 19
    assert drift(keys, keys) == 0.0


def latest(fitted_at: float, params: dict[str, float] = PARAMS, key: str = "k") -> HybridLatest:
    zeros = np.zeros((2, 4), dtype=np.float32)
    fit = LikesFit(["a", "b"], zeros, zeros, ["u"], zeros[:1], np.eye(4, dtype=np.float32), params,
                   np.zeros(0, np.uint64), fitted_at)
    return HybridLatest(fit, TopK(["a", "b"], np.array([[1], [0]]), np.ones((2, 1), np.float32), key, ["", ""]), 0.5)


def test_each_reason_to_refit_is_named_and_none_keeps_the_fit() -> None:
    now = 1_000_000.0
    kept = latest(now - 86_400)
    assert refit_reason(kept, dict(PARAMS), "k", 0.01, 0.05, 7, now) is None
    assert refit_reason(kept, {"factors": 4, "regularization": 0.05}, "k", 0.01, 0.05, 7, now) is None  # ints too
    assert refit_reason(None, PARAMS, "k", 0.0, 0.05, 7, now) == "no earlier fit is kept"
    assert "another backbone" in str(refit_reason(kept, PARAMS, "other", 0.0, 0.05, 7, now))
    assert "other ALS parameters" in str(refit_reason(kept, {**PARAMS, "factors": 8.0}, "k", 0.0, 0.05, 7, now))
    assert "1.0 days old" in str(refit_reason(kept, PARAMS, "k", 0.0, 0.05, 0.5, now))
    assert "6.00% of its likes changed" in str(refit_reason(kept, PARAMS, "k", 0.06, 0.05, 7, now))
    assert refit_reason(kept, PARAMS, "k", 0.0, 0.0, 7, now) is None  # drift 0 refits only once a like changed
