"""recsketch at a million models (issue 14), each part in a child process of its own so that
its peak RSS is its own (``os.wait4``), beside the machine's limits measured in the same run.

  threshold  60 M power-law likes (as read_likes returns them: categorical mid/uid) -> threshold_likes
  plan       1 M valid models -> plan_stage: task count and time
  shard      one similarity shard of 10 k rows against 1 M x 1,280 consolidated unit features
             (a memory-mapped .npy), beside sgemm of the same shapes; the whole run extrapolated
  load       10 M rows (1 M models x top-10) streamed into PostgreSQL with indexes and swap,
             beside a bare binary COPY of the prebuilt buffer

    python -m benchmarks.scale_bench [--models 1000000] [--likes 60000000] [--dim 1280] [--parts ...]

Smaller sizes (``--models 100000 --likes 6000000``) make a quick smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks import parts

ADMIN_URL = os.environ.get("RECSKETCH_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
PARTS = ("threshold", "plan", "shard", "load")


def part_threshold(args: argparse.Namespace, work: Path) -> dict:
    import pandas as pd

    from recsketch.likes import threshold_likes

    rng = np.random.default_rng(0)
    n_users = args.models * 3
    # power laws on both sides: a few models and users gather most likes
    mids = (rng.pareto(1.2, args.likes) * args.models / 20).astype(np.int64) % args.models
    uids = (rng.pareto(1.1, args.likes) * n_users / 30).astype(np.int64) % n_users
    model_names = [f"{i:032x}" for i in range(args.models)]
    user_names = [f"u{i}" for i in range(n_users)]
    frame = pd.DataFrame({"mid": pd.Categorical.from_codes(mids.astype(np.int32), model_names),
                          "uid": pd.Categorical.from_codes(uids.astype(np.int32), user_names)})
    del mids, uids
    started = time.perf_counter()
    result = threshold_likes(frame, 5)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "likes_in": args.likes, "likes_unique": result.likes_before,
            "likes_kept": len(result.likes), "models_kept": result.likes["mid"].nunique(), "passes": result.iterations}


def part_plan(args: argparse.Namespace, work: Path) -> dict:
    from recsketch.config import Settings
    from recsketch.contracts import ChunkPlan, ValidModels
    from recsketch.stages.common import run_dir
    from recsketch.stages.extract import plan_stage

    settings = Settings(data_dir=work / "plan", chunk_size=256)
    folder = run_dir(settings, "scale")
    ValidModels({f"{i:032x}": "v1" for i in range(args.models)}).write(folder)
    started = time.perf_counter()
    tasks = plan_stage(settings, folder, progress=lambda _: None)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tasks": len(tasks), "max_tasks": settings.max_mapped_tasks,
            "chunks": len(ChunkPlan.read(folder).chunks)}


def part_features(args: argparse.Namespace, work: Path) -> dict:
    """The consolidated unit features (written in blocks through a memory map, outside the timing)."""
    path = work / "features.npy"
    rng = np.random.default_rng(1)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(args.models, args.dim))
    for start in range(0, args.models, 50_000):
        block = rng.standard_normal((min(50_000, args.models - start), args.dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out.flush()
    return {"bytes": path.stat().st_size}


def part_shard(args: argparse.Namespace, work: Path) -> dict:
    from recsketch.similarity import NpyRows, top_k_tiled

    unit = NpyRows(work / "features.npy")  # as similarity_shard_stage reads it
    rows = min(args.shard_rows, args.models)
    started = time.perf_counter()
    top_k_tiled(unit, 10, (0, rows))
    seconds = time.perf_counter() - started
    # the machine's limit: sgemm of one query block against candidate blocks, the same shapes
    query = np.asarray(unit[:2048], dtype=np.float32)
    candidates = np.asarray(unit[: min(args.models, 32768)], dtype=np.float32)
    query @ candidates.T
    started = time.perf_counter()
    repeats = 3
    for _ in range(repeats):
        query @ candidates.T
    gemm = (time.perf_counter() - started) / repeats
    flops = 2 * query.shape[0] * candidates.shape[0] * args.dim
    gflops = flops / gemm / 1e9
    shard_flops = 2 * rows * args.models * args.dim
    return {"seconds": seconds, "rows": rows, "sgemm_gflops": gflops,
            "sgemm_seconds_same_flops": shard_flops / (gflops * 1e9),
            "whole_run_hours": seconds * (args.models / rows) / 3600}


def part_load(args: argparse.Namespace, work: Path) -> dict:
    import io

    from sqlalchemy import create_engine, text

    from benchmarks.load_bench import synthetic_topk
    from recsketch.db import store

    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"recsketch_scale_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    engine = store.connect(url)
    try:
        topk = synthetic_topk(args.models, 10)
        started = time.perf_counter()
        store.load_recommendations(engine, "scale", "bench", 10, topk)
        seconds = time.perf_counter() - started
        prebuilt = io.BytesIO(b"".join(store._binary_blocks("scale", "bench", topk)))
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE bare (LIKE recommendations)"))
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            started = time.perf_counter()
            cursor.copy_expert("COPY bare (run_id, mid, rank, similar_mid, score, backbone, method) FROM STDIN "
                               "WITH (FORMAT binary)", prebuilt, size=1 << 20)
            bare = time.perf_counter() - started
        rows = args.models * 10
        return {"seconds": seconds, "rows": rows, "rows_per_s": rows / seconds, "bare_copy_rows_per_s": rows / bare}
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def child(part: str, args: argparse.Namespace, work: Path) -> None:
    result = globals()[f"part_{part}"](args, work)
    print("RESULT " + json.dumps(result), flush=True)


def run_part(part: str, argv: list[str], work: Path) -> dict:
    return parts.run_part("benchmarks.scale_bench", part, argv, work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=1_000_000)
    parser.add_argument("--likes", type=int, default=60_000_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    parser.add_argument("--child")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args, args.work)
        return
    argv = ["--models", str(args.models), "--likes", str(args.likes), "--dim", str(args.dim),
            "--shard-rows", str(args.shard_rows)]
    print(f"scale benchmark: {args.models:,} models, {args.likes:,} likes, {args.dim}-d features, "
          f"{os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="recsketch-scale-") as tmp:
        work = Path(tmp)
        for part in args.parts:
            if part == "shard":
                made = run_part("features", argv, work)
                print(f"  (features: {made['bytes'] / 2**30:.1f} GiB written for the shard)", flush=True)
            result = run_part(part, argv, work)
            if part == "threshold":
                print(f"  threshold: {result['likes_in']:,} likes ({result['likes_unique']:,} distinct) -> "
                      f"{result['likes_kept']:,} likes of {result['models_kept']:,} models in {result['passes']} "
                      f"passes: {result['seconds']:.1f} s (goal <= 60), peak RSS {result['peak_rss_gib']:.2f} GiB "
                      "(goal <= 4, including building the input)", flush=True)
            elif part == "plan":
                print(f"  plan: {result['chunks']:,} chunks in {result['tasks']} tasks (max {result['max_tasks']}): "
                      f"{result['seconds']:.1f} s (goal <= 10), peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)
            elif part == "shard":
                print(f"  similarity shard: {result['rows']:,} rows x {args.models:,}: {result['seconds']:.1f} s, "
                      f"peak RSS {result['peak_rss_gib']:.2f} GiB (goal <= 4); sgemm here {result['sgemm_gflops']:.0f} "
                      f"GFLOP/s = {result['sgemm_seconds_same_flops']:.1f} s for the same FLOPs "
                      f"({result['sgemm_seconds_same_flops'] / result['seconds']:.2f} of the limit); "
                      f"whole run {result['whole_run_hours']:.1f} h on one such machine", flush=True)
            else:
                print(f"  load: {result['rows']:,} rows with indexes and swap in {result['seconds']:.1f} s = "
                      f"{result['rows_per_s']:,.0f} rows/s (goal >= 1M); bare binary COPY "
                      f"{result['bare_copy_rows_per_s']:,.0f} rows/s "
                      f"({result['rows_per_s'] / result['bare_copy_rows_per_s']:.2f} of it); "
                      f"peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
