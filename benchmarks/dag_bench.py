"""Issue 14: ``dag.test()`` end to end over an imported catalogue (default 200 k models) whose
features are precomputed as chunks, with each task's peak RSS.

  1. a rec-a-sketch folder: N models, power-law likes, small JPEG thumbnails;
  2. ``recsketch import`` of it into a fresh PostgreSQL catalogue (timed, its own peak RSS);
  3. the chunks a plan would make for the models that pass the threshold, written with
     synthetic unit features of --dim (what extraction would write; not the point here);
  4. ``recsketch_recommendations`` under ``dag.test()`` in a child process: threshold, plan,
     extract (every chunk found, no backbone loaded), plan_similarity (streams the chunks into
     the run's features file), the similarity shards, merge, load. Each task logs its own peak
     RSS (``recsketch.resources``: the kernel's high-water mark, reset at the task's start).

  5. a day of 0.1 % change (issue 23): new models with likes, replaced thumbnails, deletions and
     models whose likes fall below the threshold, imported (deletions as the crawl makes them),
     then ``dag.test()`` again: each task's time and peak RSS for the day worked forward.

    python -m benchmarks.dag_bench [--models 200000] [--dim 1280] [--likes-per-model 20] [--no-day]

The similarity FLOPs grow with N² x dim: at 200 k x 1,280 that is ~1e14, minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np

ADMIN_URL = os.environ.get("RECSKETCH_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
REPO = Path(__file__).parents[1]


def build_folder(folder: Path, models: int, likes_per_model: int, seed: int = 0) -> None:
    from PIL import Image

    from recsketch.psv import write_psv

    rng = np.random.default_rng(seed)
    thumbs = folder / "model_thumbs"
    thumbs.mkdir(parents=True)
    bodies = []
    for colour in range(64):  # 64 distinct thumbnails, shared: versions repeat, as duplicates do
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (colour * 4, 255 - colour * 4, (colour * 37) % 256)).save(buffer, "JPEG")
        bodies.append(buffer.getvalue())
    mids = [f"{i:032x}" for i in range(models)]
    for index, mid in enumerate(mids):
        (thumbs / f"{mid}_thumb200.jpg").write_bytes(bodies[index % 64])
    write_psv(folder / "model_urls.psv", ("name", "mid", "published_at"),
              ((f"model {i}", mid, "2026-11-01T00:00:00+00:00") for i, mid in enumerate(mids)))
    n_likes, n_users = models * likes_per_model, models // 2
    liked = (rng.pareto(1.5, n_likes) * models / 40).astype(np.int64) % models
    users = (rng.pareto(1.2, n_likes) * n_users / 40).astype(np.int64) % n_users
    write_psv(folder / "model_likes_anon.psv", ("modelname", "mid", "uid"),
              ((f"model {m}", mids[m], f"user{u}") for m, u in zip(liked.tolist(), users.tolist(), strict=True)))


def precompute_chunks(settings, folder: Path, dim: int) -> int:  # type: ignore[no-untyped-def]
    """The chunks plan_stage would make for the models that pass the threshold, with synthetic
    features: the same chunk ids (so the DAG's extract tasks find them all done)."""
    from recsketch.contracts import ChunkPlan
    from recsketch.features.chunks import Chunk, ChunkStore
    from recsketch.stages.extract import plan_stage
    from recsketch.stages.threshold import threshold_stage

    threshold_stage(settings, folder, progress=lambda _: None)
    plan_stage(settings, folder, progress=lambda _: None)
    plan = ChunkPlan.read(folder)
    print(f"VALID {sum(len(mids) for mids in plan.chunks.values())}", flush=True)
    store = ChunkStore(settings.features_dir, plan.backbone_key)
    versions = json.loads((folder / "valid_models.json").read_text())
    rng = np.random.default_rng(1)
    for chunk_id, mids in plan.chunks.items():
        features = rng.standard_normal((len(mids), dim), dtype=np.float32)
        store.write(Chunk(chunk_id, mids, features, backbone_key=plan.backbone_key,
                          versions={m: versions[m] for m in mids}))
    return len(plan.chunks)


def change_a_day(settings, folder: Path, models: int, seed: int = 2) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """0.1 % of the catalogue changes in the folder: new models liked by the most active users,
    0.03 % replaced thumbnails, 0.03 % deleted (gone from the folder; deleted in the DB as the
    crawl deletes them), 0.03 % whose likes fall to two (below the threshold)."""
    from PIL import Image

    from recsketch.db import store

    rng = np.random.default_rng(seed)
    valid = sorted(json.loads((settings.data_dir / "runs" / "precompute" / "valid_models.json").read_text()))
    picked = rng.choice(len(valid), 3 * max(1, 3 * models // 10_000), replace=False)
    changed, deleted, dropped = (set(np.array(valid)[part].tolist()) for part in np.array_split(picked, 3))
    new = [f"{models + i:032x}" for i in range(max(1, models // 1000))]
    thumbs = folder / "model_thumbs"
    for index, mid in enumerate([*sorted(changed), *new]):
        Image.new("RGB", (32, 32), ((index * 7) % 256, (index * 13) % 256, 128)).save(thumbs / f"{mid}_thumb200.jpg",
                                                                                     "JPEG")
    for mid in deleted:
        (thumbs / f"{mid}_thumb200.jpg").unlink()
    urls, likes = folder / "model_urls.psv", folder / "model_likes_anon.psv"
    rows = [line for line in urls.read_text().splitlines(keepends=True) if line.split("|")[1] not in deleted]
    urls.write_text("".join(rows) + "".join(f"model {mid}|{mid}|2026-11-02T00:00:00+00:00\n" for mid in new))
    kept_likes: dict[str, int] = defaultdict(int)
    out = []
    for line in likes.read_text().splitlines(keepends=True):
        mid = line.split("|")[1]
        if mid in deleted or (mid in dropped and kept_likes[mid] >= 2):
            continue
        kept_likes[mid] += 1
        out.append(line)
    out += [f"model {mid}|{mid}|user{user}\n" for mid in new for user in range(12)]
    likes.write_text("".join(out))
    engine = store.connect(settings.resolved_database_url)
    try:
        store.delete_models(engine, deleted)
    finally:
        engine.dispose()
    return {"new": len(new), "changed": len(changed), "deleted": len(deleted), "dropped": len(dropped)}


class PeakRss(logging.Handler):
    """Collects the "<task>: peak RSS N MiB" and "<task>: done in N s" lines the DAG's tasks log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.peaks: dict[str, list[float]] = defaultdict(list)
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        found = re.fullmatch(r"(\w+): peak RSS (\d+) MiB", message)
        if found:
            self.peaks[found[1]].append(float(found[2]))
        took = re.fullmatch(r"(\w+): done in ([\d.]+) s", message)
        if took:
            self.seconds[took[1]].append(float(took[2]))


def child_dag() -> None:
    from airflow.dag_processing.dagbag import DagBag

    collector = PeakRss()
    logger = logging.getLogger("recsketch")
    logger.addHandler(collector)
    logger.setLevel(logging.INFO)
    dag = DagBag(str(REPO / "dags")).dags["recsketch_recommendations"]
    started = time.perf_counter()
    run = dag.test()
    seconds = time.perf_counter() - started
    print("RESULT " + json.dumps({"state": str(run.state), "seconds": seconds, "peaks": collector.peaks,
                                  "task_seconds": collector.seconds}), flush=True)


def run_child(argv: list[str], env: dict[str, str]) -> tuple[dict, float, str]:
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.dag_bench", *argv], stdout=subprocess.PIPE,
                               text=True, env=env, cwd=REPO)
    output = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if status != 0 or not lines:
        raise RuntimeError(f"{argv} failed ({status}): {output[-3000:]}")
    return json.loads(lines[-1][7:]), usage.ru_maxrss / 2**10, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--likes-per-model", type=int, default=20)
    parser.add_argument("--no-day", action="store_true", help="skip the changed day after the first run")
    parser.add_argument("--child", choices=["import", "chunks", "dag", "change"])
    args = parser.parse_args()
    if args.child:
        from recsketch.config import Settings

        settings = Settings.from_env()
        work = Path(os.environ["DAG_BENCH_WORK"])
        if args.child == "import":
            from recsketch.importer import import_folder

            started = time.perf_counter()
            stats = import_folder(settings, work / "catalog", progress=lambda _: None)
            print("RESULT " + json.dumps({"seconds": time.perf_counter() - started, "models": stats.models,
                                          "likes": stats.likes}), flush=True)
        elif args.child == "change":
            print("RESULT " + json.dumps(change_a_day(settings, work / "catalog", args.models)), flush=True)
        elif args.child == "chunks":
            from recsketch.stages.common import run_dir

            chunks = precompute_chunks(settings, run_dir(settings, "precompute"), args.dim)
            print("RESULT " + json.dumps({"chunks": chunks}), flush=True)
        else:
            child_dag()
        return
    from sqlalchemy import create_engine, text

    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"recsketch_dag_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    print(f"dag benchmark: {args.models:,} models, ~{args.models * args.likes_per_model:,} likes, "
          f"{args.dim}-d features, {os.cpu_count()} cores", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="recsketch-dag-") as tmp:
            work = Path(tmp)
            started = time.perf_counter()
            build_folder(work / "catalog", args.models, args.likes_per_model)
            print(f"  folder written in {time.perf_counter() - started:.0f} s", flush=True)
            home = work / "airflow"
            env = {**os.environ, "DAG_BENCH_WORK": str(work),
                   "RECSKETCH_DATA_DIR": str(work / "data"), "RECSKETCH_DATABASE_URL": url,
                   "RECSKETCH_BACKBONE": "efficientnet_lite0", "AIRFLOW_HOME": str(home),
                   "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags")}
            subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], env=env, check=True,
                           capture_output=True)
            imported, rss, _ = run_child(["--child", "import"], env)
            print(f"  import: {imported['models']:,} models, {imported['likes']:,} likes in "
                  f"{imported['seconds']:.0f} s, peak RSS {rss / 1024:.2f} GiB", flush=True)
            made, _, output = run_child(["--child", "chunks", "--dim", str(args.dim)], env)
            valid = next(int(line.split()[1]) for line in output.splitlines() if line.startswith("VALID "))
            print(f"  {valid:,} models pass the 5/5 threshold: {made['chunks']:,} chunks of them precomputed",
                  flush=True)
            result, _, _ = run_child(["--child", "dag"], env)  # (its ru_maxrss is the last task's: peaks are reset)
            print(f"  dag.test(): {result['state']} in {result['seconds']:.0f} s; peak RSS per task "
                  "(MiB, max over its map indexes; the process's own ~300 MiB of Airflow included):", flush=True)
            for task, peaks in result["peaks"].items():
                print(f"    {task:<20} {max(peaks):>8.0f}  ({len(peaks)} runs)", flush=True)
            if args.no_day:
                return
            change, _, _ = run_child(["--child", "change", "--models", str(args.models)], env)
            imported, _, _ = run_child(["--child", "import"], env)
            print(f"  a day: {change['new']} new, {change['changed']} changed thumbnails, {change['deleted']} deleted, "
                  f"{change['dropped']} below the threshold (re-imported in {imported['seconds']:.0f} s)", flush=True)
            day, _, _ = run_child(["--child", "dag"], env)
            print(f"  the day's dag.test(): {day['state']} in {day['seconds']:.0f} s; per task, the first (full) run "
                  "beside the day worked forward (seconds summed over map indexes; peak RSS MiB):", flush=True)
            tasks = list(dict.fromkeys([*result["task_seconds"], *day["task_seconds"]]))
            for task in tasks:
                first, times = result["task_seconds"].get(task, []), day["task_seconds"].get(task, [])
                peak = max(day["peaks"].get(task, [0]))
                print(f"    {task:<20} {sum(first):>8.1f} s  {sum(times):>8.1f} s  {peak:>8.0f}", flush=True)
            pipeline = [task for task in tasks if task not in ("plan_chunks", "extract")]
            full = sum(sum(result["task_seconds"].get(task, [])) for task in pipeline)
            worked = sum(sum(day["task_seconds"].get(task, [])) for task in pipeline)
            print(f"  threshold to load, extraction excluded: the day {worked:.0f} s vs the full run {full:.0f} s "
                  f"= {worked / max(full, 1e-9):.3f}", flush=True)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
