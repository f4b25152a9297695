"""Crawl throughput against the local server with 50 ms latency (issue 3).

recsketch's crawler (8 workers, shared rate limit R) and a sequential client (one request at
a time, as rec-a-sketch's crawler did) crawl the same catalogue of real model ids in the same
run. Prints achieved/allowed rate (goal >= 0.9) and the speed-up over the sequential client.

    python -m benchmarks.crawl_bench [--models 240] [--rate 40] [--latency-ms 50]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from recsketch.config import Settings
from recsketch.crawl import crawl
from recsketch.db import store
from recsketch.demo import build_catalog_from_psv
from recsketch.sketchfab.client import SketchfabClient
from recsketch.sketchfab.server import Faults, start_in_thread

SOURCE = Path(__file__).parents[2] / "shared" / "data" / "model_urls.psv"


def run_crawl(folder: Path, work: Path, server_url: str, workers: int, rate: float | None) -> tuple[int, float]:
    settings = Settings(data_dir=work, sketchfab_url=server_url, crawl_workers=workers)
    engine = store.connect(settings.resolved_database_url)
    client = SketchfabClient(server_url, rate_limit=rate, pool_size=workers * 2)
    started = time.perf_counter()
    stats = crawl(settings, engine, client, progress=lambda _: None)
    seconds = time.perf_counter() - started
    assert stats.likes_failed == 0 and not stats.thumbnails_failed, stats.as_dict()
    return client.stats.requests, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=240)
    parser.add_argument("--rate", type=float, default=40.0, help="allowed requests/s (R)")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="recsketch-bench-") as tmp:
        root = Path(tmp)
        build_catalog_from_psv(root / "catalog", SOURCE, args.models, seed=3)
        server = start_in_thread(root / "catalog", faults=Faults(latency_s=args.latency_ms / 1000))
        try:
            ours, ours_s = run_crawl(root / "catalog", root / "ours", server.url, args.workers, args.rate)
            seq, seq_s = run_crawl(root / "catalog", root / "sequential", server.url, 1, None)
        finally:
            server.shutdown()
    achieved = ours / ours_s
    print(f"crawl benchmark: {args.models} real model ids, {args.latency_ms:.0f} ms latency per request")
    print(f"{'client':<34}{'requests':>9}{'seconds':>9}{'req/s':>8}")
    print(f"{'recsketch (' + str(args.workers) + ' workers, R=' + f'{args.rate:g}' + ' req/s)':<34}"
          f"{ours:>9}{ours_s:>9.2f}{achieved:>8.1f}")
    print(f"{'sequential (rec-a-sketch style)':<34}{seq:>9}{seq_s:>9.2f}{seq / seq_s:>8.1f}")
    print(f"achieved/allowed rate: {achieved / args.rate:.2f} (goal >= 0.9)")
    print(f"speed-up over sequential: {seq_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
