"""Crawl stage: models, their likers and thumbnails from the Sketchfab API into the catalogue.

A crawl lists a publication window (a backfilled day) or the whole catalogue (daily and
manual runs), and spends requests only on what changed: a thumbnail is fetched when its URL
is new, a model's likers when the model is new, its listed ``likeCount`` changed, its last
fetch failed, or its stored likers are older than ``RECSKETCH_LIKES_MAX_AGE_DAYS``.

HTTP runs on a bounded thread pool; every DB write happens on the calling thread, so the
embedded SQLite DB sees one writer. A model whose likes or thumbnail fail is recorded with
the reason and the crawl goes on.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import select
from sqlalchemy.engine import Engine

from recsketch import storage
from recsketch.config import Settings
from recsketch.contracts import CrawlReport
from recsketch.db import store
from recsketch.db.schema import models as models_table
from recsketch.errors import RecsketchError
from recsketch.features.images import check_image, thumbnail_version
from recsketch.ids import is_model_id, validate_model_id
from recsketch.sketchfab.client import ModelInfo, SketchfabClient, parse_model
from recsketch.storage import Location
from recsketch.timestamps import parse_utc

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
    stopped_at_window_end: bool = False
    # why likers were fetched: new | incomplete | count_changed | stale; the rest were fresh
    likes_refreshed: Counter = field(default_factory=Counter)
    likes_fresh: int = 0
    likes_changed: int = 0  # models whose stored likers differ after this crawl (new ones included)
    likes_count_gaps: int = 0  # likers fetched far from the listed likeCount
    bad_model_entries: int = 0
    models_deleted: int = 0  # gone from a full listing and 404 on their own page: deleted with their likes
    deletions_unconfirmed: int = 0  # gone from the listing, but their page did not answer 404 (kept)
    deletions_refused: int = 0  # gone from the listing, too many to be real (RECSKETCH_MAX_DELETION_SHARE): kept
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
        data["likes_refreshed"] = dict(self.likes_refreshed)
        data["problems"] = self.problems[:100]
        data["problem_count"] = len(self.problems)
        return data


def thumbnail_path(settings: Settings, mid: str) -> Location:
    """Where a model's thumbnail lives; ``mid`` is validated first, so no path tricks."""
    return settings.thumbs_dir / f"{validate_model_id(mid, source='thumbnail')}.jpg"


class ThumbnailIndex:
    """Which URL each stored thumbnail came from: ``thumbs/index.tsv``, one line per download.

    A file is written before its model's page reaches the DB, so after a kill the DB may not
    know a thumbnail that is on disk; this index does, and the resumed crawl skips it. The
    index is append-only; a torn last line (killed mid-write) is ignored.

    An object store can't append: there the index is off, and a crawl killed mid-page
    downloads that page's thumbnails again (each is one whole PUT, never half an object).
    """

    def __init__(self, folder: Location) -> None:
        self.path = storage.local_path(folder / "index.tsv")
        self._lock = threading.Lock()
        self.urls: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                mid, _, url = line.partition("\t")
                if is_model_id(mid) and url.startswith(("http://", "https://")):
                    self.urls[mid] = url

    def add(self, mid: str, url: str) -> None:
        if self.path is None:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(f"{mid}\t{url}\n")
            self.urls[mid] = url

    def compact(self, keep: set[str]) -> int:
        """Rewrite the index (whole, atomically) with one line per model in ``keep`` (the
        catalogue's): replaced downloads and deleted models go; returns the lines dropped."""
        if self.path is None or not self.path.exists():
            return 0
        with self._lock:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
            self.urls = {mid: url for mid, url in self.urls.items() if mid in keep}
            if len(lines) == len(self.urls):
                return 0
            storage.write_text(self.path, "".join(f"{mid}\t{url}\n" for mid, url in sorted(self.urls.items())))
        return len(lines) - len(self.urls)

    def has(self, mid: str, url: str | None, path: Location) -> bool:
        return url is not None and self.urls.get(mid) == url and path.is_file()


def _fetch_thumbnail(client: SketchfabClient, settings: Settings, model: ModelInfo,
                     index: ThumbnailIndex) -> tuple[str, str]:
    """Download, verify and store one thumbnail: returns (status, reason or the file's version)."""
    assert model.thumbnail_url
    try:
        body, content_type = client.download(model.thumbnail_url, settings.max_thumbnail_bytes)
        if content_type and not content_type.startswith("image/"):
            return "failed", f"content type {content_type!r} is not an image"
        check_image(body, model.thumbnail_url)
    except RecsketchError as exc:
        return "failed", str(exc)
    storage.write_bytes(thumbnail_path(settings, model.mid), body)
    index.add(model.mid, model.thumbnail_url)
    return "ok", thumbnail_version(body)


