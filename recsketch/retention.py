"""Retention (DESIGN §7): what a run writes goes once nothing needs it any more.

Every run folder a stage makes is registered in the catalogue DB (``run_folders``: its kind,
when it started, when it loaded). ``recsketch gc`` and the DAG's ``cleanup`` task, after
every load, keep the newest ``RECSKETCH_KEEP_RUNS`` folders of each kind, the live run's and
every run in flight, and delete the rest with their ``runs``/``run_metrics`` rows. A folder
is found by its registered name and emptied by the exact keys its plans name
(``contracts.run_folder_keys``), so an object store is never listed; a local folder is removed
whole (with any temp file a killed process left in it).

A deletion is marked in the registry before a file goes, so a stage of that run refuses to
write into it again, and a deletion cut short (a kill, a lost worker) is finished by the next
collection; two collections at once delete the same keys, which is harmless. A run is in
flight from its first stage until it loads, for at most :data:`IN_FLIGHT` (a run that failed
is collected after that, unless it is among the newest).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from recsketch import storage
from recsketch.config import Settings
from recsketch.contracts import RUN_LIKES_FILE, VALID_MODELS_FILE, run_folder_keys, run_working_keys
from recsketch.db import store
from recsketch.db.schema import run_folders, run_metrics, runs
from recsketch.errors import RecsketchError
from recsketch.ids import run_folder_name

log = logging.getLogger(__name__)

IN_FLIGHT = timedelta(hours=24)  # the longest a run may take from its first stage to its load


class Kind(StrEnum):
    """What made a folder: the crawl DAG (its stats) or a recommendations run (everything else)."""

    CRAWL = "crawl"
    RECOMMENDATIONS = "recommendations"


def register(engine: Engine, folder: str, kind: Kind, now: datetime | None = None) -> None:
    """Record that a stage of ``kind`` writes into ``folder`` (a recommendations run supersedes
    a crawl of the same name); refused once retention has begun deleting it."""
    now = now or datetime.now(UTC)
    with engine.begin() as conn:  # two registrations at once: one inserts, the other finds its row
        conn.execute(store.insert_for(conn)(run_folders).values(folder=folder, kind=kind.value, started_at=now)
                     .on_conflict_do_nothing(index_elements=["folder"]))
        row = conn.execute(select(run_folders).where(run_folders.c.folder == folder)).mappings().one()
        if row["deleting_at"] is not None:
            raise RecsketchError(f"run folder {folder!r} is being deleted by retention (recsketch gc, "
                                 f"RECSKETCH_KEEP_RUNS) since {row['deleting_at']}: start a new run")
        if kind is Kind.RECOMMENDATIONS and row["kind"] != kind.value:
            conn.execute(update(run_folders).where(run_folders.c.folder == folder).values(kind=kind.value))


def finish(engine: Engine, folder: str, now: datetime | None = None) -> None:
    """The run loaded: no longer in flight."""
    with engine.begin() as conn:
        conn.execute(update(run_folders).where(run_folders.c.folder == folder)
                     .values(finished_at=now or datetime.now(UTC)))


@dataclass(frozen=True)
class Verdict:
    folder: str
    kind: str
    keep: bool
    reason: str  # newest | live | in flight | current | past retention | deletion cut short


def judge(settings: Settings, engine: Engine, current: str | None = None,
          now: datetime | None = None) -> list[Verdict]:
    """Every registered folder, newest first, and whether retention keeps it (and why)."""
    now = now or datetime.now(UTC)
    _register_unlisted(settings, engine)
    with engine.connect() as conn:
        folders = conn.execute(select(run_folders).order_by(run_folders.c.started_at.desc(),
                                                            run_folders.c.folder.desc())).mappings().all()
        live_ids = conn.execute(select(runs.c.run_id).where(runs.c.is_live)).scalars().all()
    live = {run_folder_name(run_id) for run_id in live_ids}
    seen = {kind: 0 for kind in Kind}
    verdicts = []
    for row in folders:
        kind = Kind(row["kind"])
        seen[kind] += 1
        started = _aware(row["started_at"])
        if row["deleting_at"] is not None:
            reason, keep = "deletion cut short", False
        elif row["folder"] == current:
            reason, keep = "current", True
        elif row["folder"] in live:
            reason, keep = "live", True
        elif seen[kind] <= settings.keep_runs:
            reason, keep = "newest", True
        elif row["finished_at"] is None and now - started < IN_FLIGHT:
            reason, keep = "in flight", True
        else:
            reason, keep = "past retention", False
        verdicts.append(Verdict(row["folder"], kind.value, keep, reason))
    return verdicts


def collect(settings: Settings, engine: Engine, *, current: str | None = None, dry_run: bool = False,
            progress: Callable[[str], None] = log.info) -> dict:
    """Delete every folder :func:`judge` does not keep, with its ``runs``/``run_metrics`` rows."""
    verdicts = judge(settings, engine, current)
    doomed = [v for v in reversed(verdicts) if not v.keep]  # the oldest first
    kept = [v for v in verdicts if v.keep]
    progress(f"gc: {len(kept)} run folders kept (RECSKETCH_KEEP_RUNS={settings.keep_runs} of each kind, the live "
             f"run's, runs in flight), {len(doomed)} {'would be ' if dry_run else ''}deleted")
    files, failed = 0, []
    for verdict in doomed:
        if dry_run:
            progress(f"gc: would delete {verdict.folder} ({verdict.kind}, {verdict.reason})")
            continue
        try:
            files += delete_folder(settings, engine, verdict.folder)
        except (OSError, SQLAlchemyError) as exc:  # marked: the next collection (or one running now) finishes it
            failed.append(verdict.folder)
            progress(f"gc: {verdict.folder} is not deleted yet ({type(exc).__name__}: {exc}); the next collection "
                     "finishes it")
            continue
        progress(f"gc: deleted {verdict.folder} ({verdict.kind}, {verdict.reason})")
    return {"kept": [v.folder for v in kept], "deleted": [v.folder for v in doomed if v.folder not in failed],
            "dry_run": dry_run, "files_deleted": files, "failed": failed}


def delete_folder(settings: Settings, engine: Engine, folder: str) -> int:
    """Mark, empty and forget one run folder; returns the files deleted. Safe to repeat."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(update(run_folders).where(run_folders.c.folder == folder, run_folders.c.deleting_at.is_(None))
                     .values(deleting_at=now))
    location = settings.run_dir(folder)
    local = storage.local_path(location)
    if local is not None:
        files = _remove_tree(local)
    else:
        files = 0
        for key in run_folder_keys(location):
            if key.exists():
                key.unlink(missing_ok=True)
                files += 1
    with engine.begin() as conn:
        loaded = [run_id for run_id in conn.execute(select(runs.c.run_id).where(~runs.c.is_live)).scalars()
                  if run_folder_name(run_id) == folder]
        if loaded:
            conn.execute(delete(run_metrics).where(run_metrics.c.run_id.in_(loaded)))
            conn.execute(delete(runs).where(runs.c.run_id.in_(loaded)))
        conn.execute(delete(run_folders).where(run_folders.c.folder == folder))
    return files


