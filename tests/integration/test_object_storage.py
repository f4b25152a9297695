"""Issue 13: every artefact on a real S3-compatible store (SeaweedFS), written once, read by key.

The store is a real ``weed mini`` on 127.0.0.1 (see ``tools/object_store.py``); the pipeline
reaches it through s3fs with the standard AWS variables, exactly as ``recsketch run`` does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from recsketch import storage
from recsketch.config import Settings
from recsketch.contracts import ValidModels
from recsketch.errors import ConfigError
from recsketch.features.chunks import Chunk, ChunkStore
from recsketch.features.keys import backbone_key
from recsketch.stages import run_pipeline
from recsketch.stages.common import run_dir
from recsketch.stages.crawl import crawl_stage
from recsketch.stages.extract import extract_stage, plan_stage
from recsketch.stages.threshold import threshold_stage
from recsketch.storage import ObjectLocation, location, read_many


def recommendations(db_url: str) -> list[tuple]:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT method, mid, rank, similar_mid, score FROM recommendations "
                                 "ORDER BY method, mid, rank"))
        result = [(method, mid, rank, similar, round(score, 4)) for method, mid, rank, similar, score in rows]
    engine.dispose()
    return result


def listed(root: ObjectLocation) -> list[str]:
    """Every key under ``root`` (the test may list, through boto3; the pipeline never does)."""
    import boto3

    bucket, _, prefix = root.path.partition("/")
    client = boto3.client("s3", region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return [f"{bucket}/{item['Key']}" for page in pages for item in page.get("Contents", [])]


@pytest.fixture
def no_listing(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fail the test if anything lists the object store (listings can be stale: keys come from
    plans and manifests). Yields the names of the listing calls that were attempted."""
    import s3fs

    attempted: list[str] = []

    def refuse(name: str):  # type: ignore[no-untyped-def]
        async def listing(self, path, *args, **kwargs):  # type: ignore[no-untyped-def]
            attempted.append(f"{name}({path})")
            raise AssertionError(f"the object store was listed: {name}({path})")
        return listing

    for name in ("_ls", "_lsdir", "_find", "_glob", "_walk", "_iterdir"):
        monkeypatch.setattr(s3fs.S3FileSystem, name, refuse(name))
    yield attempted


def test_write_once_whole_objects_and_reads_by_key(s3_data_dir: str, no_listing: list[str]) -> None:
    root = location(s3_data_dir)
    assert isinstance(root, ObjectLocation) and str(root) == s3_data_dir
    key = root / "features" / "k" / "chunk-abc.npz"
    assert not key.exists()
    with pytest.raises(FileNotFoundError, match=r"chunk-abc\.npz"):
        key.read_bytes()
    assert storage.create_bytes(key, b"first") is True
    assert storage.create_bytes(key, b"second") is False  # If-None-Match: * refused it
    assert key.read_bytes() == b"first" and key.exists()
    storage.write_bytes(key, b"replaced")  # a whole-object PUT replaces
    assert key.read_bytes() == b"replaced"
    got = read_many([key, root / "missing.jpg"])
    assert got[0] == b"replaced" and isinstance(got[1], FileNotFoundError)
    assert no_listing == []


def test_local_create_once_links_a_complete_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "chunk.npz"
    assert storage.create_bytes(target, b"one") is True
    assert storage.create_bytes(target, b"two") is False
    assert target.read_bytes() == b"one"
    assert [p.name for p in target.parent.iterdir()] == ["chunk.npz"]  # no temp left behind


def test_chunks_are_found_through_the_manifest_not_a_listing(s3_data_dir: str, no_listing: list[str]) -> None:
    store = ChunkStore(location(s3_data_dir) / "features", "key")
    chunk = Chunk("c1", ["a" * 32], np.ones((1, 3), np.float32), {"b" * 32: "bad image"}, "key",
                  {"a" * 32: "v1", "b" * 32: "v1"})
    store.write(chunk)
    assert store.done() == set()  # written, not yet registered
    assert store.register(["c1", "absent"]) == 1  # a planned chunk that was never written is skipped
    assert store.done() == {("a" * 32, "v1"), ("b" * 32, "v1")}
    again = ChunkStore(location(s3_data_dir) / "features", "key")  # another process: reads the manifest
    mids, features, failed = again.load_features({"a" * 32: "v1", "b" * 32: "v1"})
    assert mids == ["a" * 32] and features.shape == (1, 3) and failed == {"b" * 32: "bad image"}
    store.write(chunk)  # a second writer of the same chunk (a retried task) keeps the first
    assert no_listing == []


def test_an_object_store_data_dir_needs_a_database_url(s3_data_dir: str) -> None:
    with pytest.raises(ConfigError, match="RECSKETCH_DATABASE_URL"):
        _ = Settings(data_dir=s3_data_dir).resolved_database_url
    with pytest.raises(ConfigError, match="ftp"):
        Settings(data_dir="ftp://host/x")


