"""Hybrid lists worked forward across days (issue 23): the ALS fit is kept and new models are
folded in until the likes drift, so a day computes only what changed. Over random sequences of
days that add, delete and replace models and add likes, each day's served hybrid lists equal
the exact blend of that day's visual rows and served likes rows, every model the fit kept has
its likes row to the bit, and a folded-in model has ALS's own half-step for it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsketch.config import Settings
from recsketch.contracts import LIKES_FIT_FILE, EvaluationReport, RunLikes, SimilarityPlan, TopKStore
from recsketch.features.keys import backbone_key
from recsketch.heldout import held_out
from recsketch.hybrid import hybrid_embedding
from recsketch.likes_fit import LATEST_FILE, HybridLatest, LikesFit
from recsketch.stages import hybrid_stage
from tests.integration.test_incremental_neighbours import World
from tests.unit.test_hybrid_bound import assert_same_lists

WEIGHT = 0.5
PARAMS = {"factors": 4, "regularization": 0.05, "alpha": 2.0, "iterations": 6}


class LikedWorld(World):
    """The visual world, and users whose likes follow the pictures' groups."""

    def __init__(self, settings: Settings, seed: int) -> None:
        super().__init__(settings, seed)
        self.likes: set[tuple[str, str]] = set()
        self.users = 0
        self.weight = WEIGHT

    def like(self, mids: list[str], count: int = 6) -> None:
        """Each of ``mids`` gets ``count`` likes from users who like its neighbours too."""
        for mid in mids:
            for _ in range(count):
                self.likes.add((mid, f"u{int(self.rng.integers(0, 40 + self.users)):04d}"))

    def new_users(self, count: int) -> None:
        self.users += count

    def add(self, count: int) -> None:
        before = set(self.features)
        super().add(count)
        self.like(sorted(set(self.features) - before))

    def duplicate(self, count: int, new: int = 0) -> None:
        before = set(self.features)
        super().duplicate(count, new)
        self.like(sorted(set(self.features) - before))

    def next_day(self) -> tuple[dict, object]:
        _, folder = self.run()
        alive = [(mid, uid) for mid, uid in sorted(self.likes) if mid in self.features]
        RunLikes.write(folder, pd.DataFrame(alive, columns=["mid", "uid"]))
        report = {"hybrid": {"cf_weight": self.weight, "likes": "als"}, "als": {"params": PARAMS}}
        EvaluationReport(report).write(folder)
        return hybrid_stage(self.settings, folder), folder


def served_equals_the_exact_blend(world: LikedWorld, folder) -> LikesFit:  # type: ignore[no-untyped-def]
    """The run's hybrid lists against every pair of the day's blended rows, in float64."""
    served = TopKStore.for_run(folder, "hybrid").require("hybrid")
    fit = LikesFit.read(folder / LIKES_FIT_FILE)
    assert fit is not None and fit.mids == served.mids and sorted(served.mids) == sorted(world.features)
    unit = np.stack([world.features[m] for m in served.mids]).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    blended = hybrid_embedding(unit, fit.rows, world.weight).astype(np.float64)
    products = blended @ blended.T
    np.fill_diagonal(products, -np.inf)
    k = served.k
    order = np.lexsort((np.broadcast_to(np.arange(len(products)), products.shape), -products), axis=1)[:, :k]
    assert_same_lists(unit, fit.rows, world.weight, np.arange(len(unit)), served.indices, served.scores, order,
                      np.take_along_axis(products, order, 1).astype(np.float32))
    return fit


def half_step(fit: LikesFit, likers: list[str]) -> np.ndarray:
    """ALS's item factor given the users' factors, from its normal equations (implicit's
    convention: confidence alpha x like, regularization added to XᵀX)."""
    x = fit.user_factors.astype(np.float64)
    alpha, reg = PARAMS["alpha"], PARAMS["regularization"]
    liked = x[[fit.users.index(uid) for uid in likers]]
    a = x.T @ x + reg * np.eye(x.shape[1]) + (alpha - 1) * liked.T @ liked
    return np.linalg.solve(a, alpha * liked.sum(axis=0))


@pytest.mark.parametrize("seed,shard_rows", [(0, 50_000), (1, 50_000), (2, 5)])
def test_every_day_equals_the_exact_blend_and_kept_models_keep_their_rows(tmp_path, seed: int,
                                                                          shard_rows: int) -> None:
    settings = Settings(data_dir=tmp_path, top_k=4, neighbour_depth=12, hybrid_exact=True, threads=1,
                        similarity_shard_rows=shard_rows, als_refit_drift=0.5)
    world = LikedWorld(settings, seed)
    world.add(70)
    summary, folder = world.next_day()
    assert summary["mode"].startswith("bounded"), summary  # no earlier fit: ALS, then the bound over every row
    previous = served_equals_the_exact_blend(world, folder)
    modes, plans = [], []
    for _ in range(7):
        change = world.rng.integers(0, 4, size=6)  # new, replaced, removed models, new users, re-uploads: any mix
        world.new_users(int(change[3]))
        world.add(int(change[0]))
        world.replace(int(change[1]))
        world.remove(int(change[2]))
        world.duplicate(int(change[4]), new=int(change[5]))  # identical pictures made (and unmade)
        summary, folder = world.next_day()
        modes.append(summary["mode"])
        fit = served_equals_the_exact_blend(world, folder)
        for row, mid in enumerate(fit.mids):
            if mid in previous.mids:  # kept by the fit: its likes row to the bit
                assert (fit.rows[row] == previous.rows[previous.mids.index(mid)]).all()
            else:  # folded in: ALS's half-step from its likers
                likers = sorted(uid for liked, uid in world.likes if liked == mid
                                and not held_out(pd.DataFrame({"mid": [liked], "uid": [uid]}))[0])
                assert np.allclose(fit.item_factors[row], half_step(fit, likers), atol=1e-4)
        previous = fit
        plans.append(SimilarityPlan.read(folder, "hybrid"))
    assert all(mode.startswith(("incremental", "unchanged")) for mode in modes), modes
    assert any(mode.startswith("incremental") for mode in modes), modes
    if shard_rows < 10:  # a refresh past one shard's work is mapped over the shards
        assert any(plan.sharded and plan.mode == "incremental" for plan in plans), [plan.label for plan in plans]


def test_the_likes_drifting_refits_and_a_new_weight_reblends(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=tmp_path, top_k=4, neighbour_depth=12, hybrid_exact=True, threads=1,
                        als_refit_drift=0.2)
    world = LikedWorld(settings, 5)
    world.add(60)
    world.next_day()
    world.add(2)
    summary, folder = world.next_day()
    assert summary["mode"].startswith("incremental"), summary
    kept = HybridLatest.read(world.store.root / LATEST_FILE)
    assert kept is not None and kept.fit.folded == 2 and kept.topk.mids == TopKStore.for_run(folder, "hybrid").require(
        "h").mids
    world.like(sorted(world.features), count=3)  # many new likes: past a fifth of what the fit saw
    summary, folder = world.next_day()
    assert summary["mode"].startswith("bounded"), summary
    refit = served_equals_the_exact_blend(world, folder)
    assert refit.folded == 0 and refit.fitted_at > kept.fit.fitted_at
    assert backbone_key(settings) == TopKStore.for_run(folder, "hybrid").require("h").backbone_key
    world.weight = 0.3  # evaluate tuned another weight: the fit is kept, every list blended again
    world.add(1)
    summary, folder = world.next_day()
    assert summary["mode"].startswith("bounded"), summary
    again = served_equals_the_exact_blend(world, folder)
    assert again.folded == 1 and again.fitted_at == refit.fitted_at
