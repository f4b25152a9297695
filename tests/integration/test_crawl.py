"""Crawl over real HTTP into SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import func, select

from recsketch.crawl import crawl, thumbnail_path
from recsketch.db import store
from recsketch.db.schema import likes, models
from recsketch.sketchfab.client import SketchfabClient


def _client(server) -> SketchfabClient:  # type: ignore[no-untyped-def]
    return SketchfabClient(server.url, retries=3, backoff_base=0.01)


def test_crawl_stores_models_likes_and_thumbnails(db_url, sketchfab, settings_for, demo_groups, tmp_path) -> None:
    settings = settings_for(sketchfab, database_url=db_url)
    engine = store.connect(db_url)
    stats = crawl(settings, engine, _client(sketchfab), run_dir=tmp_path / "run")
    total = len(demo_groups) + 4
    assert stats.models == total and stats.pages == 4
    assert stats.thumbnails_ok == total - 1 and stats.thumbnails_missing == 1
    assert (tmp_path / "run" / "crawl_stats.json").exists()
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(models)).scalar() == total
        # 60 taste-model users x 10 likes, the model without thumbnail's 10, 3 sparse models' 2 each,
        # the duplicate row counted once
        assert conn.execute(select(func.count()).select_from(likes)).scalar() == 60 * 10 + 10 + 3 * 2
        missing = conn.execute(select(models.c.name, models.c.thumbnail_reason)
                               .where(models.c.thumbnail_status == "missing")).one()
    assert missing.name == "Model without a thumbnail" and "no thumbnail" in missing.thumbnail_reason
    for mid in demo_groups:
        assert thumbnail_path(settings, mid).stat().st_size > 1000


def test_second_crawl_downloads_nothing_and_duplicates_nothing(sketchfab, settings_for, tmp_path) -> None:
    settings = settings_for(sketchfab)
    engine = store.connect(settings.resolved_database_url)
    first = crawl(settings, engine, _client(sketchfab))
    before = {p.name: p.stat().st_mtime_ns for p in settings.thumbs_dir.iterdir()}
    client = _client(sketchfab)
    second = crawl(settings, engine, client)
    assert second.thumbnails_ok == 0 and second.thumbnails_skipped == first.thumbnails_ok
    assert {p.name: p.stat().st_mtime_ns for p in settings.thumbs_dir.iterdir()} == before
    # nothing changed: the 4 model pages, no thumbnail and no likers refetched
    assert client.stats.requests == 4
    assert second.likes_fresh == first.models and not second.likes_refreshed and second.likes_changed == 0
    assert len(store.read_likes(engine)) == first.likes


def test_bad_thumbnail_is_recorded_and_the_crawl_goes_on(serve, demo_catalog, settings_for, tmp_path) -> None:
    folder = tmp_path / "catalog"
    shutil.copytree(demo_catalog, folder)
    victim = sorted((folder / "model_thumbs").iterdir())[0]
    victim.write_bytes(b"<html>not a jpeg</html>")
    server = serve(folder)
    settings = settings_for(server)
    engine = store.connect(settings.resolved_database_url)
    stats = crawl(settings, engine, _client(server))
    mid = victim.name.removesuffix("_thumb200.jpg")
    assert sum(stats.thumbnails_failed.values()) == 1
    assert stats.thumbnails_ok == stats.models - 2
    with engine.connect() as conn:
        row = conn.execute(select(models.c.thumbnail_status, models.c.thumbnail_reason)
                           .where(models.c.mid == mid)).one()
    assert row.thumbnail_status == "failed" and "not a decodable image" in row.thumbnail_reason
    assert not thumbnail_path(settings, mid).exists()
    assert any(mid in problem for problem in stats.problems)


def test_malformed_catalogue_rows_do_not_stop_the_server(tmp_path: Path, serve, settings_for) -> None:
    folder = tmp_path / "catalog"
    (folder / "model_thumbs").mkdir(parents=True)
    (folder / "model_urls.psv").write_text(f"name|mid\ngood|{'a' * 32}\nbroken line without separator\n"
                                           f"bad id|../../etc\n")
    server = serve(folder)
    assert [m.mid for m in server.catalog.models] == ["a" * 32]
    assert len(server.catalog.problems) == 2
    settings = settings_for(server, min_likes=0)
    stats = crawl(settings, store.connect(settings.resolved_database_url), _client(server))
    assert stats.models == 1 and stats.thumbnails_missing == 1


def test_a_catalogue_without_enough_likes_gets_a_clear_error(tmp_path: Path, serve, settings_for) -> None:
    import pytest

    from recsketch.errors import RecsketchError
    from recsketch.stages.common import run_dir
    from recsketch.stages.crawl import crawl_stage
    from recsketch.stages.threshold import threshold_stage

    folder = tmp_path / "catalog"
    (folder / "model_thumbs").mkdir(parents=True)
    from PIL import Image

    mids = ["a" * 32, "b" * 32, "c" * 32]
    for mid in mids:
        Image.new("RGB", (200, 200), "red").save(folder / "model_thumbs" / f"{mid}_thumb200.jpg")
    (folder / "model_urls.psv").write_text("name|mid\n" + "".join(f"m|{mid}\n" for mid in mids))
    server = serve(folder)
    settings = settings_for(server)
    run = run_dir(settings, "r1")
    crawl_stage(settings, run)
    with pytest.raises(RecsketchError, match=r"only 0 of 3 models .* --min-likes"):
        threshold_stage(settings, run)
    assert threshold_stage(settings_for(server, min_likes=0), run)["valid_models"] == 3
