"""Stage 7: retention after the load (``recsketch.retention``): run folders past
``RECSKETCH_KEEP_RUNS`` deleted, with their rows in ``runs`` and ``run_metrics``."""

from __future__ import annotations

from recsketch import retention
from recsketch.config import Settings
from recsketch.db import store
from recsketch.stages.common import Progress, log
from recsketch.storage import Location


def cleanup_stage(settings: Settings, folder: Location, progress: Progress = log.info, dry_run: bool = False) -> dict:
    """What retention keeps and deletes, this run's folder kept whatever its age; ``dry_run``
    deletes nothing (``recsketch gc --dry-run``)."""
    engine = store.connect(settings.resolved_database_url)
    result = retention.collect(settings, engine, current=folder.name, dry_run=dry_run, progress=progress)
    return {"kept": len(result["kept"]), "deleted": len(result["deleted"]), "files_deleted": result["files_deleted"],
            "failed": len(result["failed"]), "dry_run": dry_run}
