"""The quality gate against the kept runs (issue 24 part 5, DESIGN §9): every served method's lists
are scored on the same held-out likes beside the best kept run's, so a slow slide is stopped on
the day it falls below RECSKETCH_GATE_MIN_RATIO x the best, where a gate against yesterday never
stops it; a grown catalogue with lists as good passes; force loads a refused run."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsketch import gate
from recsketch.config import Settings
from recsketch.contracts import Method, RunLikes, TopK, TopKStore
from recsketch.db import store
from recsketch.demo import taste_model_likes
from recsketch.errors import QualityGateFailed
from recsketch.evaluation import EvaluationConfig
from recsketch.stages.load import load_stage

GROUPS, PER_GROUP, K = 20, 10, 5


def catalogue(groups: int = GROUPS) -> tuple[list[str], dict[str, int], pd.DataFrame]:
    mids = [f"{i:032x}" for i in range(groups * PER_GROUP)]
    group = {mid: i // PER_GROUP for i, mid in enumerate(mids)}
    likes = taste_model_likes({mid: f"g{g}" for mid, g in group.items()}, [f"u{n}" for n in range(400)],
                              random.Random(0), favourites=2, favourite_likes=6, noise_likes=2)
    return mids, group, pd.DataFrame(likes, columns=["mid", "uid"])


def lists(mids: list[str], group: dict[str, int], signal: float, seed: int, hybrid: bool = False) -> TopK:
    """Each model's top-K: a model of its own group with probability ``signal``, else any model."""
    rng = np.random.default_rng(seed)
    members: dict[int, list[int]] = {}
    for row, mid in enumerate(mids):
        members.setdefault(group[mid], []).append(row)
    indices = np.zeros((len(mids), K), dtype=np.int64)
    for row, mid in enumerate(mids):
        mates = [m for m in members[group[mid]] if m != row]
        others = [m for m in range(len(mids)) if m != row]
        picked: list[int] = []
        while len(picked) < K:
            pool = mates if rng.random() < signal else others
            choice = int(rng.choice(pool))
            if choice not in picked:
                picked.append(choice)
        indices[row] = picked
    scores = np.tile(np.linspace(0.9, 0.5, K, dtype=np.float32), (len(mids), 1))
    return TopK(mids, indices, scores, "hybrid" if hybrid else "key", ["v"] * len(mids))


def prepare(settings: Settings, run_id: str, likes: pd.DataFrame, visual: TopK, hybrid: TopK | None = None) -> Path:
    folder = settings.run_dir(run_id)
    folder.mkdir(parents=True)
    RunLikes.write(folder, likes)
    TopKStore.for_run(folder).write(visual)
    if hybrid is not None:
        TopKStore.for_run(folder, Method.HYBRID).write(hybrid)
    return folder


def test_a_slow_slide_is_stopped_on_the_day_it_falls_below_the_ratio_of_the_best_kept_run(tmp_path: Path) -> None:
    mids, group, likes = catalogue()
    settings = Settings(data_dir=tmp_path / "data", gate_min_ratio=0.9)
    engine = store.connect(settings.resolved_database_url)
    signals = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7]  # each day's lists a little worse than the day before's
    scores, stopped = [], None
    for day, signal in enumerate(signals):
        run = f"day-{day}"
        folder = prepare(settings, run, likes, lists(mids, group, signal, day), lists(mids, group, signal, 50 + day,
                                                                                      hybrid=True))
        ours, _, _ = gate.served_scores(likes, {"visual": TopKStore.for_run(folder).require("x")}, {},
                                        EvaluationConfig(cold_items=0.0))
        scores.append(ours["visual"])
        try:
            load_stage(settings, folder, run, progress=lambda _: None)
        except QualityGateFailed as exc:
            stopped = day
            assert re.search(r"visual served ndcg@10 = [0-9.]+, the best kept run day-\d [0-9.]+.*FAILED", str(exc))
            assert store.live_run(engine)["run_id"] == f"day-{day - 1}"  # the last good run stays served
            break
    assert stopped is not None, scores
    assert scores[stopped] < 0.9 * max(scores[:stopped]) <= min(scores[:stopped]), scores
    # a gate against yesterday would have let every one of these days through
    assert all(later >= 0.9 * earlier for earlier, later in itertools.pairwise(scores[:stopped + 1])), scores
    # force loads it anyway; the metrics stored with each loaded run are its served scores
    load_stage(settings, settings.run_dir(f"day-{stopped}"), f"day-{stopped}", force=True, progress=lambda _: None)
    history = store.metrics_history(engine)
    assert [h["run_id"] for h in history] == [f"day-{d}" for d in range(stopped + 1)]
    assert [h["metrics"]["served/visual/ndcg@10"] for h in history] == pytest.approx(scores[:stopped + 1], abs=1e-5)
    assert all("served/hybrid/ndcg@10" in h["metrics"] for h in history)  # hybrid is gated too
    lines = gate.trend(history)  # what `recsketch evaluate` prints under its table
    assert len(lines) == stopped + 2 and lines[-1].startswith(f"day-{stopped} (live)")
    last = lines[-1].split()
    assert float(last[2]) == pytest.approx(scores[stopped], abs=1e-4)
    assert float(last[3]) == pytest.approx(max(scores[:stopped]), abs=1e-4)  # the best before it


def test_the_hybrid_lists_are_gated_too(tmp_path: Path) -> None:
    mids, group, likes = catalogue()
    settings = Settings(data_dir=tmp_path / "data", gate_min_ratio=0.9)
    good = prepare(settings, "good", likes, lists(mids, group, 0.9, 1), lists(mids, group, 0.9, 2, hybrid=True))
    load_stage(settings, good, "good", progress=lambda _: None)
    worse = prepare(settings, "worse", likes, lists(mids, group, 0.9, 3), lists(mids, group, 0.3, 4, hybrid=True))
    with pytest.raises(QualityGateFailed, match=r"hybrid served ndcg@10 .*FAILED") as refused:
        load_stage(settings, worse, "worse", progress=lambda _: None)
    assert "visual served" not in str(refused.value)  # the visual lists passed


def test_a_grown_catalogue_with_lists_as_good_passes_and_an_absolute_floor_refuses(tmp_path: Path) -> None:
    mids, group, likes = catalogue(groups=16)
    settings = Settings(data_dir=tmp_path / "data", gate_min_ratio=0.9)
    load_stage(settings, prepare(settings, "small", likes, lists(mids, group, 0.9, 1)), "small",
               progress=lambda _: None)
    grown_mids, grown_group, grown_likes = catalogue(groups=GROUPS)  # four new groups, their fans' likes
    grown = prepare(settings, "grown", grown_likes, lists(grown_mids, grown_group, 0.9, 2))
    load_stage(settings, grown, "grown", progress=lambda _: None)
    assert store.live_run(store.connect(settings.resolved_database_url))["run_id"] == "grown"
    strict = settings.with_overrides(gate_min_ratio=0.0, gate_min_ndcg=0.99)
    again = prepare(settings, "again", grown_likes, lists(grown_mids, grown_group, 0.9, 3))
    with pytest.raises(QualityGateFailed, match=r"RECSKETCH_GATE_MIN_NDCG 0.99.*FAILED"):
        load_stage(strict, again, "again", progress=lambda _: None)
