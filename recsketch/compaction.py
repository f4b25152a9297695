"""Compaction (DESIGN §7): feature rows that nothing needs any more, and the chunks that held them, go.

A feature row is needed while its (model, thumbnail version) is the catalogue's now (the next
run reads it) or a kept run's (its ``ValidModels``, in a folder retention keeps). A replaced
thumbnail's old row and a deleted model's row stop being needed once the last kept run that
used them is collected. Chunks are write-once, so compaction never edits one:

- a chunk none of whose entries is needed leaves the manifest;
- chunks at least ``COMPACT_SHARE`` unneeded are rewritten together: their needed rows go
  into new chunks (new content-derived keys, created once) and the old ones leave the
  manifest; chunks less worn than that stay as they are, so a day rewrites about what
  changed, and the store holds at most ~2x what is needed.

Order makes it safe to kill at any point: the new chunks are created, then the manifest is
written whole (readers see the old set or the new), then the chunks it dropped are recorded
as retired (``compaction.json``, with the time). A retired chunk's file is deleted by a later
compaction, ``RECSKETCH_COMPACTION_GRACE_S`` (:data:`GRACE`) after retirement, by its exact key
(never by listing), and only if the manifest does not hold it: a run that read the old
manifest a moment before still finds every chunk it named. A chunk created for a compaction
that was killed before its manifest was written is recorded as retired before it is written,
so it goes too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy.engine import Engine

from recsketch import storage
from recsketch.config import Settings
from recsketch.contracts import VALID_MODELS_FILE, ValidModels
from recsketch.db import store as catalogue
from recsketch.features.chunks import Chunk, ChunkStore, chunk_id_for
from recsketch.features.keys import backbone_key
from recsketch.storage import Location

log = logging.getLogger(__name__)

COMPACT_SHARE = 0.25  # a chunk this share unneeded (or more) is rewritten: ~4x the unneeded rows rewritten, ~1/8 left
GRACE = timedelta(hours=1)  # a retired chunk outlives any reader of the manifest that named it
JOURNAL_FILE = "compaction.json"

Entry = tuple[str, str]  # (mid, thumbnail version)


@dataclass(frozen=True)
class Compaction:
    chunks_before: int
    chunks_after: int
    entries_before: int
    entries_after: int
    dropped: int  # chunks that left the manifest whole (nothing in them needed)
    rewritten: int  # worn chunks whose needed rows moved into new ones
    created: int  # the new chunks
    files_deleted: int  # retired chunk files deleted (retired at least GRACE ago)
    dry_run: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def needed_entries(settings: Settings, engine: Engine, kept_folders: Iterable[str]) -> set[Entry]:
    """The catalogue's (model, thumbnail version) now, and every kept run's."""
    needed = {(mid, version or "") for mid, version in catalogue.models_with_thumbnails(engine).items()}
    for folder in kept_folders:
        location = settings.run_dir(folder)
        if (location / VALID_MODELS_FILE).exists():  # a crawl's folder, or a run before its threshold: none
            needed.update(ValidModels.read(location).versions.items())
    return needed


def compact_features(settings: Settings, engine: Engine, kept_folders: Iterable[str], *, dry_run: bool = False,
                     progress: Callable[[str], None] = log.info) -> Compaction:
    """:func:`compact` on the configured backbone's chunks, against what is needed now."""
    chunk_store = ChunkStore(settings.features_dir, backbone_key(settings))
    return compact(chunk_store, needed_entries(settings, engine, kept_folders), chunk_rows=settings.chunk_size,
                   dry_run=dry_run, grace=timedelta(seconds=settings.compaction_grace_s), progress=progress)


def remove_stale_exports(settings: Settings, *, dry_run: bool = False,
                         progress: Callable[[str], None] = log.info) -> int:
    """Model exports (``exports/lite0-*.onnx``) other than the one this installation's weights
    and exporter name; local disks only (an object store is not listed: old exports stay
    there). Returns how many go (or would)."""
    from recsketch.errors import RecsketchError
    from recsketch.features.runtimes import export_key

    folder = storage.local_path(settings.data_root / "exports")
    if folder is None or not folder.is_dir():
        return 0
    try:
        current = f"{export_key()}.onnx"
    except (RecsketchError, ImportError, OSError) as exc:  # no weights here: nothing can say which is current
        progress(f"gc: exports left as they are: {exc}")
        return 0
    stale = [path for path in sorted(folder.glob("lite0-*.onnx")) if path.name != current]
    for path in stale if not dry_run else []:
        path.unlink(missing_ok=True)
    if stale:
        progress(f"gc: {len(stale)} model exports no configuration here uses {'would be ' if dry_run else ''}"
                 f"deleted (current: {current})")
    return len(stale)


def _journal_path(store: ChunkStore) -> Location:
    return store.root / JOURNAL_FILE


def _read_journal(store: ChunkStore) -> dict[str, str]:
    """chunk id -> when it was retired (ISO time)."""
    try:
        payload = json.loads(_journal_path(store).read_text())
        return {str(cid): str(when) for cid, when in payload["retired"].items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s is unreadable (%s): the chunks it retired stay until a listing finds them",
                    _journal_path(store), exc)
        return {}


def _write_journal(store: ChunkStore, retired: dict[str, str]) -> None:
    storage.write_text(_journal_path(store), json.dumps({"retired": dict(sorted(retired.items()))},
                                                        separators=(",", ":")))


