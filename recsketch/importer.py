"""``recsketch import DIR``: a rec-a-sketch folder (docs/contracts.md §1) straight into the
catalogue DB and the thumbnail store, without HTTP.

What the crawler would have stored for the same catalogue: each model (name, dates, like
count), its likers (complete), and its thumbnail (checked, stored under the data dir, its
content hash as version). Bad rows, likes of models the folder does not list, and missing or
undecodable thumbnails are reported, each naming its input, and the rest is imported.
Rerunning it gives the same catalogue: models are upserted and each model's likers replaced.

Likes are streamed: the file is parsed row by row into a temporary table of the catalogue DB
(COPY on PostgreSQL), in blocks, and deduplicated, matched to the folder's models and swapped
in by SQL in one transaction, so memory holds one block whatever the file's size (tens of
millions of likes), never a Python object per like.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, text

from recsketch import storage
from recsketch.config import Settings
from recsketch.crawl import thumbnail_path
from recsketch.db import store
from recsketch.errors import BadImageError, BadInputError
from recsketch.features.images import check_image, thumbnail_version
from recsketch.psv import iter_likes, read_models

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
    storage.write_bytes(thumbnail_path(settings, mid), body)
    return "ok", thumbnail_version(body)


def import_folder(settings: Settings, folder: Path, progress: Callable[[str], None] = log.info) -> ImportStats:
    """Import ``folder`` in one transaction: a failure leaves the catalogue as it was. Raises
    BadInputError only when a file is missing or unreadable as a whole; a bad row costs that row."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"{folder} is not a folder")
    engine = store.connect(settings.resolved_database_url)
    stats = ImportStats()
    models = read_models(folder / "model_urls.psv")
    if not (folder / "model_likes_anon.psv").is_file():
        raise BadInputError(f"{folder / 'model_likes_anon.psv'}: file not found")
    stats.duplicates = models.duplicates
    for problem in models.problems:
        _bad_row(stats, problem)
    now = datetime.now(UTC)
    progress(f"import: {len(models.rows)} models from {folder}; thumbnails, then likes (one transaction)")
    with engine.begin() as conn, ThreadPoolExecutor(max(1, settings.crawl_workers),
                                                    thread_name_prefix="import") as pool:
        for batch in _batches(models.rows, BATCH_MODELS):
            thumbnails = list(pool.map(lambda row: _thumbnail(settings, folder, row.mid), batch))
            rows = []
            for row, (status, detail) in zip(batch, thumbnails, strict=True):
                rows.append({
                    "mid": row.mid, "name": row.name, "published_at": row.published_at,
                    "created_at": row.published_at, "like_count": 0,  # counted with the likes below
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
            store.upsert_models(conn, rows)
            stats.models += len(batch)
            progress(f"import: {stats.models}/{len(models.rows)} models, {stats.thumbnails_ok} thumbnails")
        _import_likes(conn, folder / "model_likes_anon.psv", [row.mid for row in models.rows], now, stats,
                      progress)
    progress(f"import done: {stats.models} models, {stats.likes} likes, thumbnails ok={stats.thumbnails_ok} "
             f"missing={stats.thumbnails_missing} failed={stats.thumbnails_failed}, {stats.bad_rows} bad rows, "
             f"{stats.duplicates} duplicates dropped")
    return stats


LIKES_BLOCK = 500_000  # likes parsed before they go to the DB in one COPY


def _bad_row(stats: ImportStats, problem: str) -> None:
    stats.bad_rows += 1
    if len(stats.problems) < 1000:  # the log has them all
        stats.problems.append(problem)
    log.warning("%s", problem)


def _import_likes(conn: Connection, path: Path, mids: list[str], now: datetime, stats: ImportStats,
                  progress: Callable[[str], None]) -> None:
    """Stream the likes file into a temp table, then, in the same transaction, make each listed
    model's likers exactly the file's (deduplicated; likes of unlisted models counted and left
    out) and count them into ``like_count``."""
    conn.execute(text("CREATE TEMPORARY TABLE import_models (mid VARCHAR(32) PRIMARY KEY)"))
    conn.execute(text("CREATE TEMPORARY TABLE import_likes (mid VARCHAR(32) NOT NULL, uid VARCHAR(64) NOT NULL)"))
    _stage(conn, "import_models", ((mid,) for mid in mids))
    block: list[tuple[str, str]] = []
    staged = 0
    for row in iter_likes(path, stream=True):
        if isinstance(row, str):
            _bad_row(stats, row)
            continue
        block.append((row.mid, row.uid))
        if len(block) >= LIKES_BLOCK:
            staged += _stage(conn, "import_likes", block)
            block = []
            progress(f"import: {staged} likes read")
    staged += _stage(conn, "import_likes", block)
    unknown = conn.execute(text("SELECT count(*) FROM import_likes s WHERE NOT EXISTS "
                                "(SELECT 1 FROM import_models m WHERE m.mid = s.mid)")).scalar_one()
    distinct = conn.execute(text("SELECT count(*) FROM (SELECT DISTINCT mid, uid FROM import_likes) d"))\
        .scalar_one()
    conn.execute(text("DELETE FROM likes WHERE mid IN (SELECT mid FROM import_models)"))
    conn.execute(text("INSERT INTO likes (mid, uid) SELECT DISTINCT s.mid, s.uid FROM import_likes s "
                      "JOIN import_models m ON m.mid = s.mid"))
    conn.execute(text("UPDATE models SET like_count = (SELECT count(*) FROM likes l WHERE l.mid = models.mid), "
                      "likes_complete = :done, likes_reason = NULL, likes_fetched_at = :now "
                      "WHERE mid IN (SELECT mid FROM import_models)"), {"done": True, "now": now})
    stats.likes = conn.execute(text("SELECT count(*) FROM likes WHERE mid IN (SELECT mid FROM import_models)"))\
        .scalar_one()
    conn.execute(text("DROP TABLE import_likes"))
    conn.execute(text("DROP TABLE import_models"))
    stats.duplicates += staged - distinct
    stats.likes_of_unknown_models = int(unknown)
    if unknown:
        message = f"{path}: {unknown} likes of models that model_urls.psv does not list were left out"
        stats.problems.append(message)
        log.warning("%s", message)
    progress(f"import: {stats.likes} likes of {len(mids)} models stored")


_STAGING = {  # the temp tables' statements, fixed strings: no SQL is built from values
    "import_models": (("mid",), "COPY import_models (mid) FROM STDIN WITH (FORMAT csv)",
                      "INSERT INTO import_models (mid) VALUES (:mid)"),
    "import_likes": (("mid", "uid"), "COPY import_likes (mid, uid) FROM STDIN WITH (FORMAT csv)",
                     "INSERT INTO import_likes (mid, uid) VALUES (:mid, :uid)"),
}


def _stage(conn: Connection, table: str, rows: Iterable[tuple[str, ...]]) -> int:
    """Rows into one of our temp tables: one COPY on PostgreSQL, batched inserts elsewhere."""
    columns, copy, insert = _STAGING[table]
    if conn.dialect.name == "postgresql":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        count = 0
        for row in rows:
            writer.writerow(row)
            count += 1
        buffer.seek(0)
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        dbapi.cursor().copy_expert(copy, buffer)
        return count
    values = [dict(zip(columns, row, strict=True)) for row in rows]
    if values:
        conn.execute(text(insert), values)
    return len(values)
