"""The demo pipeline with its data dir on a real object store (SeaweedFS on 127.0.0.1) against a
local disk, in the same run (issue 13). Goal: object store <= 1.25x the local time.

Both sides crawl the same local Sketchfab server and keep their recommendations in an SQLite
file on local disk, so only where the artefacts live differs. Trials alternate local, object
store, local, ...; the figure is the ratio of the medians, per stage and in total.

    python -m benchmarks.storage_bench [--trials 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from recsketch.config import Settings
from recsketch.demo import build_demo_catalog
from recsketch.sketchfab.server import start_in_thread

STAGES = ("crawl", "threshold", "plan", "extract", "similarity", "load")


def timed_pipeline(settings: Settings, run_id: str) -> dict[str, float]:
    from recsketch import stages
    from recsketch.stages.common import run_dir

    quiet: Callable[[str], None] = lambda _: None  # noqa: E731
    times: dict[str, float] = {}
    folder = run_dir(settings, run_id)

    def stage(name: str, call: Callable[[], object]) -> object:
        started = time.perf_counter()
        result = call()
        times[name] = time.perf_counter() - started
        return result

    stage("crawl", lambda: stages.CRAWL(settings, folder, progress=quiet))
    stage("threshold", lambda: stages.THRESHOLD(settings, folder, quiet))
    chunk_ids = stage("plan", lambda: stages.PLAN_CHUNKS(settings, folder, quiet))
    assert isinstance(chunk_ids, list)
    stage("extract", lambda: [stages.EXTRACT(settings, folder, c, quiet) for c in chunk_ids])
    stage("similarity", lambda: stages.similarity_stage(settings, folder, quiet))
    stage("load", lambda: stages.LOAD(settings, folder, run_id, quiet))
    times["total"] = sum(times.values())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=16)
    args = parser.parse_args()
    from tools.object_store import ObjectStore

    with tempfile.TemporaryDirectory(prefix="recsketch-storage-bench-") as tmp_name:
        tmp = Path(tmp_name)
        build_demo_catalog(tmp / "catalog")
        server = start_in_thread(tmp / "catalog")
        object_store = ObjectStore(tmp / "seaweedfs").start()
        os.environ.update(object_store.env)
        results: dict[str, list[dict[str, float]]] = {"local": [], "object store": []}
        try:
            timed_pipeline(Settings(data_dir=tmp / "warm", database_url=f"sqlite:///{tmp / 'warm.sqlite'}",
                                    sketchfab_url=server.url, chunk_size=args.chunk_size), "warm-up")
            for trial in range(args.trials):
                for side in results:
                    name = f"{side.replace(' ', '-')}-{trial}-{uuid.uuid4().hex[:6]}"
                    data_dir: Path | str = tmp / name if side == "local" else object_store.url(name)
                    settings = Settings(data_dir=data_dir, database_url=f"sqlite:///{tmp / name}.sqlite",
                                        sketchfab_url=server.url, chunk_size=args.chunk_size)
                    results[side].append(timed_pipeline(settings, name))
                    print(f"trial {trial} {side:>12}: {results[side][-1]['total']:.2f}s", flush=True)
        finally:
            object_store.stop()
            server.shutdown()
    print(f"\ndemo pipeline (76 models, chunks of {args.chunk_size}), median of {args.trials} trials, "
          "same run, recommendations in local SQLite on both sides")
    print(f"{'stage':>10} {'local s':>9} {'object store s':>15} {'ratio':>6}")
    for stage in (*STAGES, "total"):
        local = statistics.median(t[stage] for t in results["local"])
        remote = statistics.median(t[stage] for t in results["object store"])
        print(f"{stage:>10} {local:9.2f} {remote:15.2f} {remote / local if local else float('nan'):6.2f}")
    total = statistics.median(t["total"] for t in results["object store"]) / statistics.median(
        t["total"] for t in results["local"])
    print(f"\nobject store / local disk: {total:.2f}x (goal <= 1.25x)")


if __name__ == "__main__":
    main()