def _crawl_model(client: SketchfabClient, settings: Settings, model: ModelInfo,
                 fetch_likers: bool, fetch_thumbnail: bool, index: ThumbnailIndex) -> dict:
    """All the HTTP work for one model (runs on a worker thread)."""
    result: dict = {"mid": model.mid}
    if fetch_likers:
        try:
            result["likers"] = set(client.likers(model.mid))
        except RecsketchError as exc:
            result["likes_error"] = str(exc)
    if model.thumbnail_url is None:
        result["thumbnail"] = ("missing", "the API lists no thumbnail")
    elif fetch_thumbnail:
        result["thumbnail"] = _fetch_thumbnail(client, settings, model, index)
    return result


def likes_gap(fetched: int, listed: int | None) -> bool:
    """Far fewer or more likers than the listing's ``likeCount``: worth a report (likes can
    arrive between the listing and the fetch, so a small difference is normal)."""
    return listed is not None and abs(fetched - listed) > max(5, listed // 10)


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
    run_dir: Location | None = None,
    progress: Callable[[str], None] = log.info,
    now: datetime | None = None,
    confirm_deletions: bool = False,
) -> CrawlStats:
    """Crawl the models published in [since, before) (all models when no window is given).

    The listing runs in creation order and stops at the first page that passes the window's
    end, so a past day costs its own models plus at most one page. After each page is stored,
    the next page's URL is saved, so a crawl killed mid-way goes on from the page it was on.
    Models of the window whose likes or thumbnail failed in an earlier crawl are retried at
    the end. ``now`` (default: the clock) dates the fetched likers. A whole listing that no
    longer shows more than RECSKETCH_MAX_DELETION_SHARE of the stored models deletes none of
    them unless ``confirm_deletions`` (an outage answering an empty listing looks like that).
    """
    started = time.monotonic()
    now = now or datetime.now(UTC)
    stats = CrawlStats()
    last_progress = started
    window = window_key(published_since, published_before)
    saved = store.saved_crawl_position(engine, window)
    if saved and parse_qs(urlsplit(saved[0]).query).get("sort_by") != ["createdAt"]:
        progress(f"crawl: the saved position of window {window} is in an older listing order; starting over")
        saved = None
    if saved:
        progress(f"crawl: resuming window {window} at page {saved[1] + 1}")
        stats.resumed_at_page = saved[1] + 1
    pages_done = saved[1] if saved else 0
    seen: set[str] = set()
    listed: set[str] = set()  # every uid the listing showed, parsable or not
    full_listing = published_since is None and published_before is None and not saved
    index = ThumbnailIndex(settings.thumbs_dir)

    def past_window(page: list) -> bool:
        return published_before is not None and any(_created_at(entry) >= published_before for entry in page)

    with ThreadPoolExecutor(settings.crawl_workers, thread_name_prefix="crawl") as pool:
        pages = _prefetched(client.model_pages(published_since=published_since,
                                               start_url=saved[0] if saved else None),
                            last=lambda item: past_window(item[0]))
        for page, next_url in pages:
            stats.pages += 1
            infos: list[ModelInfo] = []
            for entry in page:
                if isinstance(entry, dict) and isinstance(entry.get("uid"), str):
                    listed.add(entry["uid"])
                try:
                    info = parse_model(entry, client.thumbnail_min_side)
                except RecsketchError as exc:
                    stats.bad_model_entries += 1
                    stats.problems.append(str(exc))
                    log.warning("skipping model entry: %s", exc)
                    continue
                if info.published_at and ((published_before and info.published_at >= published_before)
                                          or (published_since and info.published_at < published_since)):
                    stats.models_outside_window += 1
                    continue
                infos.append(info)
            if infos:
                _store_page(settings, engine, client, pool, index, infos, stats, now)
                seen.update(info.mid for info in infos)
            pages_done += 1
            if past_window(page):
                stats.stopped_at_window_end, next_url = True, None
            store.save_crawl_position(engine, window, next_url, pages_done)
            current = time.monotonic()
            if current - last_progress >= PROGRESS_EVERY_S:
                last_progress = current
                progress(f"crawl: {stats.pages} pages, {stats.models} models, {stats.likes} likes, "
                         f"{stats.thumbnails_ok} thumbnails ({stats.models / (current - started):.1f} models/s)")
            if stats.stopped_at_window_end:
                break
        _repair(settings, engine, client, pool, index, published_since, published_before, seen, stats, now)
    if full_listing:  # a backfill or a resumed crawl saw part of the catalogue: it deletes nothing
        _delete_vanished(settings, engine, client, listed, stats, progress, confirm_deletions)
    stats.http = client.stats.as_dict()
    stats.duration_s = round(time.monotonic() - started, 3)
    refreshed = ", ".join(f"{reason}={n}" for reason, n in sorted(stats.likes_refreshed.items())) or "none"
    summary = (f"crawl done: {stats.pages} pages, {stats.models} models, {stats.likes} likes, "
               f"likers refetched ({refreshed}), fresh={stats.likes_fresh}, "
               f"thumbnails ok={stats.thumbnails_ok} skipped={stats.thumbnails_skipped} "
               f"missing={stats.thumbnails_missing} failed={sum(stats.thumbnails_failed.values())}, "
               f"likes failed={stats.likes_failed}, likeCount gaps={stats.likes_count_gaps}, "
               f"repaired={stats.models_repaired}, deleted={stats.models_deleted}, requests={stats.http['requests']}, "
               f"retries={stats.http['retries']}, 429s={stats.http['throttled_429']}, {stats.duration_s:.1f}s")
    progress(summary)
    if run_dir is not None:
        CrawlReport.write(run_dir, stats.as_dict())
    return stats


