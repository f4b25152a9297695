"""Exact incremental visual neighbours under every kind of change (issue 23): over random
sequences of days that add models, delete them, drop them below the threshold and replace
their thumbnails, each day's lists equal a full recompute of that day's catalogue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsketch.config import Settings
from recsketch.contracts import SimilarityPlan, TopKStore
from recsketch.features.chunks import Chunk, ChunkStore
from recsketch.features.keys import backbone_key
from recsketch.kernel import NEAR_ONE
from recsketch.similarity import normalise, top_k_cosine
from recsketch.stages import similarity_stage
from recsketch.stages.common import run_dir


class World:
    """A catalogue that changes day by day: each model's features and thumbnail version."""

    def __init__(self, settings: Settings, seed: int, dim: int = 6) -> None:
        self.settings, self.rng, self.dim = settings, np.random.default_rng(seed), dim
        self.store = ChunkStore(settings.features_dir, backbone_key(settings))
        self.features: dict[str, np.ndarray] = {}
        self.versions: dict[str, str] = {}
        self.made = 0
        self.day = 0
        self.written: set[tuple[str, str]] = set()  # (mid, version) pairs in the chunk store

    def _centres(self) -> np.ndarray:  # clustered features, so lists change when a neighbour does
        return np.random.default_rng(99).normal(size=(5, self.dim))

    def _vector(self) -> np.ndarray:
        centre = self._centres()[self.rng.integers(5)]
        return (centre + 0.3 * self.rng.normal(size=self.dim)).astype(np.float32)

    def add(self, count: int) -> None:
        for _ in range(count):
            mid = f"{self.made:032x}"
            self.made += 1
            self.features[mid], self.versions[mid] = self._vector(), f"v{self.day}"

    def replace(self, count: int) -> None:
        for mid in self.rng.choice(sorted(self.features), count, replace=False):
            self.features[str(mid)], self.versions[str(mid)] = self._vector(), f"v{self.day}-{mid[-4:]}"

    def duplicate(self, count: int, new: int = 0) -> None:
        """Re-uploads: ``count`` models take another model's picture, and ``new`` new models copy
        one, exactly (identical rows: their scores tie)."""
        mids = sorted(self.features)
        for mid in self.rng.choice(mids, min(count, len(mids)), replace=False):
            source = str(self.rng.choice(mids))
            self.features[str(mid)], self.versions[str(mid)] = self.features[source].copy(), f"v{self.day}-{mid[-4:]}"
        for _ in range(new):
            source = str(self.rng.choice(mids))
            mid = f"{self.made:032x}"
            self.made += 1
            self.features[mid], self.versions[mid] = self.features[source].copy(), f"v{self.day}"

    def remove(self, count: int) -> None:  # deleted from Sketchfab, or fallen below the threshold
        for mid in self.rng.choice(sorted(self.features), count, replace=False):
            del self.features[str(mid)], self.versions[str(mid)]

    def run(self) -> tuple[dict, Path]:
        """Today's chunk of new and changed features, then the similarity step over today's models."""
        self.day += 1
        missing = [m for m in sorted(self.features) if (m, self.versions[m]) not in self.written]
        if missing:
            chunk = Chunk(f"day{self.day}", missing, np.stack([self.features[m] for m in missing]),
                          {}, self.store.backbone_key, {m: self.versions[m] for m in missing})
            self.store.write(chunk)
            self.store.register([chunk.chunk_id])
            self.written.update((m, self.versions[m]) for m in missing)
        folder = run_dir(self.settings, f"day-{self.day}")
        (folder / "valid_models.json").write_text(json.dumps(self.versions))
        return similarity_stage(self.settings, folder, progress=getattr(self, "progress", lambda _: None)), folder


def assert_equals_a_full_recompute(world: World, folder: Path, k: int) -> None:
    served = TopKStore.for_run(folder).require("similarity")
    assert sorted(served.mids) == sorted(world.features)
    features = np.stack([world.features[m] for m in served.mids])
    exact_indices, exact_scores = top_k_cosine(features, k)
    assert (served.indices == exact_indices).all()
    assert np.abs(served.scores - exact_scores).max() <= 1e-6
    oracle_indices, oracle_scores = oracle(features, k)  # float64, independent of every path
    assert (served.indices == oracle_indices).all() and (served.scores == oracle_scores).all()