def _delete_retired(store: ChunkStore, manifest: dict[str, list[Entry]], retired: dict[str, str],
                    now: datetime, grace: timedelta, dry_run: bool) -> tuple[dict[str, str], int]:
    """Delete retired chunks past the grace period that the manifest does not hold; returns the
    journal left and the files deleted."""
    left, deleted = {}, 0
    for chunk_id, when in retired.items():
        if chunk_id in manifest:  # created by a compaction whose manifest was written: live
            continue
        if now - datetime.fromisoformat(when) < grace or dry_run:
            left[chunk_id] = when
            continue
        path = store.path(chunk_id)
        if path.exists():
            path.unlink(missing_ok=True)
            deleted += 1
    return left, deleted


def compact(store: ChunkStore, needed: set[Entry], *, chunk_rows: int, dry_run: bool = False,
            now: datetime | None = None, grace: timedelta = GRACE,
            progress: Callable[[str], None] = log.info) -> Compaction:
    """Drop and rewrite the chunks of ``store`` that hold unneeded entries (see the module);
    ``chunk_rows``: the size of the new chunks; a retired file goes ``grace`` after retirement.
    One task at a time (the manifest's writers are plan_similarity and this, which run in turn
    in a DAG run)."""
    now = now or datetime.now(UTC)
    manifest = store.manifest()
    journaled = _read_journal(store)
    retired, files_deleted = _delete_retired(store, manifest, dict(journaled), now, grace, dry_run)
    entries_before = sum(len(entries) for entries in manifest.values())
    dropped, worn = [], []
    for chunk_id, entries in manifest.items():
        unneeded = sum(entry not in needed for entry in entries)
        if entries and unneeded == len(entries):
            dropped.append(chunk_id)
        elif entries and unneeded >= COMPACT_SHARE * len(entries):
            worn.append(chunk_id)
    created: dict[str, list[Entry]] = {}
    changes = bool(dropped or worn)
    if changes and not dry_run:
        created = _rewrite(store, worn, needed, chunk_rows, retired, now)
    kept = {cid: entries for cid, entries in manifest.items() if cid not in dropped and cid not in worn}
    after = {**kept, **created}
    if changes and not dry_run:
        store.write_manifest(after)
        retired.update({cid: now.isoformat() for cid in [*dropped, *worn] if cid not in after})
    if not dry_run:
        journal = {cid: when for cid, when in retired.items() if cid not in after}
        if journal != journaled or created:  # _rewrite journaled the new chunks it made
            _write_journal(store, journal)
    moving = sum(entry in needed for cid in worn for entry in manifest[cid])
    result = Compaction(len(manifest), len(after) if not dry_run else len(kept) + -(-moving // chunk_rows),
                        entries_before, sum(len(entries) for entries in kept.values()) + moving, len(dropped),
                        len(worn), len(created) if not dry_run else -(-moving // chunk_rows), files_deleted, dry_run)
    would = "would be " if dry_run else ""
    progress(f"gc: features {store.backbone_key}: {len(dropped)} chunks {would}dropped (nothing in them needed), "
             f"{len(worn)} worn ones (>= {COMPACT_SHARE:.0%} unneeded) {would}rewritten into {result.created} new "
             f"ones; {entries_before:,} entries -> {result.entries_after:,}; {files_deleted} retired chunk files "
             f"deleted ({len(retired) - files_deleted if dry_run else len(journal)} retired, waiting {grace})")
    return result


def _rewrite(store: ChunkStore, worn: Iterable[str], needed: set[Entry], chunk_rows: int,
             retired: dict[str, str], now: datetime) -> dict[str, list[Entry]]:
    """The needed rows of the worn chunks, in new chunks of up to ``chunk_rows`` rows (one old
    chunk and one new one in memory at a time); each new id is journaled as retired before
    its chunk is created, so a kill before the manifest leaves nothing unaccounted."""
    created: dict[str, list[Entry]] = {}
    mids: list[str] = []
    rows: list[np.ndarray] = []
    failed: dict[str, str] = {}
    versions: dict[str, str] = {}
    backbone = store.backbone_key
    dim = [0]  # the features' width, from the first chunk read

    def flush() -> None:
        if not mids and not failed:
            return
        order = sorted(mids)
        position = {mid: i for i, mid in enumerate(mids)}
        features = np.stack([rows[position[mid]] for mid in order]) if order else np.zeros((0, dim[0]), np.float32)
        settled = [*order, *sorted(failed)]
        chunk_id = "c" + chunk_id_for(settled, versions)  # never an extraction plan's id
        retired[chunk_id] = now.isoformat()
        _write_journal(store, retired)
        chunk = Chunk(chunk_id, order, features, dict(sorted(failed.items())), backbone,
                      {m: versions[m] for m in settled if versions.get(m)})
        store.write(chunk)
        created[chunk_id] = list(chunk.entries())
        mids.clear()
        rows.clear()
        failed.clear()
        versions.clear()

    for chunk_id in worn:
        chunk = store.read(chunk_id)
        if chunk is None:  # unreadable: its needed models are extracted again by the next plan
            continue
        dim[0] = chunk.features.shape[1]
        for i, mid in enumerate(chunk.mids):
            version = chunk.versions.get(mid, "")
            if (mid, version) in needed and mid not in versions:
                mids.append(mid)
                rows.append(np.asarray(chunk.features[i], dtype=np.float32))
                versions[mid] = version
                if len(mids) + len(failed) >= chunk_rows:
                    flush()
        for mid, reason in chunk.failed.items():
            version = chunk.versions.get(mid, "")
            if (mid, version) in needed and mid not in versions:
                failed[mid] = reason
                versions[mid] = version
    flush()
    return created
