"""The pipeline's stages as plain functions: the CLI and the Airflow DAG both call these.

Stages hand over through the catalogue DB and files in the run's folder
(``<data dir>/runs/<run id>/``), so each stage can run in its own process or worker and be
retried alone. Every stage is idempotent: rerunning it gives the same result.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from recsketch import files
from recsketch.config import INPUT_SIZE, Settings
from recsketch.crawl import crawl, thumbnail_path
from recsketch.db import store
from recsketch.errors import RecsketchError
from recsketch.features.backbones import backbone_key, create_backbone
from recsketch.features.chunks import ChunkStore
from recsketch.features.extract import extract_chunk
from recsketch.features.images import thumbnail_version
from recsketch.likes import threshold_likes
from recsketch.ratelimit import SharedRateLimiter
from recsketch.similarity import merge_new_items, normalise, recall_at_k, reduce_dimensions, top_k_cosine
from recsketch.sketchfab.client import SketchfabClient

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

VALID_MODELS_FILE = "valid_models.json"
PLAN_FILE = "chunk_plan.json"
TOPK_FILE = "topk.npz"
LATEST_TOPK_FILE = "topk-latest-exact.npz"  # beside the backbone's chunks; exact runs only
SIMILARITY_PLAN_FILE = "similarity_plan.json"
SHARD_PREFIX = "similarity-shard-"
REDUCED_FEATURES_FILE = "similarity_features.npy"  # PCA-reduced, when RECSKETCH_PCA_DIM is set


def new_run_id() -> str:
    return "manual__" + datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def run_dir(settings: Settings, run_id: str) -> Path:
    """The run's folder; the run id is reduced to characters that are safe in a path."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._") or "run"
    path = settings.run_dir(safe)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_json(path: Path, payload: object) -> None:
    files.write_text(path, json.dumps(payload, indent=1, default=str))


def _read_json(path: Path, stage: str) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RecsketchError(f"{path} is missing: run the {stage} stage first") from None


def _sweep(progress: Progress, *folders: Path) -> None:
    """Drop temp files a killed process left behind (their targets are intact)."""
    for folder in folders:
        if folder.is_dir() and (removed := files.sweep_stale_temps(folder)):
            progress(f"removed {removed} temp files left by a killed process in {folder}")


def crawl_stage(settings: Settings, folder: Path, *, published_since: datetime | None = None,
                published_before: datetime | None = None, progress: Progress = log.info,
                now: datetime | None = None) -> dict:
    """Crawl the API into the catalogue DB and the thumbnail store, within the deployment's one
    request budget (RECSKETCH_RATE_LIMIT, shared through the catalogue DB by every worker)."""
    engine = store.connect(settings.resolved_database_url)
    _sweep(progress, settings.thumbs_dir, folder)
    rate = settings.effective_rate_limit
    client = SketchfabClient(settings.sketchfab_url, settings.likes_base_url, settings.sketchfab_token,
                             retries=settings.http_retries, pool_size=settings.crawl_workers * 2,
                             retry_after_max=settings.retry_after_max_s,
                             limiter=SharedRateLimiter(engine, rate) if rate else None,
                             thumbnail_hosts=settings.allowed_thumbnail_hosts,
                             thumbnail_min_side=INPUT_SIZE,
                             allow_private_addresses=settings.allow_private_addresses)
    try:
        stats = crawl(settings, engine, client, published_since=published_since,
                      published_before=published_before, run_dir=folder, progress=progress, now=now)
    finally:
        client.close()
    return {k: v for k, v in stats.as_dict().items() if k != "problems"}


def threshold_stage(settings: Settings, folder: Path, progress: Progress = log.info) -> dict:
    """Models that survive the like threshold and have a thumbnail: the run's item set, each
    with its thumbnail's version (features are keyed by it)."""
    engine = store.connect(settings.resolved_database_url)
    with_thumbnail = store.models_with_thumbnails(engine)
    if settings.min_likes > 0:
        result = threshold_likes(store.read_likes(engine), settings.min_likes)
        progress(result.summary())
        kept = set(result.models)
        valid = [mid for mid in with_thumbnail if mid in kept]
    else:
        progress("threshold: min_likes=0, keeping every model with a thumbnail")
        valid = list(with_thumbnail)
    progress(f"threshold: {len(valid)} models pass the threshold and have a thumbnail")
    if len(valid) < 2:
        raise RecsketchError(
            f"only {len(valid)} of {len(with_thumbnail)} models with a thumbnail have >= {settings.min_likes} "
            "likes from users with as many: nothing to recommend. Lower the threshold with --min-likes "
            "(RECSKETCH_MIN_LIKES; 0 keeps every model)")
    _write_json(folder / VALID_MODELS_FILE, {mid: with_thumbnail[mid] or _file_version(settings, mid)
                                             for mid in valid})
    return {"valid_models": len(valid), "with_thumbnail": len(with_thumbnail)}


