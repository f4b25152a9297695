"""Extraction of one chunk: decoding overlapped with the backbone, then a checkpoint."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from recsketch.errors import BadImageError
from recsketch.features.backbones import Backbone
from recsketch.features.chunks import Chunk, ChunkStore
from recsketch.features.images import decode_image, thumbnail_version
from recsketch.storage import Location, read_many

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
DECODE_THREADS = 2  # batches decoded ahead, in parallel
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class ChunkReport:
    chunk_id: str
    images: int
    failed: int
    seconds: float
    skipped: bool

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def _decode_batch(paths: Sequence[tuple[str, Location]], size: int,
                  preprocess: str) -> tuple[list[str], np.ndarray, dict[str, str], dict[str, str]]:
    """Decode a batch: (mids, images, failures, thumbnail versions of the bytes actually read).
    An object store's thumbnails are fetched in one concurrent batch of GETs."""
    mids: list[str] = []
    images: list[np.ndarray] = []
    failed: dict[str, str] = {}
    versions: dict[str, str] = {}
    contents = read_many([path for _, path in paths])
    for (mid, path), data in zip(paths, contents, strict=True):
        if isinstance(data, FileNotFoundError):
            failed[mid] = f"{path}: thumbnail file is missing"
            continue
        if isinstance(data, Exception):
            raise data  # not the image's fault (disk, network): the task fails and is retried
        versions[mid] = thumbnail_version(data)
        try:
            images.append(decode_image(data, size, str(path), preprocess))
            mids.append(mid)
        except BadImageError as exc:
            failed[mid] = str(exc)
    batch = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return mids, batch, failed, versions


@dataclass(frozen=True)
class _Embedded:
    """One batch, decoded and embedded: the features of ``mids`` (in order) and what failed."""

    mids: list[str]
    features: np.ndarray | None
    failed: dict[str, str]
    versions: dict[str, str]


def lanes_of(backbone: Backbone) -> int:
    """How many batches the backbone embeds at once (1 unless it has single-threaded lanes)."""
    return max(1, int(getattr(backbone, "lanes", 1)))


def _decode_and_embed(backbone: Backbone, batch: Sequence[tuple[str, Location]], preprocess: str) -> _Embedded:
    mids, images, failed, versions = _decode_batch(batch, backbone.input_size, preprocess)
    return _Embedded(mids, backbone.embed(images) if mids else None, failed, versions)


def _in_order(pool: ThreadPoolExecutor, work: Callable[[T], R], items: Sequence[T], ahead: int) -> Iterator[R]:
    """``work`` of each item, yielded in order, with at most ``ahead`` items submitted at once
    (so memory holds that many results, never all of them)."""
    running: deque[Future[R]] = deque(pool.submit(work, item) for item in items[:ahead])
    for index in range(len(items)):
        done = running.popleft().result()
        if index + ahead < len(items):
            running.append(pool.submit(work, items[index + ahead]))
        yield done


def _embedded_batches(backbone: Backbone, batches: Sequence[Sequence[tuple[str, Location]]],
                      preprocess: str) -> Iterator[_Embedded]:
    """Each batch decoded and embedded, yielded in order; at most a few batches in memory.

    A backbone with lanes (the exported runtimes: one core each) gets one worker per lane that
    decodes its batch and then embeds it, so no core waits on another's. Otherwise (torch,
    TensorFlow: every operator split across the cores) ``DECODE_THREADS`` threads decode the
    next batches (PIL releases the GIL while it decodes and resizes) while the backbone embeds
    the current one."""
    lanes = lanes_of(backbone)
    if lanes > 1:
        with ThreadPoolExecutor(lanes, thread_name_prefix="lane") as pool:
            yield from _in_order(pool, lambda batch: _decode_and_embed(backbone, batch, preprocess), batches,
                                 2 * lanes)
        return
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode") as decoder:
        decoded = _in_order(decoder, lambda batch: _decode_batch(batch, backbone.input_size, preprocess), batches,
                            DECODE_THREADS)
        for mids, images, failed, versions in decoded:
            yield _Embedded(mids, backbone.embed(images) if mids else None, failed, versions)


def embed_many(backbone: Backbone, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Decoded batches embedded on every lane at once (how extraction runs the model; for
    measuring a backbone's own speed)."""
    lanes = lanes_of(backbone)
    if lanes == 1:
        return [backbone.embed(batch) for batch in batches]
    with ThreadPoolExecutor(lanes, thread_name_prefix="lane") as pool:
        return list(pool.map(backbone.embed, batches))


def extract_chunk(
    store: ChunkStore,
    backbone: Backbone,
    chunk_id: str,
    mids: Sequence[str],
    thumbnail: Callable[[str], Location],
    batch_size: int = 32,
    progress: Callable[[str], None] = log.info,
    preprocess: str = "crop",
    *,
    checked: bool = False,
) -> ChunkReport:
    """Embed the thumbnails of ``mids`` and write the chunk; an intact chunk is not redone.

    Decoding overlaps inference (:func:`_embedded_batches`), so memory holds a few uint8
    batches, never a whole chunk of images.
    """
    if not checked and store.read(chunk_id) is not None:  # ``checked``: the caller just looked
        progress(f"chunk {chunk_id}: already extracted, skipping")
        return ChunkReport(chunk_id, 0, 0, 0.0, skipped=True)
    started = time.monotonic()
    batches = [[(m, thumbnail(m)) for m in mids[i : i + batch_size]]
               for i in range(0, len(mids), batch_size)]
    done_mids: list[str] = []
    parts: list[np.ndarray] = []
    failed: dict[str, str] = {}
    versions: dict[str, str] = {}
    reported = started
    for index, batch in enumerate(_embedded_batches(backbone, batches, preprocess)):
        versions.update(batch.versions)
        for mid, reason in batch.failed.items():
            log.warning("quarantined %s: %s", mid, reason)
        failed.update(batch.failed)
        if batch.features is not None:
            parts.append(batch.features)
            done_mids.extend(batch.mids)
        now = time.monotonic()
        if now - reported >= PROGRESS_EVERY_S or index + 1 == len(batches):  # a line every few seconds
            reported, elapsed = now, now - started
            seen = min(len(mids), (index + 1) * batch_size)
            rate = seen / elapsed if elapsed else 0.0
            eta = (len(mids) - seen) / rate if rate else 0.0
            progress(f"chunk {chunk_id}: {seen}/{len(mids)} images, {rate:.1f} img/s, ETA {eta:.0f}s")
    features = np.concatenate(parts) if parts else np.zeros((0, backbone.dim), np.float32)
    store.write(Chunk(chunk_id, done_mids, features, failed, store.backbone_key, versions))
    seconds = time.monotonic() - started
    progress(f"chunk {chunk_id}: wrote {len(done_mids)} features, {len(failed)} quarantined, "
             f"{len(mids) / seconds:.1f} img/s")
    return ChunkReport(chunk_id, len(mids), len(failed), seconds, skipped=False)
