"""Issue 3: the crawl is complete under every fault mode, resumes after SIGKILL, and is safe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from recsketch.crawl import crawl, thumbnail_path
from recsketch.db import store
from recsketch.db.schema import likes, models
from recsketch.errors import BadInputError
from recsketch.sketchfab.client import SketchfabClient
from recsketch.sketchfab.server import Faults
from tests.catalogs import build_real_catalog

N_MODELS = 120


@pytest.fixture(scope="module")
def real_catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, set[str]]]:
    folder = tmp_path_factory.mktemp("real-catalog")
    return folder, build_real_catalog(folder, N_MODELS)


def assert_complete(engine, truth: dict[str, set[str]], settings) -> None:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        stored = {row.mid: row for row in conn.execute(select(models))}
        assert conn.execute(select(func.count()).select_from(likes)).scalar() == sum(map(len, truth.values()))
    assert set(stored) == set(truth)
    assert all(row.likes_complete for row in stored.values())
    by_model: dict[str, set[str]] = {}
    for mid, uid in store.read_likes(engine):
        by_model.setdefault(mid, set()).add(uid)
    assert {m: u for m, u in by_model.items()} == {m: u for m, u in truth.items() if u}
    for mid, row in stored.items():
        if row.thumbnail_status == "ok":
            assert thumbnail_path(settings, mid).stat().st_size > 0
        else:
            assert row.thumbnail_status == "missing", (mid, row.thumbnail_reason)


FAULT_MODES = {
    "429-retry-after": Faults(rate_429=0.3, retry_after=0.01),
    "429-no-header": Faults(rate_429=0.3),
    "5xx": Faults(rate_5xx=0.3),
    "truncated-bodies": Faults(rate_truncate=0.2),
    "malformed-json": Faults(rate_bad_json=0.2),
    "latency": Faults(latency_s=0.02),
    "everything": Faults(rate_429=0.1, retry_after=0.0, rate_5xx=0.1, rate_truncate=0.1, rate_bad_json=0.1,
                         latency_s=0.005),
}


@pytest.mark.parametrize("mode", FAULT_MODES)
def test_crawl_is_complete_under_each_fault_mode(mode, real_catalog, serve, settings_for) -> None:
    folder, truth = real_catalog
    faults = FAULT_MODES[mode]
    server = serve(folder, Faults(**{**faults.__dict__, "seed": 11}))
    settings = settings_for(server, crawl_workers=6)
    engine = store.connect(settings.resolved_database_url)
    client = SketchfabClient(server.url, retries=25, backoff_base=0.002, backoff_cap=0.05)
    stats = crawl(settings, engine, client)
    assert stats.models == N_MODELS and stats.likes_failed == 0 and not stats.thumbnails_failed
    assert_complete(engine, truth, settings)
    if mode != "latency":
        assert stats.http["retries"] > 0
    if mode.startswith("429"):
        assert stats.http["throttled_429"] > 0


def test_second_crawl_of_an_unchanged_catalogue_downloads_nothing(real_catalog, serve, settings_for) -> None:
    folder, truth = real_catalog
    server = serve(folder)
    settings = settings_for(server)
    engine = store.connect(settings.resolved_database_url)
    first = crawl(settings, engine, SketchfabClient(server.url))
    second = crawl(settings, engine, SketchfabClient(server.url))
    assert second.thumbnails_ok == 0 and second.thumbnails_skipped == first.thumbnails_ok
    assert_complete(engine, truth, settings)


def test_window_crawls_only_models_published_in_it(real_catalog, serve, settings_for) -> None:
    from datetime import UTC, datetime

    from recsketch.psv import read_models

    folder, _ = real_catalog
    since, before = datetime(2026, 11, 21, tzinfo=UTC), datetime(2026, 11, 22, tzinfo=UTC)
    expected = {r.mid for r in read_models(folder / "model_urls.psv").rows if since <= r.published_at < before}
    server = serve(folder)
    settings = settings_for(server)
    engine = store.connect(settings.resolved_database_url)
    stats = crawl(settings, engine, SketchfabClient(server.url), published_since=since, published_before=before)
    with engine.connect() as conn:
        assert set(conn.execute(select(models.c.mid)).scalars()) == expected
    assert stats.models == len(expected) > 10


def test_sigkill_mid_crawl_then_resume(real_catalog, serve, tmp_path: Path) -> None:
    folder, truth = real_catalog
    server = serve(folder, Faults(latency_s=0.03))
    env = {**os.environ, "RECSKETCH_SKETCHFAB_URL": server.url, "RECSKETCH_DATA_DIR": str(tmp_path / "data"),
           "RECSKETCH_CRAWL_WORKERS": "4"}
    command = [sys.executable, "-m", "recsketch.cli", "crawl", "--run-id", "r"]
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db_url = f"sqlite:///{tmp_path / 'data' / 'recsketch.sqlite'}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if (tmp_path / "data" / "recsketch.sqlite").exists():
            position = store.saved_crawl_position(store.connect(db_url), "*..*")
            if position and position[1] >= 2:
                break
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    engine = store.connect(db_url)
    pages_before_kill = store.saved_crawl_position(engine, "*..*")
    assert pages_before_kill is not None and 2 <= pages_before_kill[1] < 5  # killed mid-way
    thumbs = tmp_path / "data" / "thumbs"
    kept = {p.name: p.stat().st_mtime_ns for p in thumbs.glob("*.jpg")}
    assert kept

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads(done.stdout)
    assert stats["resumed_at_page"] == pages_before_kill[1] + 1
    assert stats["pages"] == 5 - pages_before_kill[1]  # only the pages left
    assert store.saved_crawl_position(engine, "*..*") is None  # finished
    from recsketch.config import Settings

    assert_complete(engine, truth, Settings(data_dir=tmp_path / "data"))
    # no thumbnail downloaded before the kill was downloaded again
    assert {p.name: p.stat().st_mtime_ns for p in thumbs.glob("*.jpg") if p.name in kept} == kept


def test_a_resumed_crawl_repairs_models_left_incomplete(real_catalog, serve, settings_for) -> None:
    from recsketch.errors import ApiError
    from recsketch.sketchfab.server import _encode_cursor

    folder, truth = real_catalog
    broken = serve(folder, Faults(rate_5xx=0.15, seed=5))
    settings = settings_for(broken)
    engine = store.connect(settings.resolved_database_url)
    failed_likes, attempts = 0, 0
    while True:  # no retries: pages fail, each new attempt resumes where the last one stopped
        attempts += 1
        try:
            failed_likes += crawl(settings, engine, SketchfabClient(broken.url, retries=0)).likes_failed
            break
        except ApiError:
            assert store.saved_crawl_position(engine, "*..*") is not None or attempts == 1
    with engine.connect() as conn:
        reasons = list(conn.execute(select(models.c.likes_reason).where(models.c.likes_complete.is_(False)))
                       .scalars())
    assert reasons and all("HTTP 503" in reason for reason in reasons)
    # a crawl resuming at the last page (as after a kill) must still finish the earlier pages' models
    healthy = serve(folder)
    last_page = f"{healthy.url}/v3/models?count=24&sort_by=createdAt&cursor={_encode_cursor(96)}"
    store.save_crawl_position(engine, "*..*", last_page, 4)
    settings = settings_for(healthy)
    resumed = crawl(settings, engine, SketchfabClient(healthy.url))
    assert resumed.resumed_at_page == 5 and resumed.pages == 1 and resumed.models == N_MODELS - 96
    assert resumed.models_repaired > 0
    assert_complete(engine, truth, settings)


def test_thumbnail_safety(real_catalog, serve) -> None:
    folder, _ = real_catalog
    server = serve(folder)
    client = SketchfabClient(server.url)
    mid = next(p.name for p in (folder / "model_thumbs").iterdir()).removesuffix("_thumb200.jpg")
    body, content_type = client.download(f"{server.url}/thumbs/{mid}_thumb200.jpg", 10**6)
    assert content_type == "image/jpeg" and body[:2] == b"\xff\xd8"
    with pytest.raises(BadInputError, match="above the 100 byte limit"):
        client.download(f"{server.url}/thumbs/{mid}_thumb200.jpg", 100)
    with pytest.raises(BadInputError, match=r"host 'example\.org' is not allowed"):
        client.download("https://example.org/x.jpg", 10**6)
    with pytest.raises(BadInputError, match="only http"):
        client.download("file:///etc/passwd", 10**6)
    allowed = SketchfabClient(server.url, thumbnail_hosts=("media.sketchfab.com",))
    port = server.server_address[1]
    assert allowed.thumbnail_origins == {("https", "media.sketchfab.com", 443), ("http", "127.0.0.1", port)}


def test_token_goes_in_the_header_and_never_into_logs(real_catalog, serve, settings_for, caplog,
                                                     tmp_path: Path) -> None:
    folder, _ = real_catalog
    server = serve(folder, Faults(rate_5xx=0.2, rate_429=0.1, seed=2))
    settings = settings_for(server, sketchfab_token="tok-SECRET-123", http_retries=0)
    from recsketch.errors import ApiError
    from recsketch.stages.crawl import crawl_stage

    caplog.set_level("DEBUG")
    try:
        crawl_stage(settings, tmp_path / "run")
    except ApiError as exc:
        assert "SECRET" not in str(exc)
    api = {auth for _, path, auth in server.arrivals if not path.startswith("/models/")}
    thumbnails = {auth for _, path, auth in server.arrivals if path.startswith("/models/")}
    assert api == {"Token tok-SECRET-123"} and thumbnails == {None}  # the token goes to the API only
    assert "SECRET" not in caplog.text and caplog.text  # debug logging was on, and clean
    assert "SECRET" not in repr(settings)
    stats = tmp_path / "run" / "crawl_stats.json"
    assert not stats.exists() or "SECRET" not in stats.read_text()
