"""What every stage shares: the run's folder, progress, and the leftovers of killed processes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import pandas as pd

from recsketch.config import Settings
from recsketch.contracts import ChunkPlan, RunLikes
from recsketch.db import store
from recsketch.errors import RecsketchError
from recsketch.ids import run_folder_name
from recsketch.likes import threshold_likes
from recsketch.storage import Location, sweep_stale_temps

log = logging.getLogger("recsketch.stages")
Progress = Callable[[str], None]


def new_run_id() -> str:
    return "manual__" + datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def run_dir(settings: Settings, run_id: str) -> Location:
    """The run's folder; the run id is reduced to characters that are safe in a path or key."""
    path = settings.run_dir(run_folder_name(run_id))
    path.mkdir(parents=True, exist_ok=True)
    return path


def sweep(progress: Progress, *folders: Location) -> None:
    """Drop temp files a killed process left behind (their targets are intact)."""
    for folder in folders:
        if removed := sweep_stale_temps(folder):
            progress(f"removed {removed} temp files left by a killed process in {folder}")


def chunk_plan_if_any(folder: Location) -> ChunkPlan | None:
    """The run's chunk plan (absent when similarity runs on chunks made outside a plan)."""
    try:
        return ChunkPlan.read(folder)
    except RecsketchError:
        return None


def thresholded_likes(settings: Settings) -> pd.DataFrame:
    """The catalogue's likes now, thresholded as a run's are (RECSKETCH_MIN_LIKES)."""
    likes = store.read_likes_frame(store.connect(settings.resolved_database_url))
    return threshold_likes(likes, settings.min_likes).likes if settings.min_likes > 0 else likes


def run_likes(settings: Settings, folder: Location, progress: Progress) -> pd.DataFrame:
    """The likes the run was thresholded on (saved by threshold); for a run made before they were
    saved, the catalogue's likes thresholded again."""
    likes = RunLikes.read(folder)
    if likes is None:
        progress(f"{folder} has no saved likes (an older run): reading and thresholding the catalogue's likes")
        likes = thresholded_likes(settings)
    return likes