def _file_version(settings: Settings, mid: str) -> str:
    """The version of a thumbnail the DB has none for (stored by an older release)."""
    try:
        return thumbnail_version(thumbnail_path(settings, mid).read_bytes())
    except FileNotFoundError:
        return ""


def plan_stage(settings: Settings, folder: Path, progress: Progress = log.info) -> list[str]:
    """Split the valid models that have no features yet into chunks; returns the chunk ids."""
    valid = _valid_models(folder)
    chunk_store = ChunkStore(settings.features_dir, backbone_key(settings))
    plan = chunk_store.plan(valid, settings.chunk_size)
    _write_json(folder / PLAN_FILE, {"backbone_key": chunk_store.backbone_key, "chunks": plan})
    todo = sum(len(m) for m in plan.values())
    progress(f"plan: {len(valid)} valid models, {todo} need features, {len(plan)} chunks "
             f"of up to {settings.chunk_size} for {chunk_store.backbone_key}")
    return sorted(plan)


def extract_stage(settings: Settings, folder: Path, chunk_id: str, progress: Progress = log.info) -> dict:
    """Extract one planned chunk (a no-op if the chunk is already written)."""
    plan = _read_json(folder / PLAN_FILE, "plan")
    chunks = plan["chunks"]  # type: ignore[index]
    if chunk_id not in chunks:
        raise RecsketchError(f"chunk {chunk_id!r} is not in the plan {folder / PLAN_FILE}")
    chunk_store = ChunkStore(settings.features_dir, plan["backbone_key"])  # type: ignore[index]
    _sweep(progress, chunk_store.root)
    if chunk_store.read(chunk_id) is not None:
        progress(f"chunk {chunk_id}: already extracted, skipping")
        return {"chunk_id": chunk_id, "skipped": True}
    backbone = create_backbone(settings)
    report = extract_chunk(chunk_store, backbone, chunk_id, chunks[chunk_id],
                           lambda mid: thumbnail_path(settings, mid), settings.batch_size or backbone.batch_size,
                           progress, settings.preprocess)
    return {"chunk_id": chunk_id, "images": report.images, "failed": report.failed,
            "images_per_s": round(report.images_per_s, 2), "skipped": report.skipped}


def _valid_models(folder: Path) -> dict[str, str]:
    """The threshold's models with their thumbnail versions (a plain list: unversioned)."""
    valid = _read_json(folder / VALID_MODELS_FILE, "threshold")
    return dict(valid) if isinstance(valid, dict) else dict.fromkeys(valid, "")  # type: ignore[call-overload]


def _valid_features(settings: Settings, folder: Path, progress: Progress) -> tuple[ChunkStore, list[str], np.ndarray]:
    valid = _valid_models(folder)
    chunk_store = ChunkStore(settings.features_dir, backbone_key(settings))
    mids, features, failed = chunk_store.load_features(valid)
    missing = len(valid) - len(mids) - len(failed)
    if missing:
        raise RecsketchError(f"{missing} valid models have no features yet: run the extract stage")
    for mid, reason in sorted(failed.items()):
        progress(f"no recommendations for {mid}: {reason}")
    if len(mids) < 2:
        raise RecsketchError(f"only {len(mids)} models have features; similarity needs at least 2")
    return chunk_store, mids, features