def thin(settings: Settings, engine: Engine, folders: Iterable[str], *, dry_run: bool = False) -> int:
    """Delete the working files of the loaded runs among ``folders``: what their similarity plans
    name (the gathered features, refresh plans, shards) and the deep visual lists the hybrid
    bound read, consumed once the lists are merged and served (the next day's refresh reads
    the backbone's latest lists, not a run's); and the likes of those no longer live (what
    evaluate, plan_hybrid and the gate of that run read: a rerun of those then reads the
    catalogue's likes, and a reload of it passes ungated). Their plans, reports and served
    lists stay (the gate scores kept runs' lists on today's likes). A run that has not loaded
    keeps everything, so its merge or load can be rerun. Returns the files."""
    names = list(folders)
    if not names:
        return 0
    with engine.connect() as conn:
        loaded = conn.execute(select(run_folders.c.folder).where(run_folders.c.folder.in_(names),
                                                                 run_folders.c.finished_at.is_not(None))).scalars()
        finished = sorted(set(loaded))
    live = store.live_run(engine)
    live_folder = run_folder_name(live["run_id"]) if live else None
    removed = 0
    for folder in finished:
        root = settings.run_dir(folder)
        for key in run_working_keys(root) + ([root / RUN_LIKES_FILE] if folder != live_folder else []):
            if key.exists():
                if not dry_run:
                    key.unlink(missing_ok=True)
                removed += 1
    return removed


def _remove_tree(folder: Path) -> int:
    """Remove a local folder, counting its files; what another collection removed first is skipped."""
    removed = 0
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True) if folder.is_dir() else []:
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    try:
        folder.rmdir()
    except FileNotFoundError:
        pass  # another collection removed it
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        log.info("gc: %s still holds files another collection is removing", folder)
    return removed


def _register_unlisted(settings: Settings, engine: Engine) -> None:
    """Folders on a local disk that no stage registered (made by a release before retention),
    registered as started and finished at their last change. An object store is not listed:
    such folders stay."""
    root = storage.local_path(settings.data_root / "runs")
    if root is None or not root.is_dir():
        return
    with engine.connect() as conn:
        known = set(conn.execute(select(run_folders.c.folder)).scalars())
    for path in sorted(root.iterdir()):
        if path.is_dir() and path.name not in known:
            kind = Kind.RECOMMENDATIONS if (path / VALID_MODELS_FILE).exists() else Kind.CRAWL
            try:
                changed = datetime.fromtimestamp(_changed(path), UTC)
            except FileNotFoundError:
                continue  # removed meanwhile (another collection)
            register(engine, path.name, kind, changed)
            finish(engine, path.name, changed)  # no release before this one is still writing it


def _changed(path: Path) -> float:
    return max([path.stat().st_mtime, *(child.stat().st_mtime for child in path.iterdir() if child.is_file())])


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes: they were written in UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)
