"""Recommendations load and query on PostgreSQL (issues 5 and 14), in a throwaway database.

  streamed - recsketch's load from the top-k arrays: CSV blocks built by numpy/pandas streamed
             into COPY into staging, indexes, ANALYZE, swap, runs table (peak allocations traced),
  tuples   - the same load from one Python tuple per row (the old path; up to 300k models),
  bare COPY - a prebuilt CSV buffer COPY'd into an unindexed table (the machine's ceiling),
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


def synthetic_topk(n: int, k: int):  # type: ignore[no-untyped-def]
    """A random top-k of ``n`` models (mids ``{i:032x}``), as recsketch.contracts.TopK."""
    from recsketch.contracts import TopK

    rng = np.random.default_rng(0)
    return TopK([f"{i:032x}" for i in range(n)], rng.integers(0, n, size=(n, k)),
                np.sort(rng.random((n, k), dtype=np.float32), axis=1)[:, ::-1], "bench")


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
        import io
        import tracemalloc

        from recsketch.contracts import TopK

        engine = store.connect(url)
        topk = synthetic_topk(args.models, args.k)
        mids = topk.mids
        store.upsert_models(engine, [{"mid": mid, "name": f"model {i}"} for i, mid in enumerate(mids)])
        store.load_recommendations(engine, "warm-up", "bench", args.k, TopK(mids[:100], topk.indices[:100] % 100,
                                                                            topk.scores[:100], "bench"))
        tracemalloc.start()
        started = time.perf_counter()
        store.load_recommendations(engine, "streamed", "bench", args.k, topk)
        complete = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows = topk.rows() if args.models <= 300_000 else []
        tuples = float("nan")
        if rows:
            started = time.perf_counter()
            store.load_recommendations(engine, "bench", "bench", args.k, rows)
            tuples = time.perf_counter() - started

        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE bare (LIKE recommendations)"))
            prebuilt = io.BytesIO(b"".join(store._binary_blocks("bench", "bench", topk)))
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            started = time.perf_counter()
            cursor.copy_expert("COPY bare (run_id, mid, rank, similar_mid, score, backbone, method) FROM STDIN "
                               "WITH (FORMAT binary)", prebuilt, size=1 << 20)
            bare = time.perf_counter() - started
            sample = topk.rows()[:20_000] if not rows else rows[:20_000]
            conn.execute(text("CREATE TABLE inserted (LIKE recommendations INCLUDING ALL)"))
            started = time.perf_counter()
            conn.execute(text("INSERT INTO inserted (run_id, mid, rank, similar_mid, score, backbone) "
                              "VALUES ('bench', :m, :r, :s, :sc, 'bench')"),
                         [{"m": m, "r": r, "s": s, "sc": sc} for m, r, s, sc in sample])
            inserts = (time.perf_counter() - started) * len(rows) / len(sample)
        n = args.models * args.k
        print(f"load benchmark: {n:,} rows ({args.models:,} models x top-{args.k}) into PostgreSQL")
        print(f"  streamed load from arrays (COPY + indexes + swap): {n / complete:>10,.0f} rows/s  "
              f"({complete:.2f} s), peak traced allocations {peak / 2**20:,.0f} MiB (the arrays themselves: "
              f"{(topk.indices.nbytes + topk.scores.nbytes) / 2**20:,.0f} MiB)")
        print(f"  the same load from Python tuples:                  {n / tuples:>10,.0f} rows/s  ({tuples:.2f} s)")
        print(f"  bare COPY of a prebuilt buffer, no indexes:        {n / bare:>10,.0f} rows/s  ({bare:.2f} s)")
        print(f"  row INSERTs (executemany, 20k extrapolated):       {n / inserts:>10,.0f} rows/s  ({inserts:.1f} s)")
        print(f"  streamed / bare COPY: {bare / complete:.2f}; streamed / tuples: {tuples / complete:.1f}x; "
              f"streamed / INSERT: {inserts / complete:.1f}x")

        queue: multiprocessing.Queue = multiprocessing.Queue()
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
