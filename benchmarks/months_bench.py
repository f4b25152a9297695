"""Months of daily runs in one data dir: does what recsketch keeps stay bounded? (issue 24)

A catalogue published over ``--growth-days`` (``demo.build_daily_catalog``: small solid
thumbnails, likes arriving over the days after a model appears) is replayed one run a day
through the local server, its clock moved a day each time; each growth day also replaces
``--changes`` thumbnails and deletes ``--changes`` models. Then ``--constant-days`` in which
nothing changes (the last models' likes still arrive in the first week: the growth goal is
measured after it). After each run: the data dir's bytes by kind (run folders, feature chunks and
their manifest, thumbnails, exports; the catalogue DB, a PostgreSQL database of its own,
vacuumed after each run as autovacuum would between two real days) and the catalogue's size.

It prints, per day (every ``--every`` days), those sizes and the bytes per model of each kind;
then the goals: at a constant catalogue, growth over the last 30 constant days (goal ≤ 1 %),
while it grows, the data dir's growth against the catalogue's (goal: in proportion), and the
last day's bytes per model extrapolated to 1 M models against the served state's size (the
current models' features and thumbnails; goal ≤ 2×). A few seconds a day here, ~4 min in all.

``python -m benchmarks.months_bench`` (97 days); ``--growth-days 10 --constant-days 10`` for a smoke run.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("runs", "features", "thumbs", "exports", "db", "other")
WARM_UP = 7  # days of the catalogue published before the first run (likes arrive over the days after)
SETTLE = 7  # constant days before the window: the last models' likes still arrive (mean 72 h)


def sizes(data: Path) -> dict[str, int]:
    """Bytes under the data dir by kind."""
    out = dict.fromkeys(KINDS, 0)
    for path in data.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        top = path.relative_to(data).parts[0]
        kind = top if top in KINDS else "db" if path.name.startswith("recsketch.sqlite") else "other"
        out[kind] += path.stat().st_size
    return out


def served_state(settings, engine) -> int:  # type: ignore[no-untyped-def]
    """The bytes the live service needs: each current model's feature row and its thumbnail."""
    from recsketch.db import store
    from recsketch.features.chunks import ChunkStore
    from recsketch.features.keys import backbone_key

    current = store.models_with_thumbnails(engine)
    chunk_store = ChunkStore(settings.features_dir, backbone_key(settings))
    manifest = chunk_store.manifest()
    dim = 0
    for chunk_id in manifest:
        chunk = chunk_store.read(chunk_id)
        if chunk is not None and chunk.features.size:
            dim = chunk.features.shape[1]
            break
    thumbs = sum((settings.thumbs_dir / f"{mid}.jpg").stat().st_size for mid in current
                 if (settings.thumbs_dir / f"{mid}.jpg").exists())
    return len(current) * dim * 4 + thumbs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--growth-days", type=int, default=60)
    parser.add_argument("--constant-days", type=int, default=37)
    parser.add_argument("--models-per-day", type=int, default=10)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--changes", type=int, default=1, help="thumbnails replaced and models deleted each growth day")
    parser.add_argument("--keep-runs", type=int, default=7)
    parser.add_argument("--every", type=int, default=5, help="print every n-th day")
    parser.add_argument("--admin-url", default=os.environ.get("RECSKETCH_BENCH_ADMIN_URL",
                                                              "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"),
                        help="a PostgreSQL server to make the catalogue DB in (its size is the db column)")
    args = parser.parse_args()

    from recsketch.config import Settings
    from recsketch.db import store
    from recsketch.demo import build_daily_catalog
    from recsketch.sketchfab.server import Catalog, start_in_thread
    from recsketch.stages import run_pipeline

    days = args.growth_days + args.constant_days
    start = datetime(2026, 1, 1, tzinfo=UTC)
    print(f"months benchmark: {args.growth_days} growth days ({args.models_per_day} models a day, {args.changes} "
          f"replaced and {args.changes} deleted a day), then {args.constant_days} constant days; RECSKETCH_KEEP_RUNS "
          f"{args.keep_runs}; {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="recsketch-months-") as tmp:
        work = Path(tmp)
        build_daily_catalog(work / "catalog", days=args.growth_days + WARM_UP, models_per_day=args.models_per_day,
                            n_users=args.users, seed=5, start=start, likes_per_model=14)
        catalog = Catalog(work / "catalog")
        server = start_in_thread(catalog, now=start)
        rng = random.Random(9)
        database = _database(args.admin_url)
        settings = Settings(data_dir=work / "data", sketchfab_url=server.url, runtime="torch", top_k=10,
                            keep_runs=args.keep_runs, gate_min_ratio=0.0, http_retries=1, database_url=database,
                            compaction_grace_s=0.0)  # replayed days are seconds apart: what compaction retires
        # goes the next day, as the hour's grace does when days are a day apart
        engine = store.connect(settings.resolved_database_url)
        history: list[dict] = []
        print(f"  {'day':>4} {'models':>6} " + " ".join(f"{kind:>10}" for kind in KINDS)
              + f" {'total':>10} {'B/model':>8} {'s':>5}", flush=True)
        try:
            for day in range(1, days + 1):
                server.now = start + timedelta(days=WARM_UP + day)
                if 1 < day <= args.growth_days:
                    listed = sorted(m.mid for m in catalog.models if m.published_at and m.published_at < server.now
                                    and m.thumbnail is not None)
                    for mid in rng.sample(listed, min(len(listed), 2 * args.changes))[: args.changes]:
                        picture = io.BytesIO()
                        Image.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3))).save(picture, "JPEG")
                        catalog.replace_thumbnail(mid, picture.getvalue())
                    for mid in rng.sample(listed, min(len(listed), args.changes)):
                        catalog.remove(mid)
                started = time.perf_counter()
                run_pipeline(settings, f"day-{day:03d}", progress=lambda _: None)
                seconds = time.perf_counter() - started
                models = len(store.models_with_thumbnails(engine))
                measured = sizes(settings.data_root)  # type: ignore[arg-type]
                _vacuum(engine)  # what autovacuum does in a day's 24 h (it naps a minute; a replayed day is seconds)
                measured["db"] = _database_bytes(engine)
                total = sum(measured.values())
                history.append({"day": day, "models": models, "total": total, **measured})
                if day % args.every == 0 or day in (1, args.growth_days, days):
                    print(f"  {day:>4} {models:>6} " + " ".join(f"{measured[kind]:>10,}" for kind in KINDS)
                          + f" {total:>10,} {total / max(models, 1):>8,.0f} {seconds:>5.1f}", flush=True)
            served = served_state(settings, engine)
        finally:
            server.shutdown()
            server.server_close()
            engine.dispose()
            _drop(args.admin_url, database)
    last = history[-1]
    constant = history[args.growth_days + SETTLE:]
    window = constant[-30:] if len(constant) >= 2 else []
    if window:
        growth = window[-1]["total"] / window[0]["total"] - 1
        print(f"  constant catalogue: the data dir grew {growth:+.2%} over its last {len(window)} days "
              f"({window[0]['total']:,} -> {window[-1]['total']:,} bytes; goal <= 1 %: "
              f"{'met' if growth <= 0.01 else 'NOT met'})", flush=True)
    grown = [h for h in history[: args.growth_days] if h["day"] > args.keep_runs]
    if len(grown) >= 2:
        data_ratio = grown[-1]["total"] / grown[0]["total"]
        model_ratio = grown[-1]["models"] / max(grown[0]["models"], 1)
        print(f"  growing catalogue (days {grown[0]['day']}-{grown[-1]['day']}): models x{model_ratio:.2f}, data dir "
              f"x{data_ratio:.2f} (goal: in proportion: {data_ratio / model_ratio:.2f} of it)", flush=True)
    per_model = {kind: last[kind] / max(last["models"], 1) for kind in KINDS}
    print("  bytes per model on the last day: " + ", ".join(f"{kind} {value:,.0f}" for kind, value in
                                                            per_model.items()), flush=True)
    if len(grown) >= 3:
        at_million = {kind: _fit(grown, kind)(1e6) for kind in KINDS}
        served_per_model = served / max(last["models"], 1)
        ratio = sum(at_million.values()) / (served_per_model * 1e6)
        print("  at 1 M models (each kind's bytes fitted as a + b x models over the growing days, retention "
              "steady): " + ", ".join(f"{kind} {value / 2**30:.1f} GiB" for kind, value in at_million.items())
              + f"; {sum(at_million.values()) / 2**30:.1f} GiB kept vs {served_per_model * 1e6 / 2**30:.1f} GiB of "
              f"served state (each current model's feature row and thumbnail, {served_per_model:,.0f} B here): "
              f"{ratio:.2f}x (goal <= 2x: {'met' if ratio <= 2 else 'NOT met'})", flush=True)


def _database(admin_url: str) -> str:
    """A fresh PostgreSQL database for the replay; its URL."""
    import uuid

    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"recsketch_months_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    admin.dispose()
    return url


def _vacuum(engine) -> None:  # type: ignore[no-untyped-def]
    """A plain VACUUM (ANALYZE), as autovacuum runs it: dead rows' space reusable, nothing shrunk."""
    from sqlalchemy import text

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM (ANALYZE)"))


def _database_bytes(engine) -> int:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())


def _drop(admin_url: str, url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


def _fit(history: list[dict], kind: str):  # type: ignore[no-untyped-def]
    """Least squares of bytes = a + b x models for one kind."""
    models = np.array([h["models"] for h in history], dtype=np.float64)
    values = np.array([h[kind] for h in history], dtype=np.float64)
    b, a = np.polyfit(models, values, 1) if np.ptp(models) > 0 else (values.mean() / max(models.mean(), 1), 0.0)
    return lambda n: max(0.0, a + b * n)


if __name__ == "__main__":
    main()
