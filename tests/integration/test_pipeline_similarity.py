"""The similarity stage: full, then incremental when models are added, then reused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsketch.config import Settings
from recsketch.contracts import TOPK_FILE, TopKStore
from recsketch.features.chunks import Chunk, ChunkStore
from recsketch.features.keys import backbone_key
from recsketch.similarity import top_k_cosine
from recsketch.stages import similarity_stage
from recsketch.stages.common import run_dir


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
        topk = TopKStore(folder / TOPK_FILE).require("similarity")
        return summary, topk.mids, topk.indices

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

    fewer, order4, indices4 = run("r4", mids[5:])  # models left: only the rows whose lists held them redone
    assert fewer["mode"].startswith("incremental (0 new x 55; 0 changed, 5 gone: ")
    assert (indices4 == top_k_cosine(np.stack([vectors[m] for m in order4]), 5)[0]).all()


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
    from recsketch.stages.neighbours import merge_similarity_stage, plan_similarity_stage, similarity_shard_stage

    settings = Settings(data_dir=tmp_path, top_k=4, similarity_shard_rows=7)
    folder, features = one_chunk_run(settings, "sharded", seed=3)
    shards = plan_similarity_stage(settings, folder)
    assert shards == ["0-7", "7-14", "14-21", "21-28", "28-30"]
    for shard in reversed(shards[1:]):  # any order, on any worker
        similarity_shard_stage(settings, folder, shard)
    with pytest.raises(RecsketchError, match=r"shard rows 0-7 .* is missing"):  # one shard still missing
        merge_similarity_stage(settings, folder)
    similarity_shard_stage(settings, folder, shards[0])
    summary = merge_similarity_stage(settings, folder)
    assert summary == {"models": 30, "k": 4, "mode": "full", "shards": 5}
    with np.load(folder / TOPK_FILE) as data:
        assert (data["indices"] == top_k_cosine(features, 4)[0]).all()


def test_pca_option_reports_recall_and_every_shard_uses_one_projection(tmp_path: Path) -> None:
    from recsketch.similarity import reduce_dimensions
    from recsketch.stages import similarity_stage

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


def test_a_pca_run_never_serves_a_later_exact_run(tmp_path: Path) -> None:
    """RECSKETCH_PCA_DIM=3, then an exact run over the same models: the exact run computes the
    exact result (as a fresh exact run does), never reusing the PCA neighbours."""
    from recsketch.stages import similarity_stage

    pca = Settings(data_dir=tmp_path, top_k=4, pca_dim=3)
    folder, features = one_chunk_run(pca, "pca", seed=11)
    similarity_stage(pca, folder)
    exact = Settings(data_dir=tmp_path, top_k=4)
    after, _ = one_chunk_run(exact, "exact", seed=11)
    summary = similarity_stage(exact, after)
    assert summary["mode"] == "full"  # not "unchanged (reused)"
    fresh, _ = one_chunk_run(Settings(data_dir=tmp_path / "fresh", top_k=4), "fresh", seed=11)
    similarity_stage(Settings(data_dir=tmp_path / "fresh", top_k=4), fresh)
    with np.load(after / TOPK_FILE) as got, np.load(fresh / TOPK_FILE) as expected:
        assert (got["indices"] == expected["indices"]).all() and (got["indices"] == top_k_cosine(features, 4)[0]).all()


def test_a_changed_thumbnail_is_extracted_again_in_a_chunk_of_its_own(tmp_path: Path) -> None:
    """Features are keyed by each thumbnail's content: after one model's image changes, the
    next plan holds that model alone, the other chunks stay as they are, and similarity uses
    the new features (a full run, since an old model's features moved)."""
    from PIL import Image

    from recsketch.contracts import PLAN_FILE
    from recsketch.crawl import thumbnail_path
    from recsketch.features.images import thumbnail_version
    from recsketch.stages.extract import extract_stage, plan_stage

    settings = Settings(data_dir=tmp_path, top_k=3, chunk_size=4)
    mids = [f"{i:032x}" for i in range(10)]
    colours = {mid: (25 * i, 255 - 25 * i, (97 * i) % 256) for i, mid in enumerate(mids)}
    for mid, colour in colours.items():
        thumbnail_path(settings, mid).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), colour).save(thumbnail_path(settings, mid))

    def run(run_id: str) -> tuple[Path, list[str]]:
        folder = run_dir(settings, run_id)
        versions = {m: thumbnail_version(thumbnail_path(settings, m).read_bytes()) for m in mids}
        (folder / "valid_models.json").write_text(json.dumps(versions))
        chunk_ids = plan_stage(settings, folder)
        for chunk_id in chunk_ids:
            extract_stage(settings, folder, chunk_id)
        return folder, chunk_ids

    first, first_chunks = run("r1")
    assert len(first_chunks) == 3
    similarity_stage(settings, first)
    store = ChunkStore(settings.features_dir, backbone_key(settings))
    before = {p.name: p.stat().st_mtime_ns for p in store.root.glob("chunk-*.npz")}
    _, old = store.load_features(json.loads((first / "valid_models.json").read_text()))[:2]

    changed = mids[4]
    Image.new("RGB", (64, 64), (0, 0, 255)).save(thumbnail_path(settings, changed))
    second, _ = run("r2")
    plan = json.loads((second / PLAN_FILE).read_text())["chunks"]
    assert list(plan.values()) == [[changed]]  # only that model, in a chunk of its own
    assert {p.name: p.stat().st_mtime_ns for p in store.root.glob("chunk-*.npz") if p.name in before} == before
    assert "chunk-" + next(iter(plan)) + ".npz" not in before
    assert store.register(plan) == 1  # what plan_similarity does first: the new chunk joins the manifest
    order, new = store.load_features(json.loads((second / "valid_models.json").read_text()))[:2]
    row = order.index(changed)
    assert not np.allclose(new[row], old[row])  # the new image's features are the ones read
    assert np.allclose(np.delete(new, row, axis=0), np.delete(old, row, axis=0))
    assert "1 changed, 0 gone" in similarity_stage(settings, second)["mode"]  # worked forward, not a full pass
    result = TopKStore(second / TOPK_FILE).require("similarity")
    assert (result.indices == top_k_cosine(new[[order.index(m) for m in result.mids]], 3)[0]).all()


