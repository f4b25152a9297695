"""Crawl stage: models, their likers and thumbnails from the Sketchfab API into the catalogue.

HTTP runs on a bounded thread pool; every DB write happens on the calling thread, so the
embedded SQLite DB sees one writer. A model whose likes or thumbnail fail is recorded with
the reason and the crawl goes on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.engine import Engine

from recsketch import files
from recsketch.config import Settings
from recsketch.db import store
from recsketch.db.schema import models as models_table
from recsketch.errors import RecsketchError
from recsketch.features.images import check_image
from recsketch.ids import is_model_id, validate_model_id
from recsketch.sketchfab.client import ModelInfo, SketchfabClient, parse_model

log = logging.getLogger(__name__)
T = TypeVar("T")

PROGRESS_EVERY_S = 10.0


@dataclass
class CrawlStats:
    pages: int = 0
    models: int = 0
    models_outside_window: int = 0
    models_repaired: int = 0
    resumed_at_page: int = 0
    bad_model_entries: int = 0
    likes: int = 0
    likes_failed: int = 0
    thumbnails_ok: int = 0
    thumbnails_skipped: int = 0
    thumbnails_missing: int = 0
    thumbnails_failed: Counter = field(default_factory=Counter)
    http: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def as_dict(self) -> dict:
        data = asdict(self)
        data["thumbnails_failed"] = dict(self.thumbnails_failed)
        data["problems"] = self.problems[:100]
        data["problem_count"] = len(self.problems)
        return data


def thumbnail_path(settings: Settings, mid: str) -> Path:
    """Where a model's thumbnail lives; ``mid`` is validated first, so no path tricks."""
    return settings.thumbs_dir / f"{validate_model_id(mid, source='thumbnail')}.jpg"


class ThumbnailIndex:
    """Which URL each stored thumbnail came from: ``thumbs/index.tsv``, one line per download.

    A file is written before its model's page reaches the DB, so after a kill the DB may not
    know a thumbnail that is on disk; this index does, and the resumed crawl skips it. The
    index is append-only; a torn last line (killed mid-write) is ignored.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / "index.tsv"
        self._lock = threading.Lock()
        self.urls: dict[str, str] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                mid, _, url = line.partition("\t")
                if is_model_id(mid) and url.startswith(("http://", "https://")):
                    self.urls[mid] = url

    def add(self, mid: str, url: str) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(f"{mid}\t{url}\n")
            self.urls[mid] = url

    def has(self, mid: str, url: str | None, path: Path) -> bool:
        return url is not None and self.urls.get(mid) == url and path.is_file()


def _fetch_thumbnail(client: SketchfabClient, settings: Settings, model: ModelInfo,
                     index: ThumbnailIndex) -> tuple[str, str]:
    """Download, verify and store one thumbnail: returns (status, reason)."""
    assert model.thumbnail_url
    try:
        body, content_type = client.download(model.thumbnail_url, settings.max_thumbnail_bytes)
        if content_type and not content_type.startswith("image/"):
            return "failed", f"content type {content_type!r} is not an image"
        check_image(body, model.thumbnail_url)
    except RecsketchError as exc:
        return "failed", str(exc)
    files.write_bytes(thumbnail_path(settings, model.mid), body)
    index.add(model.mid, model.thumbnail_url)
    return "ok", ""


def _crawl_model(client: SketchfabClient, settings: Settings, model: ModelInfo,
                 fetch_thumbnail: bool, index: ThumbnailIndex) -> dict:
    """All the HTTP work for one model (runs on a worker thread)."""
    result: dict = {"mid": model.mid}
    try:
        result["likers"] = client.likers(model.mid)
    except RecsketchError as exc:
        result["likes_error"] = str(exc)
    if model.thumbnail_url is None:
        result["thumbnail"] = ("missing", "the API lists no thumbnail")
    elif fetch_thumbnail:
        result["thumbnail"] = _fetch_thumbnail(client, settings, model, index)
    return result


def window_key(published_since: datetime | None, published_before: datetime | None) -> str:
    """Names a publication window; the resume position is kept per window."""
    def fmt(moment: datetime | None) -> str:
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else "*"

    return f"{fmt(published_since)}..{fmt(published_before)}"


def crawl(
    settings: Settings,
    engine: Engine,
    client: SketchfabClient,
    *,
    published_since: datetime | None = None,
    published_before: datetime | None = None,
    run_dir: Path | None = None,
    progress: Callable[[str], None] = log.info,
) -> CrawlStats:
    """Crawl the models published in [since, before) (all models when no window is given).

    After each page is stored, the next page's URL is saved, so a crawl killed mid-way goes
    on from the page it was on. Models of the window whose likes or thumbnail failed in an
    earlier crawl are retried at the end.
    """
    started = time.monotonic()
    stats = CrawlStats()
    last_progress = started
    window = window_key(published_since, published_before)
    saved = store.saved_crawl_position(engine, window)
    if saved:
        progress(f"crawl: resuming window {window} at page {saved[1] + 1}")
        stats.resumed_at_page = saved[1] + 1
    pages_done = saved[1] if saved else 0
    seen: set[str] = set()
    index = ThumbnailIndex(settings.thumbs_dir)
    with ThreadPoolExecutor(settings.crawl_workers, thread_name_prefix="crawl") as pool:
        pages = _prefetched(client.model_pages(published_since=published_since,
                                               start_url=saved[0] if saved else None))
        for page, next_url in pages:
            stats.pages += 1
            infos: list[ModelInfo] = []
            for entry in page:
                try:
                    info = parse_model(entry)
                except RecsketchError as exc:
                    stats.bad_model_entries += 1
                    stats.problems.append(str(exc))
                    log.warning("skipping model entry: %s", exc)
                    continue
                if published_before and info.published_at and info.published_at >= published_before:
                    stats.models_outside_window += 1
                    continue
                infos.append(info)
            if infos:
                _store_page(settings, engine, client, pool, index, infos, stats)
                seen.update(info.mid for info in infos)
            pages_done += 1
            store.save_crawl_position(engine, window, next_url, pages_done)
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY_S:
                last_progress = now
                progress(f"crawl: {stats.pages} pages, {stats.models} models, {stats.likes} likes, "
                         f"{stats.thumbnails_ok} thumbnails ({stats.models / (now - started):.1f} models/s)")
        _repair(settings, engine, client, pool, index, published_since, published_before, seen, stats)
    stats.http = client.stats.as_dict()
    stats.duration_s = round(time.monotonic() - started, 3)
    summary = (f"crawl done: {stats.pages} pages, {stats.models} models, {stats.likes} likes, "
               f"thumbnails ok={stats.thumbnails_ok} skipped={stats.thumbnails_skipped} "
               f"missing={stats.thumbnails_missing} failed={sum(stats.thumbnails_failed.values())}, "
               f"likes failed={stats.likes_failed}, repaired={stats.models_repaired}, "
               f"retries={stats.http['retries']}, 429s={stats.http['throttled_429']}, {stats.duration_s:.1f}s")
    progress(summary)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        files.write_text(run_dir / "crawl_stats.json", json.dumps(stats.as_dict(), indent=2, default=str))
    return stats


def _prefetched(pages: Iterator[T]) -> Iterator[T]:
    """Fetch the next listing page on a thread while the caller works on the current one."""
    with ThreadPoolExecutor(1, thread_name_prefix="listing") as fetcher:
        upcoming = fetcher.submit(next, pages, None)
        while (page := upcoming.result()) is not None:
            upcoming = fetcher.submit(next, pages, None)
            yield page


def _repair(settings: Settings, engine: Engine, client: SketchfabClient, pool: ThreadPoolExecutor,
            index: ThumbnailIndex, since: datetime | None, before: datetime | None, seen: set[str],
            stats: CrawlStats) -> None:
    """Retry the window's models whose likes or thumbnail failed before and were not seen now."""
    query = select(models_table).where(
        (models_table.c.likes_complete.is_(False)) | (models_table.c.thumbnail_status == "failed"))
    if since is not None:
        query = query.where(models_table.c.published_at >= since)
    if before is not None:
        query = query.where(models_table.c.published_at < before)
    with engine.connect() as conn:
        rows = [row for row in conn.execute(query).mappings() if row["mid"] not in seen]
    if not rows:
        return
    infos = [ModelInfo(mid=row["mid"], name=row["name"], published_at=row["published_at"],
                       like_count=row["like_count"], viewer_url=row["viewer_url"],
                       thumbnail_url=row["thumbnail_url"]) for row in rows]
    log.info("crawl: retrying %d models left incomplete by an earlier crawl", len(infos))
    for start in range(0, len(infos), 24):
        _store_page(settings, engine, client, pool, index, infos[start : start + 24], stats)
    stats.models -= len(infos)
    stats.models_repaired += len(infos)