def plan_similarity_stage(settings: Settings, folder: Path, progress: Progress = log.info) -> list[str]:
    """Incremental or unchanged: computed here, no shards. Full: the row-block shards to map."""
    chunk_store, mids, features = _valid_features(settings, folder, progress)
    _sweep(progress, chunk_store.root, folder)
    latest = chunk_store.root / LATEST_TOPK_FILE
    for stale in folder.glob(f"{SHARD_PREFIX}*.npz"):
        stale.unlink()
    versions = _valid_models(folder)
    increment = None if settings.pca_dim else _incremental_top_k(latest, mids, features, settings.top_k, versions)
    if increment is not None:
        order, indices, scores, mode = increment
        _finish_similarity(chunk_store, folder, order, indices, scores, settings.top_k, versions)
        _write_json(folder / SIMILARITY_PLAN_FILE, {"mode": mode, "mids": None})
        progress(f"similarity: top-{indices.shape[1]} for {len(order)} models, {mode}")
        return []
    plan: dict = {"mode": "full", "mids": mids}
    if settings.pca_dim:  # one projection for every shard: computed here, stored with the run
        reduced = reduce_dimensions(features, settings.pca_dim)
        sample = (0, min(len(mids), 500))
        recall = recall_at_k(top_k_cosine(features, settings.top_k, rows=sample)[0],
                             top_k_cosine(reduced, settings.top_k, rows=sample)[0])
        files.save_npy(folder / REDUCED_FEATURES_FILE, reduced)
        plan.update(mode=f"full, PCA {features.shape[1]}->{reduced.shape[1]}-d", recall_at_k=round(recall, 4))
        progress(f"similarity: PCA to {reduced.shape[1]}-d keeps recall@{settings.top_k} = {recall:.3f} "
                 f"(measured on {sample[1]} models against the exact top-{settings.top_k})")
    _write_json(folder / SIMILARITY_PLAN_FILE, plan)
    step = settings.similarity_shard_rows
    shards = [f"{first}-{min(len(mids), first + step)}" for first in range(0, len(mids), step)]
    progress(f"similarity: full top-{settings.top_k} for {len(mids)} models ({features.shape[1]}-d) "
             f"in {len(shards)} shards of up to {step} rows")
    return shards


def similarity_shard_stage(settings: Settings, folder: Path, shard: str, progress: Progress = log.info) -> dict:
    """One row block of the full top-k: rows first..last against every model."""
    first, last = (int(part) for part in shard.split("-"))
    plan = _read_json(folder / SIMILARITY_PLAN_FILE, "plan_similarity")
    order = plan["mids"]  # type: ignore[index]
    if "recall_at_k" in plan:  # type: ignore[operator]  # PCA: the plan's snapshot is self-contained
        features = np.load(folder / REDUCED_FEATURES_FILE)
    else:
        _, mids, features = _valid_features(settings, folder, lambda _: None)  # the plan task said it all
        if mids != order:
            raise RecsketchError(f"the features changed since similarity was planned for {folder}; plan it again")
    started = time.monotonic()
    features = normalise(features, copy=False)  # a fresh matrix: no need for a second one
    indices, scores = top_k_cosine(features, settings.top_k, rows=(first, last), normalised=True)
    files.save_npz(folder / f"{SHARD_PREFIX}{first:09d}-{last:09d}.npz", indices=indices, scores=scores)
    progress(f"similarity shard {shard}: {last - first} rows x {len(order)} models "  # type: ignore[arg-type]
             f"in {time.monotonic() - started:.1f}s")
    return {"shard": shard, "rows": last - first}


def merge_similarity_stage(settings: Settings, folder: Path, progress: Progress = log.info) -> dict:
    """Join the shards (if the run was full) into the run's top-k and the backbone's latest."""
    shards = sorted(folder.glob(f"{SHARD_PREFIX}*.npz"))
    chunk_store = ChunkStore(settings.features_dir, backbone_key(settings))
    plan = _read_json(folder / SIMILARITY_PLAN_FILE, "plan_similarity")
    mode = plan["mode"]  # type: ignore[index]
    if mode.startswith("full"):
        order = plan["mids"]  # type: ignore[index]
        if not shards:
            raise RecsketchError(f"no similarity shard results in {folder}: run the similarity shards first")
        index_parts, score_parts = [], []
        for path in shards:
            with np.load(path) as part:
                index_parts.append(part["indices"])
                score_parts.append(part["scores"])
        indices, scores = np.concatenate(index_parts), np.concatenate(score_parts)
        if len(indices) != len(order):  # type: ignore[arg-type]
            raise RecsketchError(f"{len(shards)} shards cover {len(indices)} of {len(order)} rows: "  # type: ignore[arg-type]
                                 "a shard is missing, run the similarity shards again")
        _finish_similarity(chunk_store, folder, order, indices, scores, settings.top_k,  # type: ignore[arg-type]
                           None if "recall_at_k" in plan else _valid_models(folder))  # type: ignore[operator]
    with np.load(folder / TOPK_FILE) as data:
        n, k = data["indices"].shape
    progress(f"similarity: top-{k} for {n} models ready ({mode}{f', {len(shards)} shards' if shards else ''})")
    summary = {"models": int(n), "k": int(k), "mode": mode, "shards": len(shards)}
    if "recall_at_k" in plan:  # type: ignore[operator]
        summary["recall_at_k"] = plan["recall_at_k"]  # type: ignore[index]
    return summary


