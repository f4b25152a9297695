"""Deletions (DESIGN §7): a model that a full listing no longer shows and whose page answers 404
is deleted with its likes and served nowhere by the next run; a 503 on its page, or a backfill,
deletes nothing."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from recsketch.config import Settings
from recsketch.db import store
from recsketch.db.schema import likes, recommendations
from recsketch.sketchfab.server import Catalog, Faults, start_in_thread
from recsketch.stages import run_pipeline
from recsketch.stages.common import run_dir
from recsketch.stages.crawl import crawl_stage


def _served(engine) -> set[tuple[str, str]]:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        rows = conn.execute(select(recommendations.c.mid, recommendations.c.similar_mid))
        return {(row.mid, row.similar_mid) for row in rows}


def test_a_deleted_model_is_served_nowhere_and_nothing_else_is_deleted(demo_catalog: Path, demo_groups: dict[str, str],
                                                                       tmp_path: Path) -> None:
    catalog = Catalog(demo_catalog)
    server = start_in_thread(catalog)
    try:
        settings = Settings(data_dir=tmp_path / "data", sketchfab_url=server.url, runtime="torch", top_k=3,
                            http_retries=1)
        run_pipeline(settings, "day-1", progress=lambda _: None)
        engine = store.connect(settings.resolved_database_url)
        before = _served(engine)
        group = sorted(demo_groups.items(), key=lambda item: (item[1], item[0]))
        victim, unsure, backfilled = group[0][0], group[4][0], group[8][0]
        assert any(similar == victim for mid, similar in before if mid != victim)  # in others' lists too

        catalog.remove(victim)  # deleted from Sketchfab: not listed, its page 404
        catalog.models = [m for m in catalog.models if m.mid != unsure]  # not listed, but its page fails
        server.faults = Faults(unavailable_paths=frozenset({f"/v3/models/{unsure}"}))
        day2 = run_pipeline(settings, "day-2", progress=lambda _: None)
        assert day2["crawl"]["models_deleted"] == 1 and day2["crawl"]["deletions_unconfirmed"] == 1
        assert "1 gone" in day2["similarity"]["mode"]  # worked forward, not a full pass
        after = _served(engine)
        assert not [pair for pair in after if victim in pair]  # neither its list nor anyone else's
        assert any(mid == unsure for mid, _ in after)  # a transient error is not a deletion
        stored = store.stored_model_ids(engine)
        assert victim not in stored and unsure in stored
        assert not (settings.thumbs_dir / f"{victim}.jpg").exists()  # its thumbnail file goes with it
        assert (settings.thumbs_dir / f"{unsure}.jpg").exists()
        with engine.connect() as conn:
            assert not conn.execute(select(likes.c.uid).where(likes.c.mid == victim)).first()

        catalog.remove(backfilled)
        since = min(m.published_at for m in catalog.models)
        stats = crawl_stage(settings, run_dir(settings, "backfill"), published_since=since,
                            progress=lambda _: None)
        assert stats["models_deleted"] == 0 and backfilled in store.stored_model_ids(engine)  # a backfill lists part
    finally:
        server.shutdown()
        server.server_close()


def test_an_outage_that_lists_nothing_deletes_nothing_until_an_operator_confirms(demo_catalog: Path,
                                                                                 tmp_path: Path) -> None:
    """Issue 37: an API answering an empty listing and 404s (one POST /_clock did it) deleted the
    whole catalogue. More than RECSKETCH_MAX_DELETION_SHARE gone in one crawl deletes nothing
    and says so; --confirm-deletions (the DAG param confirm_deletions) deletes them."""
    catalog = Catalog(demo_catalog)
    server = start_in_thread(catalog)
    try:
        settings = Settings(data_dir=tmp_path / "data", sketchfab_url=server.url, http_retries=1)
        crawl_stage(settings, run_dir(settings, "day-1"), progress=lambda _: None)
        engine = store.connect(settings.resolved_database_url)
        before = store.stored_model_ids(engine)
        gone = sorted(before)[:20]  # 20 of ~75: past 5 % and past the 10 always allowed
        for mid in gone:
            catalog.remove(mid)
        lines: list[str] = []
        stats = crawl_stage(settings, run_dir(settings, "day-2"), progress=lines.append)
        assert stats["models_deleted"] == 0 and stats["deletions_refused"] == 20
        assert store.stored_model_ids(engine) == before
        assert any("NOTHING was deleted" in line and "--confirm-deletions" in line for line in lines), lines
        stats = crawl_stage(settings, run_dir(settings, "day-3"), progress=lambda _: None, confirm_deletions=True)
        assert stats["models_deleted"] == 20 and store.stored_model_ids(engine) == before - set(gone)
    finally:
        server.shutdown()
        server.server_close()
