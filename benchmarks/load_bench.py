"""Recommendations load and query on PostgreSQL (issue 5), in a throwaway database.

  complete - recsketch's load: COPY into staging, indexes, ANALYZE, swap, runs table,
  bare COPY - the same rows COPY'd into an unindexed table (the ceiling),
  INSERT   - the same rows as executemany INSERTs (timed on a slice, extrapolated).
Then p50/p99 of the ``similar_models`` query from 50 concurrent clients (processes).

    python -m benchmarks.load_bench [--models 25655] [--k 10] [--seconds 10]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
import uuid

import numpy as np
from sqlalchemy import create_engine, text

ADMIN_URL = os.environ.get("RECSKETCH_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def rows_for(n: int, k: int) -> list[tuple[str, int, str, float]]:
    rng = np.random.default_rng(0)
    mids = [f"{i:032x}" for i in range(n)]
    neighbours = rng.integers(0, n, size=(n, k))
    scores = np.sort(rng.random((n, k)), axis=1)[:, ::-1]
    return [(mids[i], r + 1, mids[neighbours[i, r]], float(scores[i, r])) for i in range(n) for r in range(k)]


def client(url: str, mids: list[str], seconds: float, out: multiprocessing.Queue) -> None:
    engine = create_engine(url, pool_size=1)
    latencies, errors = [], 0
    query = text("SELECT rank, similar_mid, similar_name, score FROM similar_models WHERE mid = :mid ORDER BY rank")
    rng = np.random.default_rng(os.getpid())
    with engine.connect() as conn:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                conn.execute(query, {"mid": mids[rng.integers(len(mids))]}).all()
                latencies.append(time.perf_counter() - started)
            except Exception:  # counted, not fatal: the figure says how many
                errors += 1
            conn.commit()
    out.put((latencies, errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=25_655)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    from recsketch.db import store

    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"recsketch_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        engine = store.connect(url)
        rows = rows_for(args.models, args.k)
        store.upsert_models(engine, [{"mid": f"{i:032x}", "name": f"model {i}"} for i in range(args.models)])
        store.load_recommendations(engine, "warm-up", "bench", args.k, rows[:1000])

        started = time.perf_counter()
        store.load_recommendations(engine, "bench", "bench", args.k, rows)
        complete = time.perf_counter() - started

        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE bare (LIKE recommendations)"))
            started = time.perf_counter()
            store.copy_rows(conn, "bare", "bench", "bench", rows)
            bare = time.perf_counter() - started
            sample = rows[:20_000]
            conn.execute(text("CREATE TABLE inserted (LIKE recommendations INCLUDING ALL)"))
            started = time.perf_counter()
            conn.execute(text("INSERT INTO inserted (run_id, mid, rank, similar_mid, score, backbone) "
                              "VALUES ('bench', :m, :r, :s, :sc, 'bench')"),
                         [{"m": m, "r": r, "s": s, "sc": sc} for m, r, s, sc in sample])
            inserts = (time.perf_counter() - started) * len(rows) / len(sample)
        n = len(rows)
        print(f"load benchmark: {n:,} rows ({args.models:,} models x top-{args.k}) into PostgreSQL")
        print(f"  complete load (staging COPY + indexes + swap): {n / complete:>12,.0f} rows/s  ({complete:.2f} s)")
        print(f"  bare COPY, same rows:                          {n / bare:>12,.0f} rows/s  ({bare:.2f} s)")
        print(f"  row INSERTs (executemany, 20k extrapolated):   {n / inserts:>12,.0f} rows/s  ({inserts:.1f} s)")
        print(f"  complete / bare COPY: {bare / complete:.2f} (goal >= 0.5); "
              f"complete / INSERT: {inserts / complete:.1f}x")

        queue: multiprocessing.Queue = multiprocessing.Queue()
        mids = [f"{i:032x}" for i in range(args.models)]
        workers = [multiprocessing.Process(target=client, args=(url, mids, args.seconds, queue))
                   for _ in range(args.clients)]
        for worker in workers:
            worker.start()
        results = [queue.get() for _ in workers]
        latencies = np.concatenate([lat for lat, _ in results]) * 1000
        errors = sum(e for _, e in results)
        for worker in workers:
            worker.join()
        print(f"  similar_models, {args.clients} concurrent clients for {args.seconds:g} s: "
              f"{len(latencies) / args.seconds:,.0f} queries/s, p50 {np.percentile(latencies, 50):.2f} ms, "
              f"p99 {np.percentile(latencies, 99):.2f} ms, errors {errors}")
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


if __name__ == "__main__":
    main()
