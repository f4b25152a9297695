"""Issue 24 part 2: feature rows nothing needs go; chunks are rewritten under new keys, the
manifest shrinks, retired files go after a grace period, by exact keys; a kill at any point
loses nothing needed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from recsketch import compaction
from recsketch.compaction import GRACE, compact
from recsketch.features.chunks import Chunk, ChunkStore, MemoryRows

DIM = 16


def _store(root, chunks: dict[str, list[tuple[str, str]]], failed: dict[str, tuple[str, str]] | None = None
           ) -> tuple[ChunkStore, dict[tuple[str, str], np.ndarray]]:  # type: ignore[no-untyped-def]
    """A registered store: chunk id -> its (mid, version) rows with random features."""
    store = ChunkStore(root, "test-backbone")
    rng = np.random.default_rng(0)
    rows = {}
    for chunk_id, entries in chunks.items():
        features = rng.standard_normal((len(entries), DIM)).astype(np.float32)
        rows.update({entry: features[i] for i, entry in enumerate(entries)})
        failures = {mid: "unreadable image" for cid, (mid, _) in (failed or {}).items() if cid == chunk_id}
        versions = {mid: version for mid, version in entries}
        versions.update({mid: version for cid, (mid, version) in (failed or {}).items() if cid == chunk_id})
        store.write(Chunk(chunk_id, [mid for mid, _ in entries], features, failures, store.backbone_key, versions))
    store.register(chunks)
    return store, rows


def _features(store: ChunkStore, wanted: dict[str, str]) -> dict[str, np.ndarray]:
    sink = MemoryRows()
    gathered = store.gather(wanted, sorted(wanted), sink)
    assert not gathered.missing, gathered.missing
    return dict(zip(gathered.mids, sink.array, strict=True))


def _files(store: ChunkStore) -> set[str]:
    return {path.name for path in Path(store.root).glob("chunk-*.npz")}


def test_unneeded_rows_go_worn_chunks_are_rewritten_and_retired_files_wait_for_the_grace(tmp_path: Path) -> None:
    chunks = {
        "aaaa": [(f"m{i:02d}", "v1") for i in range(8)],  # all replaced: dropped
        "bbbb": [(f"m{i:02d}", "v1") for i in range(8, 16)],  # 6 of 8 replaced: worn
        "cccc": [(f"m{i:02d}", "v1") for i in range(16, 24)],  # 1 of 8 deleted: kept as it is
        "dddd": [(f"m{i:02d}", "v2") for i in range(0, 14)],  # the replacements
    }
    store, _ = _store(tmp_path, chunks, failed={"bbbb": ("m30", "v1")})
    needed = {(f"m{i:02d}", "v2") for i in range(14)} | {("m14", "v1"), ("m15", "v1"), ("m30", "v1")} \
        | {(f"m{i:02d}", "v1") for i in range(16, 23)}
    wanted = dict(sorted(needed))
    before = _features(store, {mid: version for mid, version in wanted.items() if mid != "m30"})
    lines: list[str] = []
    now = datetime(2026, 12, 1, tzinfo=UTC)

    dry = compact(store, needed, chunk_rows=4, dry_run=True, now=now, progress=lines.append)
    assert (dry.dropped, dry.rewritten, dry.created) == (1, 1, 1) and set(store.manifest()) == set(chunks)
    assert "would be" in lines[-1]

    result = compact(store, needed, chunk_rows=4, now=now, progress=lines.append)
    manifest = store.manifest()
    assert (result.dropped, result.rewritten, result.created) == (1, 1, 1)
    assert "aaaa" not in manifest and "bbbb" not in manifest and {"cccc", "dddd"} <= set(manifest)
    entries = {entry for held in manifest.values() for entry in held}
    assert entries == needed | {("m23", "v1")}  # the deleted model's row stays in its little-worn chunk
    assert result.entries_after == len(entries) < result.entries_before
    new_id = next(cid for cid in manifest if cid.startswith("c") and cid not in chunks)
    assert store.read(new_id).failed == {"m30": "unreadable image"}  # a needed failure moves too
    after = _features(store, {mid: version for mid, version in wanted.items() if mid != "m30"})
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[mid], before[mid]) for mid in before)  # the same bytes
    assert {"chunk-aaaa.npz", "chunk-bbbb.npz"} <= _files(store)  # retired, within the grace period

    again = compact(store, needed, chunk_rows=4, now=now + GRACE / 2)
    assert (again.dropped, again.rewritten, again.files_deleted) == (0, 0, 0)
    later = compact(store, needed, chunk_rows=4, now=now + GRACE + timedelta(seconds=1))
    assert later.files_deleted == 2 and _files(store) == {f"chunk-{cid}.npz" for cid in manifest}
    assert compaction._read_journal(store) == {}


def test_a_compaction_killed_before_its_manifest_leaves_everything_and_its_new_chunks_go_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = {"aaaa": [(f"m{i}", "v1") for i in range(6)], "bbbb": [(f"m{i}", "v2") for i in range(6, 9)]}
    store, _ = _store(tmp_path, chunks)
    needed = {("m0", "v1"), *((f"m{i}", "v2") for i in range(6, 9))}
    wanted = dict(sorted(needed))
    before = _features(store, wanted)
    now = datetime(2026, 12, 1, tzinfo=UTC)

    def killed(_manifest):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(store, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        compact(store, needed, chunk_rows=4, now=now)
    monkeypatch.undo()
    assert set(store.manifest()) == set(chunks)  # nothing moved for readers
    orphans = set(compaction._read_journal(store)) - set(chunks)
    assert len(orphans) == 1 and f"chunk-{next(iter(orphans))}.npz" in _files(store)  # created, journaled

    compact(store, needed, chunk_rows=4, now=now + timedelta(minutes=1))  # the rerun does the work
    assert all(np.array_equal(_features(store, wanted)[mid], before[mid]) for mid in wanted)
    compact(store, needed, chunk_rows=4, now=now + 2 * GRACE)
    assert _files(store) == {f"chunk-{cid}.npz" for cid in store.manifest()}  # nothing unaccounted for


def test_a_store_that_holds_only_what_is_needed_is_left_alone(tmp_path: Path) -> None:
    chunks = {"aaaa": [(f"m{i}", "v1") for i in range(5)]}
    store, _ = _store(tmp_path, chunks)
    manifest_bytes = Path(store.manifest_path).read_bytes()
    result = compact(store, {(f"m{i}", "v1") for i in range(5)}, chunk_rows=4)
    assert (result.dropped, result.rewritten, result.created, result.files_deleted) == (0, 0, 0, 0)
    assert Path(store.manifest_path).read_bytes() == manifest_bytes
    assert not Path(store.root, compaction.JOURNAL_FILE).exists()


def test_compaction_on_an_object_store_deletes_by_exact_keys(s3_data_dir: str, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    from recsketch.config import Settings

    root = Settings(data_dir=s3_data_dir).features_dir
    chunks = {"aaaa": [(f"m{i}", "v1") for i in range(4)], "bbbb": [(f"m{i}", "v2") for i in range(4)]}
    store, _ = _store(root, chunks)
    needed = {(f"m{i}", "v2") for i in range(4)}
    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert compact(store, needed, chunk_rows=4, now=now).dropped == 1

    fs = store.root.fs  # type: ignore[union-attr]
    for method in ("ls", "find", "glob", "walk", "_ls", "_find", "_glob", "_walk"):
        monkeypatch.setattr(fs, method, lambda *a, **k: pytest.fail("compaction listed the object store"),
                            raising=False)
    assert compact(store, needed, chunk_rows=4, now=now + 2 * GRACE).files_deleted == 1
    monkeypatch.undo()
    assert not store.path("aaaa").exists() and store.path("bbbb").exists()
    assert set(store.manifest()) == {"bbbb"}


def test_a_compaction_killed_after_its_manifest_keeps_the_new_chunks_it_journaled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new chunks are journaled as retired before they are created; killed after the
    manifest names them, before the journal is rewritten, a later compaction must not delete
    them: the manifest holds them."""
    chunks = {"aaaa": [(f"m{i}", "v1") for i in range(6)], "bbbb": [(f"m{i}", "v2") for i in range(6, 9)]}
    store, _ = _store(tmp_path, chunks)
    needed = {("m0", "v1"), ("m1", "v1"), *((f"m{i}", "v2") for i in range(6, 9))}
    wanted = dict(sorted(needed))
    before = _features(store, wanted)
    now = datetime(2026, 12, 1, tzinfo=UTC)
    real_write_manifest = store.write_manifest

    def manifest_then_killed(manifest):  # type: ignore[no-untyped-def]
        real_write_manifest(manifest)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(store, "write_manifest", manifest_then_killed)
    with pytest.raises(KeyboardInterrupt):
        compact(store, needed, chunk_rows=4, now=now)
    monkeypatch.undo()
    new = set(store.manifest()) - set(chunks)
    assert len(new) == 1 and new <= set(compaction._read_journal(store))  # named by both

    compact(store, needed, chunk_rows=4, now=now + 2 * GRACE)
    assert new <= set(store.manifest()) and all(store.path(cid).exists() for cid in new)
    assert all(np.array_equal(_features(store, wanted)[mid], before[mid]) for mid in wanted)


