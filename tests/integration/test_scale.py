"""Issue 14: a catalogue of any size plans at most RECSKETCH_MAX_MAPPED_TASKS mapped tasks; each
task loads its backbone once and uses its share of the host's cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsketch.config import Settings
from recsketch.contracts import ChunkPlan, SimilarityPlan, ValidModels, group_tasks
from recsketch.features.chunks import Chunk, ChunkStore
from recsketch.features.keys import backbone_key
from recsketch.stages.common import run_dir
from recsketch.stages.extract import plan_stage
from recsketch.stages.neighbours import plan_similarity_stage


def test_planning_a_million_models_stays_under_the_task_ceiling(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_mapped_tasks=200, chunk_size=256)
    folder = run_dir(settings, "big")
    mids = [f"{i:032x}" for i in range(1_000_000)]
    ValidModels(dict.fromkeys(mids, "v1")).write(folder)
    tasks = plan_stage(settings, folder, progress=lambda _: None)
    plan = ChunkPlan.read(folder)
    assert len(tasks) == 200 and len(plan.chunks) == 3907  # ceil(1e6 / 256) chunks, 19-20 per task
    covered = [mid for task in tasks for chunk in plan.chunks_of(task) for mid in plan.chunks[chunk]]
    assert len(covered) == len(mids) and set(covered) == set(mids)  # every model once
    assert {len(plan.chunks_of(task)) for task in tasks} == {19, 20}


def test_group_tasks_names_single_chunks_by_themselves() -> None:
    assert group_tasks(["b", "a"], 5) == {"a": ["a"], "b": ["b"]}
    grouped = group_tasks([f"c{i}" for i in range(7)], 3)
    assert list(grouped.values()) == [["c0", "c1", "c2"], ["c3", "c4"], ["c5", "c6"]]
    assert list(grouped) == ["chunks-c0-3", "chunks-c3-2", "chunks-c5-2"]


def test_one_task_extracts_a_group_of_chunks_with_one_backbone(sketchfab, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from recsketch.stages import extract as extract_stage_module
    from recsketch.stages.crawl import crawl_stage
    from recsketch.stages.extract import extract_stage
    from recsketch.stages.threshold import threshold_stage

    settings = Settings(data_dir=tmp_path / "data", sketchfab_url=sketchfab.url, chunk_size=8, max_mapped_tasks=2)
    folder = run_dir(settings, "r")
    crawl_stage(settings, folder)
    threshold_stage(settings, folder)
    tasks = plan_stage(settings, folder)
    plan = ChunkPlan.read(folder)
    assert len(plan.chunks) == 9 and len(tasks) == 2
    loads = []
    real = extract_stage_module.create_backbone
    monkeypatch.setattr(extract_stage_module, "create_backbone",
                        lambda s, threads=None: loads.append(1) or real(s, threads))
    summaries = [extract_stage(settings, folder, task) for task in tasks]
    assert len(loads) == 2  # one backbone per task, not per chunk
    assert [s["chunks"] for s in summaries] == [5, 4] and sum(s["images"] for s in summaries) == 72
    store = ChunkStore(settings.features_dir, plan.backbone_key)
    assert all(store.read(chunk) is not None for chunk in plan.chunks)
    again = extract_stage(settings, folder, tasks[0])  # a retried task: every chunk already there
    assert again["skipped"] and len(loads) == 2  # no backbone loaded for nothing


def test_similarity_shards_grow_to_stay_under_the_task_ceiling(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, top_k=3, similarity_shard_rows=10, max_mapped_tasks=4)
    mids = [f"{i:032x}" for i in range(100)]
    store = ChunkStore(settings.features_dir, backbone_key(settings))
    store.write(Chunk("c1", mids, np.random.default_rng(1).standard_normal((100, 8)).astype(np.float32)))
    folder = run_dir(settings, "r")
    ValidModels(dict.fromkeys(mids, "")).write(folder)
    shards = plan_similarity_stage(settings, folder, progress=lambda _: None)
    assert shards == ["0-25", "25-50", "50-75", "75-100"]
    assert SimilarityPlan.read(folder).shards == [(0, 25), (25, 50), (50, 75), (75, 100)]


def test_threads_follow_the_workers_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("AIRFLOW__CELERY__WORKER_CONCURRENCY", "4")
    assert Settings().effective_threads == 4
    assert Settings(threads=3).effective_threads == 3  # RECSKETCH_THREADS wins
    monkeypatch.delenv("AIRFLOW__CELERY__WORKER_CONCURRENCY")
    assert Settings().effective_threads == 16
    assert Settings.from_env({"RECSKETCH_THREADS": "2"}).threads == 2


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_the_streamed_load_equals_the_row_by_row_load(backend: str, pg_url: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a top-k from its arrays (COPY fed block by block, no tuple per row) stores exactly
    what loading its rows as tuples stores, scores to the last bit."""
    from sqlalchemy import select

    from recsketch.contracts import TopK
    from recsketch.db import store
    from recsketch.db.schema import recommendations

    monkeypatch.setattr(store, "COPY_BLOCK_MODELS", 97)  # many blocks, one of them partial
    rng = np.random.default_rng(5)
    n, k = 1234, 7
    mids = [f"{i:032x}" if i % 3 else f"L{i:0{25 + i % 2}d}" for i in rng.permutation(10_000)[:n]]
    assert {len(m) for m in mids} == {26, 27, 32}  # legacy ids too: rows of several widths
    indices = rng.integers(0, n, size=(n, k))
    scores = np.sort(rng.random((n, k), dtype=np.float32), axis=1)[:, ::-1]
    scores[0, 0] = np.float32(1e-7)  # exponent notation survives too
    topk = TopK(mids, indices, scores, "bb")
    url = pg_url if backend == "postgresql" else f"sqlite:///{tmp_path / 'r.sqlite'}"
    engine = store.connect(url)
    query = select(recommendations.c.mid, recommendations.c.rank, recommendations.c.similar_mid,
                   recommendations.c.score).order_by(recommendations.c.mid, recommendations.c.rank)

    store.load_recommendations(engine, "streamed", "bb", k, topk)
    with engine.connect() as conn:
        streamed = conn.execute(query).all()
    assert store.live_run(engine)["n_models"] == n
    store.load_recommendations(engine, "tuples", "bb", k, topk.rows())
    with engine.connect() as conn:
        by_rows = conn.execute(query).all()
    assert len(streamed) == n * k and streamed == by_rows


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_likes_are_read_as_codes_with_every_uid_kept_as_written(backend: str, pg_url: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """uids that look like numbers or missing values ("007", "1e5", "NA", "null") come back as the
    same strings from the COPY-and-parse path, parsed in several parts."""
    from recsketch.db import store
    from recsketch.likes import threshold_likes

    monkeypatch.setattr(store, "LIKES_READ_ROWS", 5)
    url = pg_url if backend == "postgresql" else f"sqlite:///{tmp_path / 'l.sqlite'}"
    engine = store.connect(url)
    uids = ["007", "1e5", "NA", "null", "u,comma", 'u"quote']
    mids = [f"{i:032x}" for i in range(3)]
    store.upsert_models(engine, [{"mid": mid, "name": mid} for mid in mids])
    store.replace_likes(engine, dict.fromkeys(mids, uids))
    frame = store.read_likes_frame(engine)
    assert str(frame["uid"].dtype) == "category" and len(frame) == 18
    assert sorted(set(frame["uid"].astype(str))) == sorted(uids)
    assert threshold_likes(frame, 3).models == mids


def test_memory_mapped_tiled_shards_equal_the_in_memory_top_k(tmp_path: Path) -> None:
    """A shard read through a memory map, in tiles far smaller than N, equals the in-memory
    top-k: the same indices (ties by lower index), scores within 1e-6 (float32 tiles scored by
    sgemm round by a pair's place in the tile on some CPUs, a Zen 5 here), identical
    thumbnails at exactly 1.0."""
    from recsketch.similarity import NpyRows, normalise, top_k_cosine, top_k_tiled

    rng = np.random.default_rng(3)
    features = rng.standard_normal((2500, 48)).astype(np.float32)
    features[7] = features[1900]  # identical pair
    features[11] = 0.0  # a zero row
    features[100:110] = features[200]  # a run of ties
    unit = normalise(features)
    np.save(tmp_path / "unit.npy", unit)
    mapped = np.load(tmp_path / "unit.npy", mmap_mode="r")
    expected = top_k_cosine(unit, 10, rows=(300, 2100), normalised=True)
    got = top_k_tiled(mapped, 10, (300, 2100), query_block=333, candidate_block=257)
    assert np.array_equal(got[0], expected[0]) and np.allclose(got[1], expected[1], rtol=0, atol=1e-6)
    ties = top_k_tiled(mapped, 10, (100, 110), query_block=4, candidate_block=64)
    assert np.array_equal(ties[0], top_k_cosine(unit, 10, rows=(100, 110), normalised=True)[0])
    assert top_k_tiled(mapped, 5, (7, 8))[1][0, 0] == 1.0
    rows = NpyRows(tmp_path / "unit.npy")  # what a shard task reads through: pread blocks, no mapping
    try:
        read = top_k_tiled(rows, 10, (300, 2100), query_block=333, candidate_block=257)
    finally:
        rows.close()
    assert np.array_equal(read[0], expected[0]) and np.array_equal(read[1], got[1])  # the same tiles, bit for bit


def test_a_registered_chunk_that_no_longer_reads_back_is_planned_again(tmp_path: Path) -> None:
    """A damaged chunk in the manifest must not stay "done" for ever: the stage that writes the
    manifest drops it, names the fix, and the next plan extracts its models again."""
    from recsketch.errors import RecsketchError

    settings = Settings(data_dir=tmp_path, top_k=2, chunk_size=4)
    mids = [f"{i:032x}" for i in range(6)]
    store = ChunkStore(settings.features_dir, backbone_key(settings))
    store.write(Chunk("good", mids[:3], np.eye(3, 4, dtype=np.float32)))
    store.write(Chunk("bad", mids[3:], np.eye(3, 4, k=1, dtype=np.float32)))
    store.register(["good", "bad"])
    assert store.manifest_path.exists() and store.chunk_ids() == ["bad", "good"]
    path = store.path("bad")
    assert isinstance(path, Path)
    path.write_bytes(path.read_bytes()[:100])  # damaged on disk after it was registered
    folder = run_dir(settings, "r")
    ValidModels(dict.fromkeys(mids, "")).write(folder)
    assert plan_stage(settings, folder, progress=lambda _: None) == []  # the manifest still says done
    with pytest.raises(RecsketchError, match="1 registered chunks are unreadable"):
        plan_similarity_stage(settings, folder, progress=lambda _: None)
    plan_stage(settings, folder, progress=lambda _: None)
    assert sorted(m for chunk in ChunkPlan.read(folder).chunks.values() for m in chunk) == mids[3:]


def _chunks_with_failures(store: ChunkStore, count: int, rows: int, dim: int) -> dict[str, str]:
    """``count`` chunks of interleaved mids (so rows land all over the output), a failure in each."""
    rng = np.random.default_rng(5)
    wanted = {}
    for c in range(count):
        mids = [f"{r * count + c:032x}" for r in range(rows)]
        failed = {mids[-1]: "thumbnail unreadable"}
        store.write(Chunk(f"c{c}", mids[:-1], rng.standard_normal((rows - 1, dim)).astype(np.float32), failed,
                          versions=dict.fromkeys(mids, "v")))
        wanted.update(dict.fromkeys(mids, "v"))
    store.register([f"c{c}" for c in range(count)])
    return wanted


def test_features_streamed_into_a_file_equal_the_in_memory_load(tmp_path: Path) -> None:
    """The consolidated file (pwrite per chunk, failures compacted out) holds exactly the rows the
    in-memory load gives, normalised, in the same order; entries of another version are not read."""
    from recsketch.features.chunks import NpyFileRows
    from recsketch.similarity import normalise

    store = ChunkStore(tmp_path / "features", "key")
    wanted = _chunks_with_failures(store, count=7, rows=30, dim=12)
    stale = next(iter(wanted))
    wanted[stale] = "newer"  # its thumbnail changed: the chunk's row is of another version
    mids, in_memory, failed = store.load_features(wanted)
    sink = NpyFileRows(tmp_path / "unit.npy")
    gathered = store.gather(wanted, sorted(wanted), sink, unit=True)
    sink.close()
    assert gathered.mids == mids and gathered.failed == failed and len(failed) == 7
    assert gathered.missing == [stale] and stale not in mids
    on_disk = np.load(tmp_path / "unit.npy")
    assert on_disk.shape == (7 * 29 - 1, 12)
    assert np.array_equal(on_disk, normalise(in_memory))


def test_consolidating_features_holds_one_chunk_in_memory_not_the_matrix(tmp_path: Path) -> None:
    """Peak Python/numpy allocations while streaming 40 chunks into the file stay near one chunk's
    size, far below the 100 MB matrix (tracemalloc sees numpy's buffers)."""
    import tracemalloc

    from recsketch.features.chunks import NpyFileRows

    store = ChunkStore(tmp_path / "features", "key")
    wanted = _chunks_with_failures(store, count=40, rows=500, dim=1280)
    matrix_bytes = 40 * 499 * 1280 * 4
    sink = NpyFileRows(tmp_path / "unit.npy")
    tracemalloc.start()
    try:
        store.gather(wanted, sorted(wanted), sink, unit=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        sink.close()
    assert np.load(tmp_path / "unit.npy", mmap_mode="r").shape == (40 * 499, 1280)
    assert peak < matrix_bytes / 8, f"peak {peak / 1e6:.1f} MB for a {matrix_bytes / 1e6:.1f} MB matrix"


def test_an_incremental_run_equals_a_full_run(tmp_path: Path) -> None:
    """The incremental path (one in-memory copy of unit rows, old first) gives the full run's top-k."""
    from recsketch.contracts import TopKStore
    from recsketch.stages import similarity_stage

    rng = np.random.default_rng(9)
    mids = [f"{i:032x}" for i in range(300)]
    features = rng.standard_normal((300, 16)).astype(np.float32)
    settings = Settings(data_dir=tmp_path / "inc", top_k=5)
    store = ChunkStore(settings.features_dir, backbone_key(settings))
    store.write(Chunk("old", mids[:200], features[:200]))
    store.write(Chunk("new", mids[200:], features[200:]))
    store.register(["old"])
    first = run_dir(settings, "first")
    ValidModels(dict.fromkeys(mids[:200], "")).write(first)
    similarity_stage(settings, first, progress=lambda _: None)
    store.register(["new"])
    second = run_dir(settings, "second")
    ValidModels(dict.fromkeys(mids, "")).write(second)
    assert "incremental (100 new x 300)" in similarity_stage(settings, second, progress=lambda _: None)["mode"]
    incremental = TopKStore.for_run(second).require("test")
    full_settings = Settings(data_dir=tmp_path / "full", top_k=5)
    full_store = ChunkStore(full_settings.features_dir, backbone_key(full_settings))
    full_store.write(Chunk("all", mids, features))
    full_store.register(["all"])
    full = run_dir(full_settings, "full")
    ValidModels(dict.fromkeys(mids, "")).write(full)
    similarity_stage(full_settings, full, progress=lambda _: None)
    exact = TopKStore.for_run(full).require("test")
    assert sorted(incremental.mids) == exact.mids
    position = {m: i for i, m in enumerate(exact.mids)}
    for row, mid in enumerate(incremental.mids):
        got = [incremental.mids[j] for j in incremental.indices[row]]
        want = [exact.mids[j] for j in exact.indices[position[mid]]]
        assert got == want, mid
        assert np.allclose(incremental.scores[row], exact.scores[position[mid]], atol=1e-6)


def test_a_tasks_peak_rss_is_its_own_after_a_reset() -> None:
    """Each DAG task logs its peak RSS; in a long-lived process (dag.test, a reused worker) the
    high-water mark is reset first, so a big earlier allocation is not charged to the next task."""
    from recsketch.resources import peak_rss_bytes, reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS")
    baseline = peak_rss_bytes()
    big = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
    assert peak_rss_bytes() > baseline + 150 * 2**20
    del big
    assert reset_peak_rss() and peak_rss_bytes() < baseline + 50 * 2**20
