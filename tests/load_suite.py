"""Load: the gallery's recommendation endpoint (through a real Airflow api-server, logged in)
and the ``similar_models`` view, each under concurrent clients on loopback.

Each client is its own process (a real connection each, no shared GIL) asking for random
models' recommendations back to back; every failed request or query counts as an error.

    python -m tests.load_suite --clients 50 --seconds 60     # part of `make faults`
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_MODELS = 25_655  # the seed's catalogue after thresholding
TOP_K = 10


def _percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2)}


def _sql_client(url: str, seconds: float, seed: int, out: multiprocessing.Queue) -> None:
    from sqlalchemy import create_engine, text

    query = text("SELECT rank, similar_mid, similar_name, score FROM similar_models WHERE mid = :mid ORDER BY rank")
    rng = np.random.default_rng(seed)
    latencies, errors = [], 0
    engine = create_engine(url, pool_size=1)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            with engine.connect() as conn:
                rows = conn.execute(query, {"mid": f"{int(rng.integers(N_MODELS)):032x}"}).all()
            if len(rows) != TOP_K:
                raise AssertionError(f"{len(rows)} rows")
            latencies.append(time.perf_counter() - started)
        except Exception:
            errors += 1
    engine.dispose()
    out.put((latencies, errors))


def _http_client(base: str, token: str, seconds: float, seed: int, out: multiprocessing.Queue) -> None:
    import requests

    rng = np.random.default_rng(seed)
    latencies, errors = [], 0
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            answer = session.get(f"{base}/recsketch/api/similar/{int(rng.integers(N_MODELS)):032x}", timeout=30)
            if answer.status_code != 200 or len(answer.json()) != TOP_K:
                raise AssertionError(answer.status_code)
            latencies.append(time.perf_counter() - started)
        except Exception:
            errors += 1
    out.put((latencies, errors))


def _hammer(target, args: tuple, clients: int, seconds: float) -> dict:  # type: ignore[no-untyped-def]
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    workers = [context.Process(target=target, args=(*args, seconds, seed, out)) for seed in range(clients)]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join()
    latencies = [x for lat, _ in results for x in lat]
    errors = sum(e for _, e in results)
    return {"clients": clients, "seconds": seconds, "requests": len(latencies) + errors, "errors": errors,
            "per_s": round(len(latencies) / seconds, 1), **_percentiles(latencies)}


def run_load(workdir: Path, clients: int, seconds: float) -> dict[str, dict]:
    """Load the recommendations for N_MODELS, start Airflow with the gallery, hammer both."""
    from benchmarks.load_bench import synthetic_topk
    from recsketch.db import store
    from tests.fault_suite import Databases
    from tools.local_airflow import LocalAirflow, connection_env, free_port

    dbs = Databases()
    try:
        _, recs_url = dbs.create()
        _, meta_url = dbs.create()
        engine = store.connect(recs_url)
        store.upsert_models(engine, [{"mid": f"{i:032x}", "name": f"model {i}"} for i in range(N_MODELS)])
        store.load_recommendations(engine, "load-test", "synthetic", TOP_K, synthetic_topk(N_MODELS, TOP_K))
        engine.dispose()
        env = {**connection_env("http://127.0.0.1:9", None, recs_url), "RECSKETCH_DATA_DIR": str(workdir / "data")}
        airflow = LocalAirflow(workdir / "airflow", port=free_port(), metadata_url=meta_url, env=env)
        try:
            airflow.start()
            report = {"similar_models": _hammer(_sql_client, (recs_url,), clients, seconds),
                      "gallery endpoint": _hammer(_http_client, (airflow.url, airflow.token()), clients, seconds)}
        finally:
            airflow.stop()
        return report
    finally:
        dbs.drop_all()


def describe(report: dict[str, dict]) -> str:
    return "\n".join(f"{name}: {r['clients']} clients x {r['seconds']:g} s: {r['requests']} requests, "
                     f"{r['errors']} errors, {r['per_s']}/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms"
                     for name, r in report.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="recsketch-load-") as tmp:
        report = run_load(Path(tmp), args.clients, args.seconds)
    print(describe(report))
    return 1 if any(r["errors"] for r in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