def oracle(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top-k by the float64 cosine of the unit rows rounded once to float32 (identical
    rows: exactly 1.0), ties by the lower index."""
    unit = normalise(features).astype(np.float64)
    dots = unit @ unit.T
    norms = np.linalg.norm(unit, axis=1)
    near = dots >= NEAR_ONE
    dots[near] = np.minimum((dots / np.outer(norms, norms))[near], 1.0)
    scores = dots.astype(np.float32)
    np.fill_diagonal(scores, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(scores)), scores.shape), -scores), axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, 1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_day_equals_a_full_recompute(tmp_path: Path, seed: int) -> None:
    k = 4
    world = World(Settings(data_dir=tmp_path, top_k=k), seed)
    world.add(60)
    first, folder = world.run()
    assert first["mode"] == "full"
    assert_equals_a_full_recompute(world, folder, k)
    modes = []
    for _ in range(8):
        change = world.rng.integers(0, 4, size=5)  # new, replaced, removed, re-uploads: any mix, none included
        world.add(int(change[0]))
        world.replace(int(change[1]))
        world.remove(int(change[2]))
        world.duplicate(int(change[3]), new=int(change[4]))  # identical pictures made (and unmade by replace, remove)
        summary, folder = world.run()
        modes.append(summary["mode"])
        assert_equals_a_full_recompute(world, folder, k)
    assert any(mode.startswith("incremental") for mode in modes)
    assert not any(mode == "full" for mode in modes)  # small days never pay for a full pass


def test_each_kind_of_change_is_worked_forward_and_a_large_one_runs_in_full(tmp_path: Path) -> None:
    k = 3
    world = World(Settings(data_dir=tmp_path, top_k=k), seed=7)
    world.add(80)
    world.run()
    for change, expected in ((lambda: world.replace(1), "1 changed, 0 gone"),
                             (lambda: world.remove(1), "0 changed, 1 gone"), (lambda: world.add(2), "2 new x 81")):
        change()
        summary, folder = world.run()
        assert summary["mode"].startswith("incremental (") and expected in summary["mode"], summary["mode"]
        assert_equals_a_full_recompute(world, folder, k)
        plan = SimilarityPlan.read(folder)  # the day's unit rows stay with the run, for the hybrid step
        written = np.load(plan.features_path(folder))
        assert plan.mids == TopKStore.for_run(folder).require("similarity").mids
        assert np.allclose(written, normalise(np.stack([world.features[m] for m in plan.mids])), atol=1e-6)
    world.replace(len(world.features))  # every feature changes: a full pass is cheaper
    summary, folder = world.run()
    assert summary["mode"] == "full"
    assert_equals_a_full_recompute(world, folder, k)
    summary, _ = world.run()
    assert summary["mode"] == "unchanged (reused)"


def test_a_large_refresh_is_mapped_over_shards_and_equals_a_full_recompute(tmp_path: Path) -> None:
    """More than one shard's work: the refresh is planned as row-block shards over the run's
    unit rows (as a full pass is), each shard refreshes its rows, and the merge equals a full
    recompute; its plan names the rows that keep their lists."""
    k = 4
    world = World(Settings(data_dir=tmp_path, top_k=k, similarity_shard_rows=5), seed=11)
    world.add(60)
    world.run()
    world.add(3)
    world.replace(2)
    world.remove(2)
    summary, folder = world.run()
    assert summary["mode"].startswith("incremental (3 new x 61; 2 changed, 2 gone") and summary["shards"] >= 2
    plan = SimilarityPlan.read(folder)
    assert plan.sharded and plan.refresh_path(folder).exists() and plan.features_path(folder).exists()
    assert_equals_a_full_recompute(world, folder, k)
    world.add(1)
    summary, folder = world.run()  # and the next day works forward from the merged result
    assert summary["mode"].startswith("incremental (1 new x 62")
    assert_equals_a_full_recompute(world, folder, k)
