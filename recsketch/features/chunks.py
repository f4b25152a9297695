"""Feature chunk store: one write-once ``.npz`` object per chunk, and a manifest of them.

A chunk object that exists and reads back intact is done; that is the whole checkpoint
protocol, so a killed run resumes with only the unfinished chunks. Chunk ids are derived
from the chunk's mids (and their thumbnails' versions), and plans split the sorted missing
mids at fixed boundaries, so a rerun plans the same chunks for the same missing mids. A
chunk is created only if absent (a local hard link, or an object-store PUT with
``If-None-Match: *``): two workers extracting the same chunk (a task retried elsewhere
while the first still runs) cannot clobber each other, and no reader sees half a chunk.

Which chunks hold what is read from ``manifest.json`` beside them, never from a listing
(object-store listings can be stale). Extract tasks only create chunks; the one stage that
runs after all of them (``register``, called by plan_similarity) adds them to the manifest,
so the manifest has one writer at a time. A local folder that has no manifest yet (written
by an older release) is listed instead.

Each entry also records the version of the thumbnail it came from (a content hash): a model
is done only for the version it was extracted from, so a changed thumbnail is extracted
again, into a new chunk, and only the matching version's features are ever read. The empty
version stands for "unversioned" (synthetic chunks) and matches only itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recsketch import storage
from recsketch.errors import BadInputError
from recsketch.similarity import normalise
from recsketch.storage import Location

MANIFEST_FILE = "manifest.json"

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    chunk_id: str
    mids: list[str]  # mids with features, in row order of ``features``
    features: np.ndarray  # float32 [len(mids), dim]
    failed: dict[str, str] = field(default_factory=dict)  # mid -> reason
    backbone_key: str = ""
    versions: dict[str, str] = field(default_factory=dict)  # mid -> its thumbnail's content hash

    def entries(self) -> Iterable[tuple[str, str]]:
        """(mid, thumbnail version) of every model this chunk settled, with features or failed."""
        for mid in [*self.mids, *self.failed]:
            yield mid, self.versions.get(mid, "")


Wanted = Mapping[str, str] | Iterable[str]  # mid -> thumbnail version, or mids (unversioned)


def _versions(wanted: Wanted) -> dict[str, str]:
    return dict(wanted) if isinstance(wanted, Mapping) else dict.fromkeys(wanted, "")


def _checksum(mids: Sequence[str], features: np.ndarray) -> str:
    digest = hashlib.sha256("\n".join(mids).encode())
    digest.update(np.ascontiguousarray(features, dtype=np.float32).tobytes())
    return digest.hexdigest()


def chunk_id_for(mids: Sequence[str], versions: Mapping[str, str] | None = None) -> str:
    """Derived from the mids and, when known, their thumbnail versions (a changed thumbnail
    makes a new chunk, never a clash with the old one)."""
    names = [f"{m}@{versions[m]}" if versions and versions.get(m) else m for m in mids]
    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]


class ChunkStore:
    """The chunks of one backbone configuration, under ``features/<backbone key>/``."""

    def __init__(self, root: Location, backbone_key: str) -> None:
        self.backbone_key = backbone_key
        self.root = root / backbone_key
        self.unreadable: set[str] = set()  # registered chunks that failed to read back (see forget)

    def path(self, chunk_id: str) -> Location:
        if not re.fullmatch(r"[0-9A-Za-z]+", chunk_id):
            raise BadInputError(f"chunk id {chunk_id!r} is not alphanumeric")
        return self.root / f"chunk-{chunk_id}.npz"

    def write(self, chunk: Chunk) -> Location:
        """Create the chunk once: readers see the whole chunk or none of it. If an intact chunk of
        that id is there already (another worker finished it first) it is kept; a damaged one
        is replaced."""
        final = self.path(chunk.chunk_id)
        data = self._encode(chunk)
        if not storage.create_bytes(final, data, fsync=True):
            if self.read(chunk.chunk_id) is not None:
                log.info("chunk %s was already written (by another worker); kept it", final)
            else:
                log.warning("chunk %s was damaged; replaced it", final)
                storage.write_bytes(final, data, fsync=True)
        return final

    def _encode(self, chunk: Chunk) -> bytes:
        failed = sorted(chunk.failed.items())
        features = np.ascontiguousarray(chunk.features, dtype=np.float32)
        return storage.npz_bytes(
            mids=storage.text_array(chunk.mids),  # UTF-8 bytes: 32 B a Sketchfab uid, not 128
            features=features,
            sha256=np.array(_checksum(chunk.mids, features)),
            failed_mids=storage.text_array([m for m, _ in failed]),
            failed_reasons=np.array([r for _, r in failed], dtype=str),
            versions=storage.text_array([chunk.versions.get(m, "") for m in [*chunk.mids, *(m for m, _ in failed)]]),
            backbone_key=np.array(self.backbone_key),
        )

    def read(self, chunk_id: str) -> Chunk | None:
        """The chunk, or None if it is absent, partial, corrupt or from another backbone."""
        path = self.path(chunk_id)
        try:
            data = storage.load_npz(path)
            key = str(data["backbone_key"])
            mids = storage.texts(data["mids"])
            features = data["features"]
            failed = dict(zip(storage.texts(data["failed_mids"]),
                              (str(r) for r in data["failed_reasons"]), strict=True))
            checksum = str(data["sha256"])
            settled = [*mids, *failed]
            versions = dict(zip(settled, storage.texts(data["versions"]), strict=True)) \
                if "versions" in data else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            log.warning("chunk %s is unreadable (%s: %s); it will be extracted again",
                        path, type(exc).__name__, exc)
            return None
        if checksum != _checksum(mids, features):
            log.warning("chunk %s fails its checksum; it will be extracted again", path)
            return None
        if key != self.backbone_key or features.ndim != 2 or features.shape[0] != len(mids):
            log.warning("chunk %s does not match backbone %s; it will be extracted again",
                        path, self.backbone_key)
            return None
        return Chunk(chunk_id, mids, features, failed, key, {m: v for m, v in versions.items() if v})

    # --- the manifest ---------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Location:
        return self.root / MANIFEST_FILE

    def manifest(self) -> dict[str, list[tuple[str, str]]]:
        """chunk id -> the (mid, version) entries it settled, as registered (read afresh each
        time: another worker may have registered chunks since)."""
        try:
            payload = json.loads(self.manifest_path.read_text())
            return {str(cid): [(str(m), str(v)) for m, v in entries] for cid, entries in payload["chunks"].items()}
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s is unreadable (%s); the chunks are found by listing (local) or extracted "
                        "again (object store)", self.manifest_path, exc)
        root = storage.local_path(self.root)
        return self._listed(root) if root is not None else {}

    def _listed(self, root: Path) -> dict[str, list[tuple[str, str]]]:
        """A local folder without a manifest: its intact chunks, found by listing it."""
        if not root.is_dir():
            return {}
        found = {}
        for file in sorted(root.glob("chunk-*.npz")):
            chunk = self.read(file.name[len("chunk-"):-len(".npz")])
            if chunk is not None:
                found[chunk.chunk_id] = list(chunk.entries())
        return found

    def register(self, chunk_ids: Iterable[str]) -> int:
        """Add these chunks (those that exist intact) to the manifest, rewritten whole; returns
        how many were new. Call from one task at a time (plan_similarity does)."""
        manifest = dict(self.manifest())
        added = 0
        for chunk_id in chunk_ids:
            if chunk_id in manifest:
                continue
            chunk = self.read(chunk_id)
            if chunk is not None:  # read to check it, then dropped: memory holds one chunk
                manifest[chunk_id] = list(chunk.entries())
                added += 1
        if added or not self.manifest_path.exists():
            self.write_manifest(manifest)
        return added

    def write_manifest(self, manifest: dict[str, list[tuple[str, str]]]) -> None:
        """One whole object (one PUT, or a rename locally): readers see the old or the new."""
        payload = {"backbone_key": self.backbone_key,
                   "chunks": {cid: [list(e) for e in entries] for cid, entries in sorted(manifest.items())}}
        storage.write_text(self.manifest_path, json.dumps(payload, separators=(",", ":")))

    def chunk_ids(self) -> list[str]:
        return sorted(self.manifest())

    def chunks(self, wanted: set[tuple[str, str]] | None = None) -> Iterable[Chunk]:
        """The manifest's intact chunks (only those holding a wanted entry, when given)."""
        for chunk_id, entries in sorted(self.manifest().items()):  # one read of the manifest
            if wanted is not None and not wanted.intersection(entries):
                continue
            chunk = self.read(chunk_id)
            if chunk is not None:
                yield chunk
            else:
                self.unreadable.add(chunk_id)

    def forget(self, chunk_ids: Iterable[str]) -> int:
        """Drop chunks from the manifest (rewritten whole), so the next plan extracts their models
        again; returns how many it held. Like ``register``, for one task at a time."""
        manifest = self.manifest()
        dropped = [cid for cid in chunk_ids if cid in manifest]
        if dropped:
            self.write_manifest({cid: entries for cid, entries in manifest.items() if cid not in dropped})
        return len(dropped)

    def done(self) -> set[tuple[str, str]]:
        """(mid, thumbnail version) settled by a registered chunk, with features or a recorded failure."""
        return {entry for entries in self.manifest().values() for entry in entries}

    def plan(self, wanted: Wanted, chunk_size: int) -> dict[str, list[str]]:
        """Chunks (id -> mids) covering the wanted mids whose version no intact chunk holds yet."""
        versions = _versions(wanted)
        done = self.done()
        missing = sorted(mid for mid, version in versions.items() if (mid, version) not in done)
        plan: dict[str, list[str]] = {}
        for start in range(0, len(missing), chunk_size):
            part = missing[start : start + chunk_size]
            plan[chunk_id_for(part, versions)] = part
        return plan

    def gather(self, wanted_mids: Wanted, order: Sequence[str], sink: RowSink, *, unit: bool = False) -> Gathered:
        """Stream the features of the wanted mids (at their wanted version) into ``sink``, row i
        holding ``order[i]``, one chunk in memory at a time; rows that failed or that no readable
        registered chunk holds are left out (the sink is compacted). ``unit=True`` stores
        L2-normalised rows. Which chunks to read comes from the manifest, never from payloads."""
        wanted = _versions(wanted_mids)
        position = {mid: i for i, mid in enumerate(order)}
        holders = [cid for cid, entries in sorted(self.manifest().items())
                   if any(mid in wanted and wanted[mid] == version for mid, version in entries)]
        written = np.zeros(len(order), dtype=bool)
        failed: dict[str, str] = {}
        dim: int | None = None
        for chunk_id in holders:
            chunk = self.read(chunk_id)
            if chunk is None:
                self.unreadable.add(chunk_id)
                continue
            if dim is None:
                dim = chunk.features.shape[1]
                sink.open(len(order), dim)
            elif chunk.features.shape[1] != dim:
                raise BadInputError(f"{self.path(chunk_id)} holds {chunk.features.shape[1]}-d features, the other "
                                    f"chunks of {self.backbone_key} {dim}-d: move it away and extract it again")
            rows = [(position[m], i) for i, m in enumerate(chunk.mids)
                    if m in position and chunk.versions.get(m, "") == wanted.get(m) and not written[position[m]]]
            if rows:
                rows.sort()
                targets = np.array([p for p, _ in rows], dtype=np.int64)
                block = chunk.features[[i for _, i in rows]]
                sink.put(targets, normalise(block) if unit else block)
                written[targets] = True
            failed.update({m: r for m, r in chunk.failed.items()
                           if m in wanted and chunk.versions.get(m, "") == wanted[m]})
        if dim is None:
            sink.open(len(order), 0)
        keep = np.flatnonzero(written)
        if len(keep) < len(order):
            sink.compact(keep)
        mids = [order[i] for i in keep.tolist()]
        have = set(mids)
        failed = {m: failed[m] for m in sorted(failed) if m not in have}
        return Gathered(mids, failed, sorted(set(wanted) - have - set(failed)))

    def load_features(self, wanted_mids: Wanted) -> tuple[list[str], np.ndarray, dict[str, str]]:
        """Features of the wanted mids (sorted), in memory, at their wanted thumbnail version, and
        the failures recorded for them; entries of another version are never read."""
        wanted = _versions(wanted_mids)
        sink = MemoryRows()
        result = self.gather(wanted, sorted(wanted), sink)
        return result.mids, sink.array, result.failed


