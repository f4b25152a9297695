"""Stage 1: the Sketchfab API into the catalogue DB and the thumbnail store."""

from __future__ import annotations

from datetime import datetime

from recsketch import retention
from recsketch.config import INPUT_SIZE, Settings
from recsketch.crawl import crawl
from recsketch.db import store
from recsketch.ratelimit import SharedRateLimiter
from recsketch.sketchfab.client import SketchfabClient
from recsketch.stages.common import Progress, log, sweep
from recsketch.storage import Location


def crawl_stage(settings: Settings, folder: Location, *, published_since: datetime | None = None,
                published_before: datetime | None = None, progress: Progress = log.info,
                now: datetime | None = None, confirm_deletions: bool = False) -> dict:
    """Crawl the API within the deployment's one request budget (RECSKETCH_RATE_LIMIT, shared
    through the catalogue DB by every worker); ``published_since``/``before`` bound the models
    listed (a backfill's day). Returns the crawl's statistics, without the problem list."""
    engine = store.connect(settings.resolved_database_url)
    retention.register(engine, folder.name, retention.Kind.CRAWL)
    sweep(progress, settings.thumbs_dir, folder)
    rate = settings.effective_rate_limit
    client = SketchfabClient(settings.sketchfab_url, settings.likes_base_url, settings.sketchfab_token,
                             retries=settings.http_retries, pool_size=settings.crawl_workers * 2,
                             retry_after_max=settings.retry_after_max_s,
                             limiter=SharedRateLimiter(engine, rate) if rate else None,
                             thumbnail_hosts=settings.allowed_thumbnail_hosts,
                             thumbnail_min_side=INPUT_SIZE,
                             allow_private_addresses=settings.allow_private_addresses)
    try:
        stats = crawl(settings, engine, client, published_since=published_since,
                      published_before=published_before, run_dir=folder, progress=progress, now=now,
                      confirm_deletions=confirm_deletions)
    finally:
        client.close()
    return {k: v for k, v in stats.as_dict().items() if k != "problems"}
