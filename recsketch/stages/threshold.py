"""Stage 2: the like threshold, repeated until stable: the run's item set and its likes."""

from __future__ import annotations

import pandas as pd

from recsketch import retention
from recsketch.config import Settings
from recsketch.contracts import RunLikes, ValidModels
from recsketch.crawl import thumbnail_path
from recsketch.db import store
from recsketch.errors import RecsketchError
from recsketch.features.images import thumbnail_version
from recsketch.likes import threshold_likes
from recsketch.stages.common import Progress, log
from recsketch.storage import Location


def threshold_stage(settings: Settings, folder: Location, progress: Progress = log.info) -> dict:
    """Models that survive the like threshold and have a thumbnail: the run's item set, each
    with its thumbnail's version (features are keyed by it); and the surviving likes, which
    evaluate and plan_hybrid use."""
    retention.register(store.connect(settings.resolved_database_url), folder.name, retention.Kind.RECOMMENDATIONS)
    valid, with_thumbnail, likes = valid_models(settings, progress)
    if len(valid) < 2:
        raise RecsketchError(
            f"only {len(valid)} of {with_thumbnail} models with a thumbnail have >= {settings.min_likes} "
            "likes from users with as many: nothing to recommend. Lower the threshold with --min-likes "
            "(RECSKETCH_MIN_LIKES; 0 keeps every model)")
    RunLikes.write(folder, likes)
    ValidModels(valid).write(folder)
    return {"valid_models": len(valid), "with_thumbnail": with_thumbnail, "likes": len(likes)}


def valid_models(settings: Settings, progress: Progress = log.info) -> tuple[dict[str, str], int, pd.DataFrame]:
    """(mid -> thumbnail version of every model that passes the threshold and has a thumbnail,
    how many models have a thumbnail, the likes that survive the threshold)."""
    engine = store.connect(settings.resolved_database_url)
    with_thumbnail = store.models_with_thumbnails(engine)
    likes = store.read_likes_frame(engine)
    if settings.min_likes > 0:
        result = threshold_likes(likes, settings.min_likes)
        progress(result.summary())
        likes = result.likes
        kept = set(result.models)
        valid = [mid for mid in with_thumbnail if mid in kept]
    else:
        progress("threshold: min_likes=0, keeping every model with a thumbnail")
        valid = list(with_thumbnail)
    progress(f"threshold: {len(valid)} models pass the threshold and have a thumbnail")
    return {mid: with_thumbnail[mid] or _file_version(settings, mid) for mid in valid}, len(with_thumbnail), likes


def _file_version(settings: Settings, mid: str) -> str:
    """The version of a thumbnail the DB has none for (stored by an older release)."""
    try:
        return thumbnail_version(thumbnail_path(settings, mid).read_bytes())
    except FileNotFoundError:
        return ""