@dataclass
class Gathered:
    mids: list[str]  # the sink's rows, in the caller's order
    failed: dict[str, str]  # wanted mids whose thumbnail could not be read: mid -> reason
    missing: list[str]  # wanted mids that no readable registered chunk settled


class RowSink:
    """Where :meth:`ChunkStore.gather` puts rows: ``open`` once, ``put`` rows at positions,
    ``compact`` to the kept positions (ascending) at the end."""

    def open(self, rows: int, dim: int) -> None:
        raise NotImplementedError

    def put(self, positions: np.ndarray, block: np.ndarray) -> None:
        raise NotImplementedError

    def compact(self, keep: np.ndarray) -> None:
        raise NotImplementedError


COMPACT_ROWS = 65536


class MemoryRows(RowSink):
    """One float32 matrix in memory (compacted in place, block by block: no second copy)."""

    array: np.ndarray = np.zeros((0, 0), np.float32)

    def open(self, rows: int, dim: int) -> None:
        self.array = np.zeros((rows, dim), np.float32)

    def put(self, positions: np.ndarray, block: np.ndarray) -> None:
        self.array[positions] = block

    def compact(self, keep: np.ndarray) -> None:
        for start in range(0, len(keep), COMPACT_ROWS):  # keep[j] >= j: sources are never overwritten early
            part = keep[start:start + COMPACT_ROWS]
            self.array[start:start + len(part)] = self.array[part]
        self.array = self.array[:len(keep)]