MIN_DELETIONS_ALLOWED = 10  # a small catalogue may always lose this many models in a day


def _delete_vanished(settings: Settings, engine: Engine, client: SketchfabClient, listed: set[str],
                     stats: CrawlStats, progress: Callable[[str], None], confirmed: bool = False) -> None:
    """Stored models that a whole listing no longer shows are asked for by their own page;
    those that answer 404 are deleted with their likes and their thumbnail file (by its exact
    key). Any other answer keeps the model. More of them than RECSKETCH_MAX_DELETION_SHARE of
    the catalogue (at least ``MIN_DELETIONS_ALLOWED``) deletes nothing unless ``confirmed``."""
    stored = store.stored_model_ids(engine)
    vanished = sorted(stored - listed)
    if not vanished:
        return
    allowed = max(MIN_DELETIONS_ALLOWED, settings.max_deletion_share * len(stored))
    if len(vanished) > allowed and not confirmed:
        stats.deletions_refused = len(vanished)
        message = (f"crawl: {len(vanished)} of the {len(stored)} stored models are no longer listed, more than "
                   f"RECSKETCH_MAX_DELETION_SHARE={settings.max_deletion_share} of the catalogue: NOTHING was "
                   "deleted (an outage or an API answering an empty listing looks like this). If Sketchfab really "
                   "deleted them, crawl again with --confirm-deletions (the DAG param confirm_deletions)")
        log.error("%s", message)
        stats.problems.append(message)
        progress(message)
        return
    gone = []
    for mid in vanished:
        try:
            if not client.model_exists(mid):
                gone.append(mid)
        except RecsketchError as exc:
            stats.deletions_unconfirmed += 1
            stats.problems.append(f"{mid}: not listed, and its page did not answer 404, so it is kept: {exc}")
    for mid in gone:  # before the rows: a kill between leaves rows that the next crawl deletes again
        thumbnail_path(settings, mid).unlink(missing_ok=True)
    stats.models_deleted = store.delete_models(engine, gone)
    progress(f"crawl: {len(vanished)} stored models are no longer listed: {stats.models_deleted} deleted "
             f"(their page answers 404), {len(vanished) - len(gone)} kept")


def _created_at(entry: object) -> datetime:
    """An entry's ``createdAt`` for the window-end check (unparsable: treated as inside)."""
    raw = entry.get("createdAt") if isinstance(entry, dict) else None
    try:
        return parse_utc(raw) if isinstance(raw, str) else datetime.min.replace(tzinfo=UTC)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


def _prefetched(pages: Iterator[T], last: Callable[[T], bool] = lambda _: False) -> Iterator[T]:
    """Fetch the next listing page on a thread while the caller works on the current one;
    nothing is fetched past a page for which ``last`` is true."""
    with ThreadPoolExecutor(1, thread_name_prefix="listing") as fetcher:
        upcoming = fetcher.submit(next, pages, None)
        while (page := upcoming.result()) is not None:
            if last(page):
                yield page
                return
            upcoming = fetcher.submit(next, pages, None)
            yield page


def _repair(settings: Settings, engine: Engine, client: SketchfabClient, pool: ThreadPoolExecutor,
            index: ThumbnailIndex, since: datetime | None, before: datetime | None, seen: set[str],
            stats: CrawlStats, now: datetime) -> None:
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
                       thumbnail_url=row["thumbnail_url"], created_at=row["created_at"]) for row in rows]
    log.info("crawl: retrying %d models left incomplete by an earlier crawl", len(infos))
    for start in range(0, len(infos), 24):
        _store_page(settings, engine, client, pool, index, infos[start : start + 24], stats, now)
    stats.models -= len(infos)
    stats.models_repaired += len(infos)


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands timestamps back without their zone; they were stored as UTC."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def refresh_age(mid: str, max_age: timedelta) -> timedelta:
    """The age at which this model's likers are refetched: between half the max age and the
    max age, fixed per model. A catalogue first crawled on one day then comes due over several
    days, not all on one; no likers ever get older than the max age."""
    spread = int(hashlib.sha1(mid.encode()).hexdigest()[:8], 16) / 0x1_0000_0000  # [0, 1)
    return max_age * (1 - spread / 2)


