"""The similarity stage: full, then incremental when models are added, then reused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsketch.config import Settings
from recsketch.features.backbones import backbone_key
from recsketch.features.chunks import Chunk, ChunkStore
from recsketch.pipeline import TOPK_FILE, run_dir, similarity_stage
from recsketch.similarity import top_k_cosine


def test_new_models_cost_new_x_all_and_equal_a_full_run(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, top_k=5)
    store = ChunkStore(settings.features_dir, backbone_key(settings))
    rng = np.random.default_rng(0)
    mids = [f"{i:032x}" for i in range(60)]
    vectors = {m: rng.normal(size=8).astype(np.float32) for m in mids}

    def run(run_id: str, valid: list[str]) -> tuple[dict, list[str], np.ndarray]:
        folder = run_dir(settings, run_id)
        (folder / "valid_models.json").write_text(json.dumps(valid))
        summary = similarity_stage(settings, folder)
        with np.load(folder / TOPK_FILE) as data:
            return summary, [str(m) for m in data["mids"]], data["indices"]

    store.write(Chunk("first", mids[:40], np.stack([vectors[m] for m in mids[:40]]), {}, store.backbone_key))
    first, _, _ = run("r1", mids[:40])
    assert first["mode"] == "full"

    store.write(Chunk("second", mids[40:], np.stack([vectors[m] for m in mids[40:]]), {}, store.backbone_key))
    second, order, indices = run("r2", mids)
    assert second["mode"] == "incremental (20 new x 60)"
    full, _ = top_k_cosine(np.stack([vectors[m] for m in order]), 5)
    assert (indices == full).all()

    third, order3, indices3 = run("r3", mids)
    assert third["mode"] == "unchanged (reused)" and order3 == order and (indices3 == indices).all()

    fewer, _, _ = run("r4", mids[5:])  # a model left the valid set: the old lists no longer hold
    assert fewer["mode"] == "full"


def one_chunk_run(settings: Settings, run_id: str, seed: int) -> tuple[Path, np.ndarray]:
    """30 models with 6-d features in one chunk, all valid; returns the run folder."""
    store = ChunkStore(settings.features_dir, backbone_key(settings))
    mids = [f"{i:032x}" for i in range(30)]
    features = np.random.default_rng(seed).normal(size=(30, 6)).astype(np.float32)
    store.write(Chunk("only", mids, features, {}, store.backbone_key))
    folder = run_dir(settings, run_id)
    (folder / "valid_models.json").write_text(json.dumps(mids))
    return folder, features


def test_sharded_full_run_equals_one_block(tmp_path: Path) -> None:
    from recsketch.errors import RecsketchError
    from recsketch.pipeline import merge_similarity_stage, plan_similarity_stage, similarity_shard_stage

    settings = Settings(data_dir=tmp_path, top_k=4, similarity_shard_rows=7)
    folder, features = one_chunk_run(settings, "sharded", seed=3)
    shards = plan_similarity_stage(settings, folder)
    assert shards == ["0-7", "7-14", "14-21", "21-28", "28-30"]
    for shard in reversed(shards[1:]):  # any order, on any worker
        similarity_shard_stage(settings, folder, shard)
    with pytest.raises(RecsketchError, match="shards cover 23 of 30 rows"):  # one shard still missing
        merge_similarity_stage(settings, folder)
    similarity_shard_stage(settings, folder, shards[0])
    summary = merge_similarity_stage(settings, folder)
    assert summary == {"models": 30, "k": 4, "mode": "full", "shards": 5}
    with np.load(folder / TOPK_FILE) as data:
        assert (data["indices"] == top_k_cosine(features, 4)[0]).all()


def test_pca_option_reports_recall_and_every_shard_uses_one_projection(tmp_path: Path) -> None:
    from recsketch.pipeline import similarity_stage
    from recsketch.similarity import reduce_dimensions

    settings = Settings(data_dir=tmp_path, top_k=4, similarity_shard_rows=8, pca_dim=3)
    folder, features = one_chunk_run(settings, "pca", seed=8)
    summary = similarity_stage(settings, folder)
    assert summary["mode"] == "full, PCA 6->3-d" and summary["shards"] == 4
    assert 0.0 < summary["recall_at_k"] < 1.0  # 3 of 6 dimensions: approximate, and it says how much
    with np.load(folder / TOPK_FILE) as data:
        assert (data["indices"] == top_k_cosine(reduce_dimensions(features, 3), 4)[0]).all()
    second, _ = one_chunk_run(settings, "pca-2", seed=8)
    again = similarity_stage(settings, second)  # no incremental shortcut with PCA
    assert again["mode"].startswith("full")
