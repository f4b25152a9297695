"""``recsketch import DIR``: a rec-a-sketch folder (docs/contracts.md §1) straight into the
catalogue DB and the thumbnail store, without HTTP.

What the crawler would have stored for the same catalogue: each model (name, dates, like
count), its likers (complete), and its thumbnail (checked, stored under the data dir, its
content hash as version). Bad rows, likes of models the folder does not list, and missing or
undecodable thumbnails are reported, each naming its input, and the rest is imported.
Rerunning it gives the same catalogue: models are upserted and each model's likers replaced.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from recsketch import files
from recsketch.config import Settings
from recsketch.crawl import thumbnail_path
from recsketch.db import store
from recsketch.errors import BadImageError, BadInputError
from recsketch.features.images import check_image, thumbnail_version
from recsketch.psv import read_likes, read_models

log = logging.getLogger(__name__)
BATCH_MODELS = 2_000  # models per transaction (with their likers)
T = TypeVar("T")


@dataclass
class ImportStats:
    models: int = 0
    likes: int = 0
    thumbnails_ok: int = 0
    thumbnails_missing: int = 0
    thumbnails_failed: int = 0
    duplicates: int = 0
    bad_rows: int = 0
    likes_of_unknown_models: int = 0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["problems"] = data["problems"][:20]  # the log has them all
        return data


def _batches(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _thumbnail(settings: Settings, folder: Path, mid: str) -> tuple[str, str | None]:
    """(status, version or reason) of the folder's thumbnail of ``mid``, stored when it is good."""
    source = folder / "model_thumbs" / f"{mid}_thumb200.jpg"
    try:
        body = source.read_bytes()
    except FileNotFoundError:
        return "missing", f"{source} does not exist"
    try:
        check_image(body, str(source))
    except BadImageError as exc:
        return "failed", str(exc)
    files.write_bytes(thumbnail_path(settings, mid), body)
    return "ok", thumbnail_version(body)


def import_folder(settings: Settings, folder: Path, progress: Callable[[str], None] = log.info) -> ImportStats:
    """Import ``folder``; raises BadInputError only when a file is missing or unreadable as a whole."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"{folder} is not a folder")
    engine = store.connect(settings.resolved_database_url)
    stats = ImportStats()
    models = read_models(folder / "model_urls.psv")
    likes = read_likes(folder / "model_likes_anon.psv")
    stats.duplicates = models.duplicates + likes.duplicates
    for problem in (*models.problems, *likes.problems):
        stats.bad_rows += 1
        stats.problems.append(problem)
        log.warning("%s", problem)
    known = {row.mid for row in models.rows}
    likers: dict[str, set[str]] = defaultdict(set)
    for like in likes.rows:
        if like.mid in known:
            likers[like.mid].add(like.uid)
        else:
            stats.likes_of_unknown_models += 1
    if stats.likes_of_unknown_models:
        message = (f"{folder / 'model_likes_anon.psv'}: {stats.likes_of_unknown_models} likes of models "
                   "that model_urls.psv does not list were left out")
        stats.problems.append(message)
        log.warning("%s", message)
    now = datetime.now(UTC)
    progress(f"import: {len(models.rows)} models, {sum(len(u) for u in likers.values())} likes from {folder}")
    with ThreadPoolExecutor(max(1, settings.crawl_workers), thread_name_prefix="import") as pool:
        for batch in _batches(models.rows, BATCH_MODELS):
            thumbnails = list(pool.map(lambda row: _thumbnail(settings, folder, row.mid), batch))
            rows = []
            for row, (status, detail) in zip(batch, thumbnails, strict=True):
                rows.append({
                    "mid": row.mid, "name": row.name, "published_at": row.published_at,
                    "created_at": row.published_at, "like_count": len(likers.get(row.mid, ())),
                    "viewer_url": f"https://sketchfab.com/3d-models/{row.mid}", "thumbnail_url": None,
                    "thumbnail_status": status, "thumbnail_reason": None if status == "ok" else detail,
                    "thumbnail_version": detail if status == "ok" else None, "crawled_at": now,
                })
                if status == "ok":
                    stats.thumbnails_ok += 1
                elif status == "missing":
                    stats.thumbnails_missing += 1
                else:
                    stats.thumbnails_failed += 1
                    stats.problems.append(f"thumbnail of {row.mid}: {detail}")
                    log.warning("thumbnail of %s: %s", row.mid, detail)
            store.upsert_models(engine, rows)
            batch_likers = {row.mid: likers.get(row.mid, set()) for row in batch}
            store.replace_likes(engine, batch_likers, {mid: (len(uids), now) for mid, uids in batch_likers.items()})
            stats.models += len(batch)
            stats.likes += sum(len(uids) for uids in batch_likers.values())
            progress(f"import: {stats.models}/{len(models.rows)} models, {stats.likes} likes, "
                     f"{stats.thumbnails_ok} thumbnails")
    progress(f"import done: {stats.models} models, {stats.likes} likes, thumbnails ok={stats.thumbnails_ok} "
             f"missing={stats.thumbnails_missing} failed={stats.thumbnails_failed}, {stats.bad_rows} bad rows, "
             f"{stats.duplicates} duplicates dropped")
    return stats
