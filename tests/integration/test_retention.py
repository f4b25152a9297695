"""Retention (issue 24 part 1, DESIGN §7): ``recsketch gc`` and the DAG's cleanup keep the newest
``RECSKETCH_KEEP_RUNS`` run folders of each kind, the live run's and runs in flight, and delete
the rest by the exact keys their plans name, with their ``runs``/``run_metrics`` rows; on an
object store without listing anything."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert, select

from recsketch import retention, storage
from recsketch.config import Settings
from recsketch.contracts import (
    EvaluationReport,
    Method,
    PlanMode,
    SimilarityPlan,
    TopK,
    TopKStore,
    ValidModels,
    run_folder_keys,
)
from recsketch.db import store
from recsketch.db.schema import run_folders, run_metrics, runs
from recsketch.errors import RecsketchError
from recsketch.stages.threshold import threshold_stage

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


def write_run(settings: Settings, name: str) -> list[str]:
    """A run folder as the pipeline leaves it: plans naming their features and shards, the lists,
    the report. Returns the names of its files."""
    folder = settings.run_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    mids = [f"{i:032x}" for i in range(4)]
    ValidModels({mid: "v1" for mid in mids}).write(folder)
    for method in Method:
        plan = SimilarityPlan(PlanMode.FULL, mids, shards=[(0, 2), (2, 4)], method=method)
        plan.write(folder)
        storage.save_npy(plan.features_path(folder), np.eye(4, dtype=np.float32))
        for first, last in plan.shards:
            plan.write_shard(folder, first, last, np.zeros((2, 1), np.int64), np.zeros((2, 1), np.float32))
    topk = TopK(mids, np.zeros((4, 1), np.int64), np.ones((4, 1), np.float32), "key", ["v1"] * 4)
    TopKStore.for_run(folder).write(topk)
    TopKStore.for_run(folder, Method.HYBRID).write(topk)
    EvaluationReport({"k": [10], "split": {}, "methods": {"visual": {"ndcg@10": 0.5}}}).write(folder)
    return sorted(key.name for key in run_folder_keys(folder) if key.exists())


def loaded(engine, run_id: str, *, live: bool = False) -> None:  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        conn.execute(insert(runs).values(run_id=run_id, backbone="key", top_k=1, n_models=4, loaded_at=NOW,
                                         is_live=live))
        conn.execute(insert(run_metrics).values(run_id=run_id, method="visual", metric="ndcg@10", split="warm",
                                                value=0.5, measured_at=NOW))


def world(settings: Settings) -> tuple[object, dict[str, list[str]]]:
    """Eight recommendation runs a day apart (the oldest live, one an hour old that never loaded),
    three crawl folders; every run but the one in flight loaded."""
    engine = store.connect(settings.resolved_database_url)
    files = {}
    for day in range(8):
        name = f"scheduled__2026-11-{day + 20:02d}"
        files[name] = write_run(settings, name)
        retention.register(engine, name, retention.Kind.RECOMMENDATIONS, NOW - timedelta(days=8 - day))
        loaded(engine, name, live=day == 0)
        retention.finish(engine, name, NOW - timedelta(days=8 - day))
    name = "manual__in-flight"  # started an hour ago, not loaded yet
    files[name] = write_run(settings, name)
    retention.register(engine, name, retention.Kind.RECOMMENDATIONS, datetime.now(UTC) - timedelta(hours=1))
    for day in range(3):
        name = f"crawl__2026-11-{day + 20:02d}"
        storage.write_text(settings.run_dir(name) / "crawl_stats.json", "{}")
        retention.register(engine, name, retention.Kind.CRAWL, NOW - timedelta(days=30 - day))
        files[name] = ["crawl_stats.json"]
    return engine, files


def test_gc_keeps_the_newest_the_live_and_the_runs_in_flight_and_deletes_the_rest(tmp_path: Path,
                                                                                  db_url: str) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, keep_runs=3)
    engine, files = world(settings)
    verdicts = {v.folder: v.reason for v in retention.judge(settings, engine)}
    assert verdicts["manual__in-flight"] == "newest"  # registered an hour ago: the newest of all
    assert verdicts["scheduled__2026-11-20"] == "live"
    assert [f for f, r in verdicts.items() if r == "newest" and f.startswith("scheduled")] == [
        "scheduled__2026-11-27", "scheduled__2026-11-26"]
    assert [f for f, r in verdicts.items() if r == "past retention"] == [
        f"scheduled__2026-11-{day}" for day in (25, 24, 23, 22, 21)]
    assert {f for f, r in verdicts.items() if f.startswith("crawl")} == {f"crawl__2026-11-{d}" for d in (20, 21, 22)}

    dry = retention.collect(settings, engine, dry_run=True)
    assert len(dry["deleted"]) == 5 and all((settings.run_dir(f)).exists() for f in dry["deleted"])

    result = retention.collect(settings, engine)
    assert sorted(result["deleted"]) == [f"scheduled__2026-11-{day}" for day in (21, 22, 23, 24, 25)]
    for name, names in files.items():
        folder = settings.run_dir(name)
        if name in result["deleted"]:
            assert not folder.exists(), name
        else:
            assert sorted(p.name for p in folder.iterdir()) == names, name
    with engine.connect() as conn:
        assert set(conn.execute(select(runs.c.run_id)).scalars()) == {
            "scheduled__2026-11-20", "scheduled__2026-11-26", "scheduled__2026-11-27"}
        assert set(conn.execute(select(run_metrics.c.run_id)).scalars()) == {
            "scheduled__2026-11-20", "scheduled__2026-11-26", "scheduled__2026-11-27"}
        assert len(conn.execute(select(run_folders)).all()) == 12 - 5
    assert retention.collect(settings, engine)["deleted"] == []  # nothing more: a second collection is a no-op


def test_a_run_past_its_flight_window_that_never_loaded_is_collected(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", keep_runs=1)
    engine = store.connect(settings.resolved_database_url)
    for hours, name in ((30, "failed"), (20, "running"), (1, "newest")):
        write_run(settings, name)
        retention.register(engine, name, retention.Kind.RECOMMENDATIONS, datetime.now(UTC) - timedelta(hours=hours))
    verdicts = {v.folder: v.reason for v in retention.judge(settings, engine)}
    assert verdicts == {"newest": "newest", "running": "in flight", "failed": "past retention"}


def test_a_deletion_cut_short_is_finished_and_its_run_cannot_be_written_again(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", keep_runs=1)
    engine = store.connect(settings.resolved_database_url)
    for day, name in enumerate(("old", "new")):
        write_run(settings, name)
        retention.register(engine, name, retention.Kind.RECOMMENDATIONS, NOW + timedelta(days=day))
        retention.finish(engine, name)
    with engine.begin() as conn:  # a collection marked "old" and died before its files went
        conn.execute(run_folders.update().where(run_folders.c.folder == "old").values(deleting_at=NOW))
    with pytest.raises(RecsketchError, match="being deleted by retention"):
        threshold_stage(settings, settings.run_dir("old"))
    assert {v.folder: v.reason for v in retention.judge(settings, engine)}["old"] == "deletion cut short"
    assert retention.collect(settings, engine)["deleted"] == ["old"]
    assert not settings.run_dir("old").exists() and settings.run_dir("new").exists()


def test_folders_of_an_older_release_are_registered_from_the_disk(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", keep_runs=1)
    engine = store.connect(settings.resolved_database_url)
    for name in ("a", "b", "c"):
        write_run(settings, name)  # never registered: made before retention
    result = retention.collect(settings, engine)
    assert len(result["deleted"]) == 2 and len(result["kept"]) == 1
    assert [p.name for p in (tmp_path / "data" / "runs").iterdir()] == result["kept"]


def test_gc_on_an_object_store_deletes_by_exact_keys_and_lists_nothing(s3_data_dir: str, pg_url: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(data_dir=s3_data_dir, database_url=pg_url, keep_runs=3)
    engine, _ = world(settings)
    fs = settings.data_root.fs  # type: ignore[union-attr]
    present = {name: [k for k in run_folder_keys(settings.run_dir(name)) if k.exists()]
               for name in (f"scheduled__2026-11-{day}" for day in range(20, 28))}
    for method in ("ls", "find", "glob", "walk", "_ls", "_find", "_glob", "_walk"):
        monkeypatch.setattr(fs, method, lambda *a, **k: pytest.fail("retention listed the object store"),
                            raising=False)
    result = retention.collect(settings, engine)
    monkeypatch.undo()
    assert sorted(result["deleted"]) == [f"scheduled__2026-11-{day}" for day in (21, 22, 23, 24, 25)]
    for name, keys in present.items():
        assert len(keys) >= 10
        assert [k.exists() for k in keys] == [name not in result["deleted"]] * len(keys), name


def test_the_cli_gc_prints_its_verdicts_dry_and_deletes_when_asked(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data, keep_runs=1)
    engine = store.connect(settings.resolved_database_url)
    for day, name in enumerate(("old", "new")):
        write_run(settings, name)
        retention.register(engine, name, retention.Kind.RECOMMENDATIONS, NOW + timedelta(days=day))
        retention.finish(engine, name)
    engine.dispose()
    old_files = len(list((data / "runs" / "old").iterdir()))
    env = {"RECSKETCH_DATA_DIR": str(data), "RECSKETCH_KEEP_RUNS": "1", "PATH": "/usr/bin:/bin"}
    dry = subprocess.run([sys.executable, "-m", "recsketch.cli", "gc", "--dry-run"], env=env, capture_output=True,
                         text=True, check=True)
    lines = dry.stdout.splitlines()
    assert lines[:2] == ["keep    new  (recommendations, newest)", "delete  old  (recommendations, past retention)"]
    assert len(lines) == 3 and lines[2].startswith("gc: features ")
    assert (data / "runs" / "old").exists()
    done = subprocess.run([sys.executable, "-m", "recsketch.cli", "gc"], env=env, capture_output=True, text=True,
                          check=True)
    result = json.loads(done.stdout)
    assert {key: result[key] for key in ("deleted", "kept", "files_deleted", "failed")} == {
        "deleted": ["old"], "kept": 1, "files_deleted": old_files, "failed": []}
    assert {"chunks_dropped", "chunks_rewritten", "chunk_files_deleted", "feature_entries"} <= result.keys()
    assert not (data / "runs" / "old").exists() and (data / "runs" / "new").exists()


def test_two_collections_at_once_end_as_one_does(tmp_path: Path, pg_url: str) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data, database_url=pg_url, keep_runs=3)
    world(settings)
    env = {"RECSKETCH_DATA_DIR": str(data), "RECSKETCH_DATABASE_URL": pg_url, "RECSKETCH_KEEP_RUNS": "3",
           "PATH": "/usr/bin:/bin"}
    both = [subprocess.Popen([sys.executable, "-m", "recsketch.cli", "gc"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [process.communicate(timeout=120) for process in both]
    assert [process.returncode for process in both] == [0, 0], [err[-2000:] for _, err in outcomes]
    assert sorted(p.name for p in (data / "runs").iterdir()) == sorted(
        ["manual__in-flight", "scheduled__2026-11-20", "scheduled__2026-11-26", "scheduled__2026-11-27",
         "crawl__2026-11-20", "crawl__2026-11-21", "crawl__2026-11-22"])
    engine = store.connect(pg_url)
    with engine.connect() as conn:
        assert len(conn.execute(select(run_folders)).all()) == 7