class NpyFileRows(RowSink):
    """A float32 ``.npy`` file written in place with ``pwrite``: the matrix never sits in memory
    (nor in the page tables, as a memory map's dirty pages would), whatever N is."""

    HEADER_BYTES = 128  # fixed, so a compaction rewrites the shape in place

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self.shape = (0, 0)

    def _header(self) -> bytes:
        text = repr({"descr": "<f4", "fortran_order": False, "shape": self.shape}).encode("latin1")
        pad = self.HEADER_BYTES - 10 - len(text) - 1
        return b"\x93NUMPY\x01\x00" + (self.HEADER_BYTES - 10).to_bytes(2, "little") + text + b" " * pad + b"\n"

    def open(self, rows: int, dim: int) -> None:
        self.shape = (rows, dim)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, self._header(), 0)
        os.ftruncate(self._fd, self.HEADER_BYTES + rows * dim * 4)

    def put(self, positions: np.ndarray, block: np.ndarray) -> None:
        data = np.ascontiguousarray(block, dtype="<f4")
        row_bytes = self.shape[1] * 4
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1  # contiguous runs: one pwrite each
        for run_rows, run in zip(np.split(positions, breaks), np.split(data, breaks), strict=True):
            os.pwrite(self._fd, run.tobytes(), self.HEADER_BYTES + int(run_rows[0]) * row_bytes)

    def compact(self, keep: np.ndarray) -> None:
        row_bytes = self.shape[1] * 4
        for target, source in enumerate(keep.tolist()):
            if target != source:
                os.pwrite(self._fd, os.pread(self._fd, row_bytes, self.HEADER_BYTES + source * row_bytes),
                          self.HEADER_BYTES + target * row_bytes)
        self.shape = (len(keep), self.shape[1])
        os.pwrite(self._fd, self._header(), 0)
        os.ftruncate(self._fd, self.HEADER_BYTES + len(keep) * row_bytes)

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