def _store_page(settings: Settings, engine: Engine, client: SketchfabClient, pool: ThreadPoolExecutor,
                index: ThumbnailIndex, infos: list[ModelInfo], stats: CrawlStats) -> None:
    mids = [info.mid for info in infos]
    with engine.connect() as conn:
        stored = {
            mid: (url, status)
            for mid, url, status in conn.execute(
                select(models_table.c.mid, models_table.c.thumbnail_url,
                       models_table.c.thumbnail_status).where(models_table.c.mid.in_(mids))
            )
        }
    now = datetime.now(UTC)

    def is_current(info: ModelInfo) -> bool:
        url, status = stored.get(info.mid, (None, None))
        path = thumbnail_path(settings, info.mid)
        if status == "ok" and url == info.thumbnail_url and path.is_file():
            return True
        return status != "failed" and index.has(info.mid, info.thumbnail_url, path)

    fetch = {info.mid: not is_current(info) for info in infos}
    results = list(pool.map(lambda i: _crawl_model(client, settings, i, fetch[i.mid], index), infos))
    rows = []
    for info, result in zip(infos, results, strict=True):
        row = {
            "mid": info.mid, "name": info.name, "published_at": info.published_at,
            "like_count": info.like_count, "viewer_url": info.viewer_url,
            "thumbnail_url": info.thumbnail_url, "crawled_at": now,
        }
        if "thumbnail" in result:
            status, reason = result["thumbnail"]
            row["thumbnail_status"], row["thumbnail_reason"] = status, reason or None
            if status == "ok":
                stats.thumbnails_ok += 1
            elif status == "missing":
                stats.thumbnails_missing += 1
            else:
                stats.thumbnails_failed[reason.split(":")[-1].strip()[:60]] += 1
                stats.problems.append(f"thumbnail of {info.mid}: {reason}")
                log.warning("thumbnail of %s: %s", info.mid, reason)
        else:
            stats.thumbnails_skipped += 1
            row["thumbnail_status"], row["thumbnail_reason"] = "ok", None
        if "likes_error" in result:
            row["likes_complete"], row["likes_reason"] = False, result["likes_error"]
            stats.likes_failed += 1
            stats.problems.append(f"likes of {info.mid}: {result['likes_error']}")
            log.warning("likes of %s: %s", info.mid, result["likes_error"])
        rows.append(row)
    store.upsert_models(engine, rows)
    likers = {result["mid"]: set(result["likers"]) for result in results if "likers" in result}
    store.replace_likes(engine, likers)
    stats.likes += sum(len(uids) for uids in likers.values())
    stats.models += len(infos)
