"""Recommendations in SQLite and PostgreSQL: atomic replacement, queries, the SQL view."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from recsketch.db import store
from recsketch.errors import InvalidModelId, UnknownModel

A, B, C = "a" * 32, "b" * 32, "c" * 32


def seed_models(engine) -> None:  # type: ignore[no-untyped-def]
    store.upsert_models(engine, [{"mid": m, "name": f"model {m[0]}", "thumbnail_url": f"http://t/{m[0]}.jpg"}
                                 for m in (A, B, C)])


def rows_for(score: float) -> list[tuple[str, int, str, float]]:
    return [(A, 1, B, score), (A, 2, C, score / 2), (B, 1, A, score), (C, 1, A, score / 3)]


def test_load_query_and_replace(db_url: str) -> None:
    engine = store.connect(db_url)
    seed_models(engine)
    store.load_recommendations(engine, "run-1", "bb", 2, rows_for(0.9))
    assert store.similar(engine, A) == [{"rank": 1, "mid": B, "name": "model b", "score": 0.9},
                                        {"rank": 2, "mid": C, "name": "model c", "score": 0.45}]
    assert store.similar(engine, A, top_k=1) == [{"rank": 1, "mid": B, "name": "model b", "score": 0.9}]
    store.load_recommendations(engine, "run-2", "bb", 2, rows_for(0.5))
    assert store.similar(engine, A)[0]["score"] == 0.5
    assert store.live_run(engine)["run_id"] == "run-2"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT DISTINCT run_id FROM recommendations")).scalars().all() == ["run-2"]
        view = conn.execute(text("SELECT similar_name, similar_thumbnail_url FROM similar_models "
                                 "WHERE mid = :mid ORDER BY rank"), {"mid": A}).all()
    assert view == [("model b", "http://t/b.jpg"), ("model c", "http://t/c.jpg")]


def test_a_failed_load_leaves_the_served_set(db_url: str) -> None:
    engine = store.connect(db_url)
    seed_models(engine)
    store.load_recommendations(engine, "run-1", "bb", 2, rows_for(0.9))
    broken = [*rows_for(0.1), (A, 1, B, 0.1)]  # duplicate (run, mid, rank): the load must fail
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        store.load_recommendations(engine, "run-2", "bb", 2, broken)
    assert store.live_run(engine)["run_id"] == "run-1"
    assert store.similar(engine, A)[0]["score"] == 0.9


def test_rerunning_the_same_run_is_idempotent(db_url: str) -> None:
    engine = store.connect(db_url)
    seed_models(engine)
    for _ in range(2):
        store.load_recommendations(engine, "run-1", "bb", 2, rows_for(0.9))
    assert len(store.similar(engine, A)) == 2


def test_unknown_and_malformed_mids(db_url: str) -> None:
    engine = store.connect(db_url)
    seed_models(engine)
    store.load_recommendations(engine, "run-1", "bb", 2, [(A, 1, B, 0.9)])
    with pytest.raises(UnknownModel, match="unknown model id"):
        store.similar(engine, "d" * 32)
    with pytest.raises(UnknownModel, match="no recommendations"):
        store.similar(engine, C)
    with pytest.raises(InvalidModelId):
        store.similar(engine, "' OR 1=1 --")