def test_each_handover_file_has_one_reader_and_one_writer() -> None:
    """Stages meet only through recsketch.contracts: no other module names a handover file."""
    from recsketch import contracts

    names = [contracts.VALID_MODELS_FILE, contracts.PLAN_FILE, contracts.RUN_LIKES_FILE, contracts.EVALUATION_FILE,
             contracts.CRAWL_STATS_FILE, contracts.TOPK_FILE, contracts.LATEST_TOPK_FILE, "_plan.json", "-shard-",
             "-features-", "topk-"]
    package = Path(contracts.__file__).parent
    for path in package.rglob("*.py"):
        if path.name != "contracts.py":
            source = path.read_text()
            assert not [n for n in names if n in source], path


def test_topk_store_round_trip_and_a_missing_result_names_the_stage(tmp_path: Path) -> None:
    from recsketch.contracts import TopK, TopKStore
    from recsketch.errors import RecsketchError

    store = TopKStore.for_run(tmp_path)
    with pytest.raises(RecsketchError, match=r"topk\.npz is missing: run the similarity stage first"):
        store.require("similarity")
    topk = TopK(["a" * 32, "b" * 32], np.array([[1], [0]]), np.array([[0.5], [0.5]], np.float32), "key", ["v1", ""])
    store.write(topk)
    again = store.require("similarity")
    assert again.mids == topk.mids and again.versions == ["v1", ""] and again.k == 1
    assert again.rows() == [("a" * 32, 1, "b" * 32, 0.5), ("b" * 32, 1, "a" * 32, 0.5)]
