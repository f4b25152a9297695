"""Crawl throughput against the local server with 50 ms latency (issue 3), and the cost of a
daily run against a full recrawl (issue 11).

1. recsketch's crawler (8 workers, shared rate limit R) and a sequential client (one request
   at a time, as rec-a-sketch's crawler did) crawl the same catalogue of real model ids in the
   same run. Prints achieved/allowed rate (goal >= 0.9) and the speed-up over the sequential
   client.
2. The whole real catalogue (28,824 model ids) is crawled once; then 1 % of the models get a
   new like, and the next day's run (likers refetched only where likeCount changed or they
   are older than 7 days) is compared with a full recrawl (every liker refetched) of the same
   state. Goal: the daily run sends <= 10 % of the full recrawl's requests.

    python -m benchmarks.crawl_bench [--models 240] [--rate 40] [--latency-ms 50] [--daily-models 0]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from recsketch.config import Settings
from recsketch.crawl import crawl
from recsketch.db import store
from recsketch.demo import build_catalog_from_psv
from recsketch.sketchfab.client import SketchfabClient
from recsketch.sketchfab.server import Catalog, Faults, start_in_thread

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


def daily_against_full(n_models: int, changed_share: float = 0.01) -> None:
    """Requests of one daily run with ``changed_share`` of the models liked anew, against a
    full recrawl of the same catalogue state."""
    with tempfile.TemporaryDirectory(prefix="recsketch-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        truth = build_catalog_from_psv(root / "catalog", SOURCE, n_models, seed=5)
        shutil.rmtree(root / "catalog" / "model_thumbs")  # thumbnails are fetched once either way: likes only
        catalog = Catalog(root / "catalog")
        server = start_in_thread(catalog)
        day0 = datetime.now(UTC)
        try:
            settings = Settings(data_dir=root / "data", sketchfab_url=server.url, crawl_workers=8)
            engine = store.connect(settings.resolved_database_url)
            first = crawl(settings, engine, SketchfabClient(server.url, pool_size=16), now=day0,
                          progress=lambda _: None)
            setup_s = time.perf_counter() - started
            changed = sorted(truth)[:: round(1 / changed_share)]
            for mid in changed:
                catalog.add_likes(mid, [("bench-new-fan", None)])
            counts = {}
            for label, max_age in (("daily run (max age 7 d)", 7.0), ("full recrawl", 0.0)):
                run_settings = settings.with_overrides(likes_max_age_days=max_age)
                client = SketchfabClient(server.url, pool_size=16)
                begun = time.perf_counter()
                stats = crawl(run_settings, engine, client, now=day0 + timedelta(days=1), progress=lambda _: None)
                counts[label] = (client.stats.requests, time.perf_counter() - begun, stats)
                if max_age:  # the daily run must have caught every change
                    assert stats.likes_refreshed == {"count_changed": len(changed)}, stats.likes_refreshed
        finally:
            server.shutdown()
    print(f"\ndaily run vs full recrawl: {len(truth)} real model ids (no thumbnails), {first.likes} likes, "
          f"{len(changed)} models ({changed_share:.0%}) with a new like (setup {setup_s:.0f} s)")
    print(f"{'run':<28}{'requests':>10}{'listing':>9}{'likers refetched':>18}{'seconds':>9}")
    for label, (requests, seconds, stats) in counts.items():
        print(f"{label:<28}{requests:>10}{stats.pages:>9}{sum(stats.likes_refreshed.values()):>18}{seconds:>9.1f}")
    daily, full = counts["daily run (max age 7 d)"][0], counts["full recrawl"][0]
    print(f"daily / full recrawl requests: {daily / full:.3f} (goal <= 0.10)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=240)
    parser.add_argument("--rate", type=float, default=40.0, help="allowed requests/s (R)")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--daily-models", type=int, default=0,
                        help="catalogue size for the daily-run comparison (0: every model in model_urls.psv)")
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
    daily_against_full(args.daily_models)


if __name__ == "__main__":
    main()