def similarity_stage(settings: Settings, folder: Path, progress: Progress = log.info) -> dict:
    """The whole similarity step in this process (``recsketch run`` / ``recsketch similarity``)."""
    for shard in plan_similarity_stage(settings, folder, progress):
        similarity_shard_stage(settings, folder, shard, progress)
    return merge_similarity_stage(settings, folder, progress)


def _finish_similarity(chunk_store: ChunkStore, folder: Path, mids: list[str], indices: np.ndarray,
                       scores: np.ndarray, k: int, versions: dict[str, str] | None) -> None:
    """The run's top-k; and, for exact runs (``versions`` given), the backbone's latest, the
    base of the next incremental run. A PCA result never becomes that base."""
    files.save_npz(folder / TOPK_FILE, mids=np.array(mids), indices=indices, scores=scores,
                   backbone=np.array(chunk_store.backbone_key))
    if versions is not None:
        _save_latest(chunk_store.root / LATEST_TOPK_FILE, mids, indices, scores, k, [versions[m] for m in mids])


def _incremental_top_k(latest: Path, mids: list[str], features: np.ndarray, k: int, versions: dict[str, str]
                       ) -> tuple[list[str], np.ndarray, np.ndarray, str] | None:
    """New×all merged into the backbone's last exact result when that one still holds (same k,
    no model gone, every old model's thumbnail unchanged), else None."""
    previous = _load_latest(latest)
    if previous is None:
        return None
    old_mids, old_indices, old_scores, old_k, old_versions = previous
    current = set(mids)
    if old_k != k or not set(old_mids) <= current or len(old_mids) < 2:
        return None
    if any(versions.get(mid, "") != version for mid, version in zip(old_mids, old_versions, strict=True)):
        return None
    new = sorted(current - set(old_mids))
    if not new:
        return old_mids, old_indices, old_scores, "unchanged (reused)"
    row = {mid: i for i, mid in enumerate(mids)}
    order = old_mids + new
    indices, scores = merge_new_items(features[[row[m] for m in order]], len(old_mids), old_indices, old_scores, k)
    return order, indices, scores, f"incremental ({len(new)} new x {len(order)})"


def _load_latest(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, int, list[str]] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return ([str(m) for m in data["mids"]], data["indices"], data["scores"], int(data["k"]),
                    [str(v) for v in data["versions"]])
    except (OSError, KeyError, ValueError):
        return None


def _save_latest(path: Path, mids: list[str], indices: np.ndarray, scores: np.ndarray, k: int,
                 versions: list[str]) -> None:
    """The newest exact top-k of this backbone, the base of the next incremental run (atomic)."""
    files.save_npz(path, mids=np.array(mids), indices=indices, scores=scores, k=np.array(k),
                   versions=np.array(versions, dtype=str))


def load_stage(settings: Settings, folder: Path, run_id: str, progress: Progress = log.info) -> dict:
    """Replace the served recommendations with this run's, atomically."""
    path = folder / TOPK_FILE
    if not path.exists():
        raise RecsketchError(f"{path} is missing: run the similarity stage first")
    with np.load(path, allow_pickle=False) as data:
        mids = [str(m) for m in data["mids"]]
        indices, scores, backbone = data["indices"], data["scores"], str(data["backbone"])
    rows = [(mids[i], rank + 1, mids[int(j)], float(s))
            for i in range(len(mids))
            for rank, (j, s) in enumerate(zip(indices[i], scores[i], strict=True))]
    engine = store.connect(settings.resolved_database_url)
    store.load_recommendations(engine, run_id, backbone, int(indices.shape[1]), rows)
    progress(f"load: {len(rows)} recommendations for {len(mids)} models are live as run {run_id}")
    return {"rows": len(rows), "models": len(mids), "run_id": run_id}


def run_pipeline(settings: Settings, run_id: str | None = None, progress: Progress = log.info) -> dict:
    """Every stage in order, in this process: ``recsketch run``."""
    run_id = run_id or new_run_id()
    folder = run_dir(settings, run_id)
    summary: dict = {"run_id": run_id, "crawl": crawl_stage(settings, folder, progress=progress),
                     "threshold": threshold_stage(settings, folder, progress)}
    chunk_ids = plan_stage(settings, folder, progress)
    summary["extract"] = [extract_stage(settings, folder, c, progress) for c in chunk_ids]
    summary["similarity"] = similarity_stage(settings, folder, progress)
    summary["load"] = load_stage(settings, folder, run_id, progress)
    return summary
