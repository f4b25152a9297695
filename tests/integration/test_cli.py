"""The command line as a user runs it: serve-sketchfab + run + similar, as real processes.

The catalogue uses real rows of rec-a-sketch's model_urls.psv (32-hex and legacy ids,
names quoted with backslashes) with thumbnails made from real photos.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from recsketch.demo import load_photo, variant
from recsketch.psv import read_models, write_psv
from tests.catalogs import SAMPLE_CATALOGUE

RECSKETCH = [sys.executable, "-m", "recsketch.cli"]
PHOTOS = ("astronaut", "coffee", "rocket", "chelsea", "coins", "hubble_deep_field")


def build_real_id_catalog(folder: Path) -> dict[str, str]:
    rows = read_models(SAMPLE_CATALOGUE).rows
    legacy = [r for r in rows if len(r.mid) != 32][:4]
    quoted = [r for r in rows if "|" in r.name][:4]
    chosen = legacy + quoted + [r for r in rows[:200] if r not in legacy + quoted][: 4 * len(PHOTOS) - 8]
    rng = random.Random(1)
    (folder / "model_thumbs").mkdir(parents=True)
    groups = {}
    for index, row in enumerate(chosen):
        photo = PHOTOS[index % len(PHOTOS)]
        kind = ("photo", "crop", "mirror", "recolour")[index // len(PHOTOS) % 4]
        variant(load_photo(photo), kind, rng).save(folder / "model_thumbs" / f"{row.mid}_thumb200.jpg")
        groups[row.mid] = photo
    write_psv(folder / "model_urls.psv", ("name", "mid"), [(r.name, r.mid) for r in chosen])
    users = [f"u{n}" for n in range(12)]
    write_psv(folder / "model_likes_anon.psv", ("modelname", "mid", "uid"),
              [(r.name, r.mid, u) for r in chosen for u in rng.sample(users, 6)])
    return groups


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_run_similar_as_a_user_would(tmp_path: Path, pg_url: str) -> None:
    groups = build_real_id_catalog(tmp_path / "catalog")
    port = free_port()
    env = {**os.environ, "RECSKETCH_SKETCHFAB_URL": f"http://127.0.0.1:{port}",
           "RECSKETCH_DATA_DIR": str(tmp_path / "data"), "RECSKETCH_DATABASE_URL": pg_url}
    server = subprocess.Popen([*RECSKETCH, "serve-sketchfab", str(tmp_path / "catalog"), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(100):
            try:
                requests.get(f"http://127.0.0.1:{port}/v3/models?count=1", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        run = subprocess.run([*RECSKETCH, "run", "--top-k", "4"], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "crawl done" in run.stderr and "load:" in run.stderr  # progress on stderr
        assert json.loads(run.stdout.strip().splitlines()[-1])["models"] == len(groups)
    finally:
        server.terminate()
        server.wait(10)

    hits = 0
    for mid, group in groups.items():
        out = subprocess.run([*RECSKETCH, "similar", mid, "--json", "--top-k", "3"], env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        recs = json.loads(out.stdout)
        assert [list(r) for r in recs] == [["rank", "mid", "name", "score"]] * 3
        assert [r["rank"] for r in recs] == [1, 2, 3]
        assert recs[0]["score"] >= recs[1]["score"] >= recs[2]["score"]
        hits += groups[recs[0]["mid"]] == group
    assert hits >= 0.95 * len(groups)
    legacy = next(m for m in groups if len(m) != 32)
    names = {r["name"] for r in json.loads(subprocess.run(
        [*RECSKETCH, "similar", legacy, "--json"], env=env, capture_output=True, text=True).stdout)}
    assert len(names) == 4

    for bad in ("f" * 32, "../../etc/passwd", "x' OR '1'='1"):
        out = subprocess.run([*RECSKETCH, "similar", bad], env=env, capture_output=True, text=True)
        assert out.returncode == 2 and out.stdout == ""
        assert len(out.stderr.strip().splitlines()) == 1 and "model id" in out.stderr


def test_run_published_since_crawls_only_the_models_published_since(sketchfab, demo_catalog: Path,
                                                                     tmp_path: Path) -> None:
    """``recsketch run --published-since D``: the catalogue holds the models published since D,
    none before (the flag was once parsed and dropped, and every model was crawled)."""
    from sqlalchemy import select

    from recsketch.config import Settings
    from recsketch.db import store
    from recsketch.db.schema import models

    rows = read_models(demo_catalog / "model_urls.psv").rows
    since = sorted(row.published_at for row in rows)[len(rows) // 2]  # about half the demo's models are older
    newer = {row.mid for row in rows if row.published_at >= since}
    assert 0 < len(newer) < len(rows)
    env = {**os.environ, "RECSKETCH_SKETCHFAB_URL": sketchfab.url, "RECSKETCH_DATA_DIR": str(tmp_path / "data"),
           "RECSKETCH_RUNTIME": "torch"}
    run = subprocess.run([*RECSKETCH, "run", "--published-since", since.isoformat(), "--min-likes", "0",
                          "--top-k", "2"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    engine = store.connect(Settings(data_dir=tmp_path / "data").resolved_database_url)
    with engine.connect() as conn:
        stored = {row.mid for row in conn.execute(select(models.c.mid))}
    assert stored == newer


def test_a_reader_never_creates_a_db(tmp_path: Path) -> None:
    """``similar`` and ``show`` on a data dir the pipeline never wrote: one line that says where
    to look, exit 2, and no empty SQLite file left behind."""
    env = {**os.environ, "RECSKETCH_DATA_DIR": str(tmp_path / "data")}
    for argv in (["similar", "a" * 32], ["show"]):
        out = subprocess.run([*RECSKETCH, *argv], env=env, capture_output=True, text=True)
        assert out.returncode == 2 and "there is no such file" in out.stderr and "make demo" in out.stderr
        assert not (tmp_path / "data" / "recsketch.sqlite").exists()
