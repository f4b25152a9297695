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


def test_readers_during_loads_always_see_exactly_one_complete_run(pg_url: str) -> None:
    """A reader loops over the view while loads replace the served set: it never sees a mix."""
    import threading

    engine = store.connect(pg_url)
    mids = [f"{i:032x}" for i in range(300)]
    store.upsert_models(engine, [{"mid": m, "name": m[-4:]} for m in mids])

    def rows(run: int) -> list[tuple[str, int, str, float]]:
        return [(m, r, mids[(i + r) % len(mids)], run + r / 100) for i, m in enumerate(mids) for r in range(1, 11)]

    store.load_recommendations(engine, "run-0", "bb", 10, rows(0))
    seen: list[tuple[int, int, int]] = []  # list.append is atomic under the GIL
    stop = threading.Event()

    errors: list[BaseException] = []

    def reader() -> None:
        try:
            with engine.connect() as conn:
                while not stop.is_set():
                    query = "SELECT count(*), count(DISTINCT run_id), count(DISTINCT floor(score)) FROM similar_models"
                    seen.append(tuple(conn.execute(text(query)).one()))
                    conn.commit()
        except BaseException as exc:  # a reader that fails is a failed test, not a silent thread
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    for run in range(1, 11):
        store.load_recommendations(engine, f"run-{run}", "bb", 10, rows(run))
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(seen) > 30
    assert set(seen) == {(3000, 1, 1)}, sorted(set(seen))


def test_a_load_killed_inside_its_transaction_leaves_the_previous_run_served(pg_url: str, tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    engine = store.connect(pg_url)
    seed_models(engine)
    store.load_recommendations(engine, "run-1", "bb", 2, rows_for(0.9))
    code = (
        "import sys\n"
        "from recsketch.db import store\n"
        f"engine = store.connect({pg_url!r})\n"
        "rows = [('a' * 32, r, 'b' * 32, 0.1) for r in range(1, 3_000_001)]\n"
        "print('loading', flush=True)\n"
        "store.load_recommendations(engine, 'run-2', 'bb', 2, rows)\n"
    )
    victim = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert victim.stdout.readline().strip() == "loading"
    time.sleep(1.5)  # inside the transaction: old rows deleted, new ones being written
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL  # killed, not finished
    assert store.live_run(engine)["run_id"] == "run-1"
    assert store.similar(engine, A)[0]["score"] == 0.9
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM recommendations WHERE run_id = 'run-2'")).scalar() == 0