def test_the_pipeline_on_the_object_store_equals_a_local_disk_run(
        sketchfab, tmp_path: Path, pg_url: str, s3_data_dir: str, no_listing: list[str]) -> None:
    local_db = f"sqlite:///{tmp_path / 'local.sqlite'}"
    local = Settings(data_dir=tmp_path / "data", database_url=local_db, sketchfab_url=sketchfab.url)
    remote = Settings(data_dir=s3_data_dir, database_url=pg_url, sketchfab_url=sketchfab.url)
    run_pipeline(local, "run-1", progress=lambda _: None)
    summary = run_pipeline(remote, "run-1", progress=lambda _: None)
    assert summary["load"]["models"] > 50
    assert recommendations(pg_url) == recommendations(local_db)
    assert no_listing == []
    # every artefact is in the bucket, nothing in a local data folder
    root = location(s3_data_dir)
    assert isinstance(root, ObjectLocation)
    stored = listed(root)
    kinds = {path[len(root.path) + 1:].split("/")[0] for path in stored}
    assert kinds == {"thumbs", "features", "runs", "exports"}  # the Lite0 export is shared there too
    assert any(p.endswith("/manifest.json") for p in stored) and any(p.endswith("/topk.npz") for p in stored)
    assert not (Path.cwd() / "data").exists() or not any((Path.cwd() / "data").rglob("chunk-*.npz"))

    # a second run reuses every chunk: nothing is extracted again
    again = run_pipeline(remote, "run-2", progress=lambda _: None)
    assert again["extract"] == [] and again["similarity"]["mode"].startswith("unchanged")


def test_sigkill_mid_extraction_on_the_object_store(sketchfab, tmp_path: Path, pg_url: str,
                                                     s3_data_dir: str) -> None:
    """A killed extraction leaves no half-object; the rerun keeps every finished chunk, byte for
    byte, and the features equal an uninterrupted local run's."""
    killed = Settings(data_dir=s3_data_dir, database_url=pg_url, sketchfab_url=sketchfab.url, chunk_size=8)
    folder = run_dir(killed, "r")
    crawl_stage(killed, folder)
    threshold_stage(killed, folder)
    chunk_ids = plan_stage(killed, folder)
    assert len(chunk_ids) == 9
    store = ChunkStore(killed.features_dir, backbone_key(killed))
    env = {**os.environ, "RECSKETCH_DATA_DIR": s3_data_dir, "RECSKETCH_DATABASE_URL": pg_url,
           "RECSKETCH_SKETCHFAB_URL": sketchfab.url, "RECSKETCH_CHUNK_SIZE": "8"}
    command = [sys.executable, "-m", "recsketch.cli", "extract", "--run-id", "r"]
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(store.path(c).exists() for c in chunk_ids) < 3:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    present = [c for c in chunk_ids if store.path(c).exists()]
    assert 3 <= len(present) < 9, "the kill must land mid-way"
    assert all(store.read(c) is not None for c in present)  # every visible object is whole
    before = {c: store.path(c).read_bytes() for c in present}

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {c: store.path(c).read_bytes() for c in present} == before  # finished chunks kept as they were
    assert all(store.read(c) is not None for c in chunk_ids)

    clean = Settings(data_dir=tmp_path / "clean", sketchfab_url=sketchfab.url, chunk_size=8)
    clean_folder = run_dir(clean, "r")
    crawl_stage(clean, clean_folder)
    threshold_stage(clean, clean_folder)
    for chunk_id in plan_stage(clean, clean_folder):
        extract_stage(clean, clean_folder, chunk_id)
    valid = ValidModels.read(folder).versions
    store.register(chunk_ids)
    clean_store = ChunkStore(clean.features_dir, backbone_key(clean))
    mids_a, feats_a, _ = store.load_features(valid)
    mids_b, feats_b, _ = clean_store.load_features(valid)
    assert mids_a == mids_b and len(mids_a) == 72
    np.testing.assert_allclose(feats_a, feats_b, rtol=1e-4, atol=1e-5)


def test_inside_airflow_the_store_is_reached_through_the_connection(object_store, s3_data_dir: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With the AWS variables gone, only the ``recsketch_storage`` connection knows the endpoint and
    the key: ObjectStoragePath's filesystem must be the one in use."""
    import json

    from recsketch import storage
    from recsketch.hooks import airflow_settings

    for name in object_store.env:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_RECSKETCH_STORAGE", json.dumps({
        "conn_type": "aws", "login": object_store.env["AWS_ACCESS_KEY_ID"],
        "password": object_store.env["AWS_SECRET_ACCESS_KEY"],
        "extra": {"endpoint_url": object_store.endpoint, "region_name": "us-east-1"}}))
    monkeypatch.setenv("RECSKETCH_DATA_DIR", s3_data_dir)
    storage._filesystem.cache_clear()
    settings = airflow_settings()
    assert settings.storage_conn_id == "recsketch_storage"
    key = settings.data_root / "probe.txt"
    assert storage.create_bytes(key, b"through the connection")
    assert key.read_bytes() == b"through the connection"
    storage._filesystem.cache_clear()


def test_the_gallery_serves_thumbnails_from_the_object_store(s3_data_dir: str, pg_url: str) -> None:
    from fastapi.testclient import TestClient

    from recsketch.crawl import thumbnail_path
    from recsketch.gallery import create_app

    settings = Settings(data_dir=s3_data_dir, database_url=pg_url)
    mid = "c" * 32
    storage.write_bytes(thumbnail_path(settings, mid), b"\xff\xd8\xff\xe0 a jpeg")
    client = TestClient(create_app(lambda: settings, authenticate=lambda: None))
    answer = client.get(f"/thumbs/{mid}.jpg")
    assert answer.status_code == 200 and answer.content == b"\xff\xd8\xff\xe0 a jpeg"
    assert answer.headers["content-type"] == "image/jpeg"
    assert client.get(f"/thumbs/{'d' * 32}.jpg").status_code == 404