def likers_refresh_reason(stored: dict | None, info: ModelInfo, now: datetime, max_age: timedelta) -> str | None:
    """Why a model's likers must be fetched, or None when the stored ones are fresh."""
    if stored is None:
        return "new"
    if not stored["likes_complete"]:
        return "incomplete"
    if info.like_count is not None and stored["like_count"] != info.like_count:
        return "count_changed"
    fetched_at = _aware(stored["likes_fetched_at"])
    if fetched_at is None or now - fetched_at >= refresh_age(info.mid, max_age):
        return "stale"
    return None


def _store_page(settings: Settings, engine: Engine, client: SketchfabClient, pool: ThreadPoolExecutor,
                index: ThumbnailIndex, infos: list[ModelInfo], stats: CrawlStats, now: datetime) -> None:
    mids = [info.mid for info in infos]
    columns = [models_table.c[name] for name in ("mid", "thumbnail_url", "thumbnail_status", "like_count",
                                                 "likes_complete", "likes_fetched_at", "thumbnail_version")]
    with engine.connect() as conn:
        stored = {row["mid"]: dict(row) for row in
                  conn.execute(select(*columns).where(models_table.c.mid.in_(mids))).mappings()}
    max_age = timedelta(days=settings.likes_max_age_days)

    def is_current(info: ModelInfo) -> bool:
        row = stored.get(info.mid) or {}
        url, status = row.get("thumbnail_url"), row.get("thumbnail_status")
        path = thumbnail_path(settings, info.mid)
        if status == "ok" and url == info.thumbnail_url:
            # a local file is checked (a deleted one is fetched again); an object store is
            # trusted, not asked once per listed model every day
            local = storage.local_path(path)
            return local.is_file() if local is not None else bool(row.get("thumbnail_version"))
        return status != "failed" and index.has(info.mid, info.thumbnail_url, path)

    reasons = {info.mid: likers_refresh_reason(stored.get(info.mid), info, now, max_age) for info in infos}
    fetch = {info.mid: not is_current(info) for info in infos}
    results = list(pool.map(
        lambda i: _crawl_model(client, settings, i, reasons[i.mid] is not None, fetch[i.mid], index), infos))
    rows = []
    for info, result in zip(infos, results, strict=True):
        row = {
            "mid": info.mid, "name": info.name, "published_at": info.published_at, "created_at": info.created_at,
            "like_count": info.like_count, "viewer_url": info.viewer_url,
            "thumbnail_url": info.thumbnail_url, "crawled_at": now,
        }
        if "thumbnail" in result:
            status, detail = result["thumbnail"]  # detail: the file's version when ok, else the reason
            row["thumbnail_status"], row["thumbnail_reason"] = status, None if status == "ok" else detail
            if status == "ok":
                row["thumbnail_version"] = detail
                stats.thumbnails_ok += 1
            elif status == "missing":
                stats.thumbnails_missing += 1
            else:
                stats.thumbnails_failed[detail.split(":")[-1].strip()[:60]] += 1
                stats.problems.append(f"thumbnail of {info.mid}: {detail}")
                log.warning("thumbnail of %s: %s", info.mid, detail)
        else:
            stats.thumbnails_skipped += 1
            row["thumbnail_status"], row["thumbnail_reason"] = "ok", None
        refresh = reasons[info.mid]
        if refresh is None:
            stats.likes_fresh += 1
        else:
            stats.likes_refreshed[refresh] += 1
        if "likes_error" in result:
            row["likes_complete"], row["likes_reason"] = False, result["likes_error"]
            stats.likes_failed += 1
            stats.problems.append(f"likes of {info.mid}: {result['likes_error']}")
            log.warning("likes of %s: %s", info.mid, result["likes_error"])
        elif "likers" in result:  # like_count is written with the likers, in one transaction
            del row["like_count"]
            if likes_gap(len(result["likers"]), info.like_count):
                stats.likes_count_gaps += 1
                message = (f"likes of {info.mid}: {len(result['likers'])} likers fetched, "
                           f"likeCount says {info.like_count}")
                stats.problems.append(message)
                log.warning(message)
        rows.append(row)
    store.upsert_models(engine, rows)
    likers: dict[str, set[str]] = {result["mid"]: result["likers"] for result in results if "likers" in result}
    before = store.likers_of(engine, likers)
    stats.likes_changed += sum(before.get(mid, set()) != uids or stored.get(mid) is None
                               for mid, uids in likers.items())
    store.replace_likes(engine, likers, {info.mid: (info.like_count, now) for info in infos if info.mid in likers})
    stats.likes += sum(len(uids) for uids in likers.values())
    stats.models += len(infos)