def test_stale_exports_and_index_lines_go_the_current_ones_stay(tmp_path: Path) -> None:
    from recsketch.compaction import remove_stale_exports
    from recsketch.config import Settings
    from recsketch.crawl import ThumbnailIndex
    from recsketch.features.runtimes import export_key

    settings = Settings(data_dir=tmp_path / "data")
    exports = tmp_path / "data" / "exports"
    exports.mkdir(parents=True)
    current = exports / f"{export_key()}.onnx"
    for path in (current, exports / "lite0-0123456789abcdef.onnx", exports / "notes.txt"):
        path.write_bytes(b"x")
    assert remove_stale_exports(settings, dry_run=True) == 1 and len(list(exports.iterdir())) == 3
    assert remove_stale_exports(settings) == 1
    assert sorted(p.name for p in exports.iterdir()) == sorted([current.name, "notes.txt"])

    thumbs = tmp_path / "data" / "thumbs"
    index = ThumbnailIndex(thumbs)
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    for mid, url in ((a, "https://x/1.jpg"), (b, "https://x/2.jpg"), (a, "https://x/3.jpg"), (c, "https://x/4.jpg")):
        index.add(mid, url)
    assert ThumbnailIndex(thumbs).compact({a, b}) == 2  # a's first download, and c (deleted)
    again = ThumbnailIndex(thumbs)
    assert again.urls == {a: "https://x/3.jpg", b: "https://x/2.jpg"}
    assert len((thumbs / "index.tsv").read_text().splitlines()) == 2
    assert again.compact({a, b}) == 0


def test_the_grace_is_the_one_configured(tmp_path: Path) -> None:
    """``RECSKETCH_COMPACTION_GRACE_S`` reaches compaction: a retired file waits that long, not the default."""
    from recsketch.config import Settings

    store, _ = _store(tmp_path, {"aaaa": [("m00", "v1")], "bbbb": [("m01", "v1")]})
    needed = {("m01", "v1")}
    now = datetime(2026, 12, 1, tzinfo=UTC)
    grace = timedelta(seconds=Settings(compaction_grace_s=60).compaction_grace_s)
    assert compact(store, needed, chunk_rows=4, now=now, grace=grace).dropped == 1
    assert compact(store, needed, chunk_rows=4, now=now + grace / 2, grace=grace).files_deleted == 0
    assert compact(store, needed, chunk_rows=4, now=now + grace, grace=grace).files_deleted == 1  # well within GRACE
    assert _files(store) == {"chunk-bbbb.npz"}
