"""Stage 7: retention after the load (``recsketch.retention``): run folders past
``RECSKETCH_KEEP_RUNS`` deleted, with their rows in ``runs`` and ``run_metrics``; then the
feature chunks compacted to what the catalogue and the kept runs need (``recsketch.compaction``)
and the thumbnail index to the catalogue's models."""

from __future__ import annotations

from recsketch import compaction, retention
from recsketch.config import Settings
from recsketch.crawl import ThumbnailIndex
from recsketch.db import store
from recsketch.stages.common import Progress, log
from recsketch.storage import Location


def clean(settings: Settings, current: str | None = None, progress: Progress = log.info, dry_run: bool = False
          ) -> dict:
    """Retention (the ``current`` folder kept whatever its age), then compaction against what the
    kept folders and the catalogue need; ``dry_run`` deletes nothing. Shared by the DAG's
    cleanup and ``recsketch gc``."""
    engine = store.connect(settings.resolved_database_url)
    result = retention.collect(settings, engine, current=current, dry_run=dry_run, progress=progress)
    working = retention.thin(settings, engine, result["kept"], dry_run=dry_run)
    progress(f"gc: {working} working files of loaded runs (gathered features, shards) "
             f"{'would be ' if dry_run else ''}deleted")
    features = compaction.compact_features(settings, engine, result["kept"], dry_run=dry_run, progress=progress)
    index_lines = 0 if dry_run else ThumbnailIndex(settings.thumbs_dir).compact(set(store.stored_model_ids(engine)))
    exports = compaction.remove_stale_exports(settings, dry_run=dry_run, progress=progress)
    return {**result, "working_files_deleted": working, "chunks_dropped": features.dropped,
            "chunks_rewritten": features.rewritten, "chunk_files_deleted": features.files_deleted,
            "feature_entries": features.entries_after, "thumbnail_index_lines_dropped": index_lines,
            "exports_deleted": exports}


def cleanup_stage(settings: Settings, folder: Location, progress: Progress = log.info, dry_run: bool = False) -> dict:
    """What retention keeps and deletes, this run's folder kept whatever its age, and what
    compaction drops; ``dry_run`` deletes nothing (``recsketch gc --dry-run``)."""
    result = clean(settings, folder.name, progress, dry_run)
    return {**result, "kept": len(result["kept"]), "deleted": len(result["deleted"]), "failed": len(result["failed"])}
