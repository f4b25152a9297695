"""The pipeline's stages as plain functions: the CLI and the Airflow DAG both call these.

Stages hand over through the catalogue DB and the typed objects of ``recsketch.contracts``
(objects in the run's folder, ``<data dir>/runs/<run id>/``, on a local disk or an object
store), so each stage can run in its own process or worker, on any host, and be retried
alone. Every stage is idempotent: rerunning it gives the same result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine

from recsketch import files
from recsketch.config import INPUT_SIZE, Settings
from recsketch.contracts import (
    ChunkPlan,
    RunLikes,
    SimilarityPlan,
    TopK,
    TopKStore,
    ValidModels,
    features_file,
    group_tasks,
    read_shards,
    write_shard,
)
from recsketch.crawl import crawl, thumbnail_path
from recsketch.db import store
from recsketch.errors import QualityGateFailed, RecsketchError
from recsketch.evaluation import PRIMARY_METRIC, EvaluationConfig, Likes, evaluate
from recsketch.features.backbones import backbone_key, create_backbone, set_threads
from recsketch.features.chunks import ChunkStore, Gathered, MemoryRows, NpyFileRows, RowSink
from recsketch.features.extract import extract_chunk
from recsketch.features.images import thumbnail_version
from recsketch.hybrid import RidgeFit, fit_als, hybrid_rows
from recsketch.likes import threshold_likes
from recsketch.ratelimit import SharedRateLimiter
from recsketch.similarity import (
    NpyRows,
    merge_new_items,
    normalise,
    recall_at_k,
    reduce_dimensions,
    top_k_cosine,
    top_k_tiled,
)
from recsketch.sketchfab.client import SketchfabClient
from recsketch.storage import Location

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

def new_run_id() -> str:
    return "manual__" + datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def run_dir(settings: Settings, run_id: str) -> Location:
    """The run's folder; the run id is reduced to characters that are safe in a path or key."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._") or "run"
    path = settings.run_dir(safe)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sweep(progress: Progress, *folders: Location) -> None:
    """Drop temp files a killed process left behind (their targets are intact). Local disks
    only: an object store has no temp objects (a killed PUT leaves nothing visible)."""
    for folder in folders:
        if isinstance(folder, Path) and folder.is_dir() and (removed := files.sweep_stale_temps(folder)):
            progress(f"removed {removed} temp files left by a killed process in {folder}")


def crawl_stage(settings: Settings, folder: Location, *, published_since: datetime | None = None,
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


def threshold_stage(settings: Settings, folder: Location, progress: Progress = log.info) -> dict:
    """Models that survive the like threshold and have a thumbnail: the run's item set, each
    with its thumbnail's version (features are keyed by it); and the surviving likes, which
    evaluate and plan_hybrid use."""
    valid, with_thumbnail, likes = valid_models(settings, progress)
    if len(valid) < 2:
        raise RecsketchError(
            f"only {len(valid)} of {with_thumbnail} models with a thumbnail have >= {settings.min_likes} "
            "likes from users with as many: nothing to recommend. Lower the threshold with --min-likes "
            "(RECSKETCH_MIN_LIKES; 0 keeps every model)")
    RunLikes.write(folder, likes)
    ValidModels(valid).write(folder)
    return {"valid_models": len(valid), "with_thumbnail": with_thumbnail, "likes": len(likes)}


def valid_models(settings: Settings, progress: Progress = log.info) -> tuple[dict[str, str], int, pd.DataFrame]:
    """(mid -> thumbnail version of every model that passes the threshold and has a thumbnail,
    how many models have a thumbnail, the likes that survive the threshold)."""
    engine = store.connect(settings.resolved_database_url)
    with_thumbnail = store.models_with_thumbnails(engine)
    likes = store.read_likes_frame(engine)
    if settings.min_likes > 0:
        result = threshold_likes(likes, settings.min_likes)
        progress(result.summary())
        likes = result.likes
        kept = set(result.models)
        valid = [mid for mid in with_thumbnail if mid in kept]
    else:
        progress("threshold: min_likes=0, keeping every model with a thumbnail")
        valid = list(with_thumbnail)
    progress(f"threshold: {len(valid)} models pass the threshold and have a thumbnail")
    return {mid: with_thumbnail[mid] or _file_version(settings, mid) for mid in valid}, len(with_thumbnail), likes


def _file_version(settings: Settings, mid: str) -> str:
    """The version of a thumbnail the DB has none for (stored by an older release)."""
    try:
        return thumbnail_version(thumbnail_path(settings, mid).read_bytes())
    except FileNotFoundError:
        return ""


def plan_stage(settings: Settings, folder: Location, progress: Progress = log.info) -> list[str]:
    """Split the valid models that have no features yet into chunks, and the chunks into at most
    RECSKETCH_MAX_MAPPED_TASKS extract tasks; returns the task ids (what the DAG maps over)."""
    valid = ValidModels.read(folder)
    chunk_store = ChunkStore(settings.features_dir, backbone_key(settings))
    chunks = chunk_store.plan(valid.versions, settings.chunk_size)
    plan = ChunkPlan(chunk_store.backbone_key, chunks, group_tasks(list(chunks), settings.max_mapped_tasks))
    plan.write(folder)
    todo = sum(len(m) for m in plan.chunks.values())
    progress(f"plan: {len(valid)} valid models, {todo} need features, {len(plan.chunks)} chunks "
             f"of up to {settings.chunk_size} for {chunk_store.backbone_key}, in {len(plan.tasks)} extract tasks "
             f"(at most {settings.max_mapped_tasks})")
    return list(plan.tasks)


def extract_stage(settings: Settings, folder: Location, task_id: str, progress: Progress = log.info) -> dict:
    """Extract one planned task's chunks with one backbone (chunks already written are skipped)."""
    plan = ChunkPlan.read(folder)
    chunk_ids = plan.chunks_of(task_id)
    chunk_store = ChunkStore(settings.features_dir, plan.backbone_key)
    _sweep(progress, chunk_store.root)
    set_threads(settings.effective_threads)
    backbone = None
    images = failed = skipped = 0
    seconds = 0.0
    for number, chunk_id in enumerate(chunk_ids, 1):
        if chunk_store.read(chunk_id) is not None:
            progress(f"chunk {chunk_id} ({number}/{len(chunk_ids)}): already extracted, skipping")
            skipped += 1
            continue
        backbone = backbone or create_backbone(settings)  # loaded once per task, only if needed
        report = extract_chunk(chunk_store, backbone, chunk_id, plan.chunks[chunk_id],
                               lambda mid: thumbnail_path(settings, mid), settings.batch_size or backbone.batch_size,
                               progress, settings.preprocess, checked=True)
        images, failed, seconds = images + report.images, failed + report.failed, seconds + report.seconds
    return {"chunk_id": task_id, "chunks": len(chunk_ids), "images": images, "failed": failed,
            "images_per_s": round(images / seconds, 2) if seconds else 0.0, "skipped": skipped == len(chunk_ids)}


def _gather(chunk_store: ChunkStore, valid: ValidModels, order: list[str], sink: RowSink, plan: ChunkPlan | None,
            progress: Progress) -> Gathered:
    """The valid models' unit features streamed into ``sink`` in ``order``, chunk by chunk; a
    model with no features is an error (or, if its registered chunk no longer reads back, that
    chunk is dropped from the manifest so the next plan extracts it again)."""
    gathered = chunk_store.gather(valid.versions, order, sink, unit=True)
    if gathered.missing and plan is not None and chunk_store.unreadable:  # the manifest's writer: mend it
        dropped = chunk_store.forget(chunk_store.unreadable)
        raise RecsketchError(f"{len(gathered.missing)} valid models have no features: {dropped} registered "
                             f"chunks are unreadable and were dropped from {chunk_store.manifest_path}; "
                             "plan and extract again")
    if gathered.missing:
        raise RecsketchError(f"{len(gathered.missing)} valid models have no features yet: run the extract stage")
    for mid, reason in gathered.failed.items():
        progress(f"no recommendations for {mid}: {reason}")
    if len(gathered.mids) < 2:
        raise RecsketchError(f"only {len(gathered.mids)} models have features; similarity needs at least 2")
    return gathered


def plan_similarity_stage(settings: Settings, folder: Location, progress: Progress = log.info) -> list[str]:
    """Incremental or unchanged: computed here, no shards. Full: the run's unit features are
    consolidated into one file, streamed chunk by chunk (memory holds one chunk, whatever N is),
    and the row-block shards to map over it are returned."""
    valid = ValidModels.read(folder)
    chunk_store = ChunkStore(settings.features_dir, backbone_key(settings))
    chunk_plan = _chunk_plan_if_any(folder)
    if chunk_plan is not None:  # the chunks this run extracted join the manifest (its one writer)
        added = chunk_store.register(chunk_plan.chunks)
        progress(f"similarity: {added} new chunks registered in {chunk_store.manifest_path}")
    _sweep(progress, chunk_store.root, folder)
    previous = None if settings.pca_dim else _reusable_previous(chunk_store, settings.top_k, valid.versions)
    if previous is not None:
        topk, mode = _incremental_top_k(chunk_store, previous, valid, chunk_plan, settings.top_k, progress)
        _finish_similarity(chunk_store, folder, topk, exact=True)
        SimilarityPlan(mode).write(folder)
        progress(f"similarity: top-{topk.k} for {len(topk.mids)} models, {mode}")
        return []
    with files.scratch_file(folder, "similarity-features.npy") as scratch:
        sink = NpyFileRows(scratch)
        try:
            mids = _gather(chunk_store, valid, sorted(valid.versions), sink, chunk_plan, progress).mids
        finally:
            sink.close()
        dim = sink.shape[1]
        shards = row_shards(settings, len(mids))
        plan = SimilarityPlan("full", mids, shards=shards)
        if settings.pca_dim:  # one projection for every shard: computed here (in memory), stored with the run
            unit = np.load(scratch)
            reduced = reduce_dimensions(unit, settings.pca_dim)
            sample = (0, min(len(mids), 500))
            recall = recall_at_k(top_k_cosine(unit, settings.top_k, rows=sample)[0],
                                 top_k_cosine(reduced, settings.top_k, rows=sample)[0])
            del unit
            plan = SimilarityPlan(f"full, PCA {dim}->{reduced.shape[1]}-d", mids, round(recall, 4), shards)
            progress(f"similarity: PCA to {reduced.shape[1]}-d keeps recall@{settings.top_k} = {recall:.3f} "
                     f"(measured on {sample[1]} models against the exact top-{settings.top_k})")
            dim = reduced.shape[1]
            files.save_npy(folder / features_file(plan), normalise(reduced, copy=False))
        else:  # the run's features, consolidated once: unit rows that every shard reads block by block
            files.put_file(scratch, folder / features_file(plan))
    plan.write(folder)
    progress(f"similarity: full top-{settings.top_k} for {len(mids)} models ({dim}-d) "
             f"in {len(shards)} shards of up to {shards[0][1] - shards[0][0]} rows")
    return [f"{first}-{last}" for first, last in shards]


def row_shards(settings: Settings, rows: int) -> list[tuple[int, int]]:
    """Row blocks [first, last) for the mapped shard tasks: at most RECSKETCH_MAX_MAPPED_TASKS
    of them, so blocks grow with the catalogue."""
    step = max(settings.similarity_shard_rows, -(-rows // settings.max_mapped_tasks))
    return [(first, min(rows, first + step)) for first in range(0, rows, step)]


def _chunk_plan_if_any(folder: Location) -> ChunkPlan | None:
    """The run's chunk plan (absent when similarity runs on chunks made outside a plan)."""
    try:
        return ChunkPlan.read(folder)
    except RecsketchError:
        return None


def similarity_shard_stage(settings: Settings, folder: Location, shard: str, progress: Progress = log.info) -> dict:
    """One row block of the full visual top-k (:func:`_top_k_shard`)."""
    return _top_k_shard(settings, folder, shard, "visual", progress)


def _top_k_shard(settings: Settings, folder: Location, shard: str, method: str, progress: Progress) -> dict:
    """One row block of a full top-k: rows first..last against every model, read block by block
    from the plan's consolidated unit rows (copied to local scratch first when the data dir is
    an object store), in tiles: memory stays a few hundred MB whatever N is."""
    first, last = (int(part) for part in shard.split("-"))
    plan = SimilarityPlan.read(folder, method)
    order = plan.ordered_mids()
    if (first, last) not in plan.shards:
        raise RecsketchError(f"rows {shard} are not a shard of the {method} plan in {folder}")
    started = time.monotonic()
    set_threads(settings.effective_threads)
    with files.local_copy(folder / features_file(plan)) as path:
        unit = NpyRows(path)  # blocks read on demand and freed: RSS holds a block, not the file
        try:
            if unit.shape[0] != len(order):
                raise RecsketchError(f"{folder / features_file(plan)} has {unit.shape[0]} rows, the "
                                     f"plan {len(order)}: run plan_{plan.name} again")
            indices, scores = top_k_tiled(unit, settings.top_k, (first, last))
        finally:
            unit.close()
    write_shard(folder, plan, first, last, indices, scores)
    progress(f"{plan.name} shard {shard}: {last - first} rows x {len(order)} models "
             f"in {time.monotonic() - started:.1f}s")
    return {"shard": shard, "rows": last - first}


def merge_similarity_stage(settings: Settings, folder: Location, progress: Progress = log.info) -> dict:
    """Join the shards (if the run was full) into the run's top-k and the backbone's latest."""
    chunk_store = ChunkStore(settings.features_dir, backbone_key(settings))
    plan = SimilarityPlan.read(folder)
    shards = 0
    if plan.sharded:
        order = plan.ordered_mids()
        shards, indices, scores = read_shards(folder, plan)
        if len(indices) != len(order):
            raise RecsketchError(f"{shards} shards cover {len(indices)} of {len(order)} rows: "
                                 "a shard is missing, run the similarity shards again")
        versions = ValidModels.read(folder).versions
        topk = TopK(order, indices, scores, chunk_store.backbone_key, [versions.get(m, "") for m in order])
        _finish_similarity(chunk_store, folder, topk, exact=not plan.reduced)
    result = TopKStore.for_run(folder).require("similarity")
    n, k = len(result.mids), result.k
    progress(f"similarity: top-{k} for {n} models ready ({plan.mode}{f', {shards} shards' if shards else ''})")
    summary: dict[str, object] = {"models": n, "k": k, "mode": plan.mode, "shards": shards}
    if plan.recall_at_k is not None:
        summary["recall_at_k"] = plan.recall_at_k
    return summary


def similarity_stage(settings: Settings, folder: Location, progress: Progress = log.info) -> dict:
    """The whole similarity step in this process (``recsketch run`` / ``recsketch similarity``)."""
    for shard in plan_similarity_stage(settings, folder, progress):
        similarity_shard_stage(settings, folder, shard, progress)
    return merge_similarity_stage(settings, folder, progress)


def _finish_similarity(chunk_store: ChunkStore, folder: Location, topk: TopK, exact: bool) -> None:
    """The run's top-k; and, for exact runs, the backbone's latest, the base of the next
    incremental run. A PCA result never becomes that base."""
    TopKStore.for_run(folder).write(topk)
    if exact:
        TopKStore.latest(chunk_store.root).write(topk)


def _reusable_previous(chunk_store: ChunkStore, k: int, versions: dict[str, str]) -> TopK | None:
    """The backbone's last exact result, if it still holds: same k, no model gone, every old
    model's thumbnail unchanged (so its features, and its neighbours among old models, are too)."""
    previous = TopKStore.latest(chunk_store.root).read()
    if previous is None or previous.backbone_key != chunk_store.backbone_key:
        return None
    if previous.k != k or len(previous.mids) < 2 or not set(previous.mids) <= set(versions):
        return None
    if [versions.get(mid, "") for mid in previous.mids] != previous.versions:
        return None
    return previous


def _incremental_top_k(chunk_store: ChunkStore, previous: TopK, valid: ValidModels, chunk_plan: ChunkPlan | None,
                       k: int, progress: Progress) -> tuple[TopK, str]:
    """New×all merged into the previous result. Memory holds one copy of the unit features
    (old rows first, then new ones), gathered chunk by chunk."""
    new = sorted(set(valid.versions) - set(previous.mids))
    if not new:
        return previous, "unchanged (reused)"
    sink = MemoryRows()
    gathered = _gather(chunk_store, valid, previous.mids + new, sink, chunk_plan, progress)
    order = gathered.mids  # the old models all have features (their versions are unchanged)
    if len(order) == len(previous.mids):
        return previous, "unchanged (reused; the new models have no features)"
    indices, scores = merge_new_items(sink.array, len(previous.mids), previous.indices, previous.scores, k,
                                      normalised=True)
    topk = TopK(order, indices, scores, chunk_store.backbone_key, [valid.versions.get(m, "") for m in order])
    return topk, f"incremental ({len(order) - len(previous.mids)} new x {len(order)})"


EVALUATION_FILE = "evaluation.json"


def _run_likes(settings: Settings, folder: Location, progress: Progress) -> pd.DataFrame:
    """The likes the run was thresholded on (saved by threshold); for a run made before they were
    saved, the catalogue's likes thresholded again."""
    likes = RunLikes.read(folder)
    if likes is None:
        progress(f"{folder} has no saved likes (an older run): reading and thresholding the catalogue's likes")
        likes = _thresholded_likes(settings)
    return likes


def _thresholded_likes(settings: Settings) -> pd.DataFrame:
    """The catalogue's likes now, thresholded as a run's are (RECSKETCH_MIN_LIKES)."""
    likes = store.read_likes_frame(store.connect(settings.resolved_database_url))
    return threshold_likes(likes, settings.min_likes).likes if settings.min_likes > 0 else likes


def evaluate_catalogue(settings: Settings, versions: dict[str, str], progress: Progress = log.info,
                       config: EvaluationConfig | None = None, likes: pd.DataFrame | None = None) -> dict:
    """Every method's offline metrics on thresholded likes (``likes``, else the catalogue's now),
    over the given models (mid -> thumbnail version) with their features (``recsketch.evaluation``)."""
    likes = _thresholded_likes(settings) if likes is None else likes
    mids, features, _ = ChunkStore(settings.features_dir, backbone_key(settings)).load_features(versions)
    if len(mids) < 2:
        raise RecsketchError(f"only {len(mids)} models have features: nothing to evaluate; run the pipeline first")
    config = config or EvaluationConfig(max_users=settings.eval_max_users, threads=settings.effective_threads)
    return evaluate(Likes.from_frame(likes, mids), normalise(features, copy=False), config, progress)


def evaluate_stage(settings: Settings, folder: Location, progress: Progress = log.info,
                   config: EvaluationConfig | None = None) -> dict:
    """The run's models measured on held-out likes; the report is stored with the run for load
    (its quality gate, ``run_metrics``) and the gallery."""
    report = evaluate_catalogue(settings, ValidModels.read(folder).versions, progress, config,
                                likes=_run_likes(settings, folder, progress))
    files.write_text(folder / EVALUATION_FILE, json.dumps(report, indent=1))
    method, metric = PRIMARY_METRIC
    summary = {f"{name}_{metric}": values[metric] for name, values in report["methods"].items()}
    summary["primary"] = f"{method} {metric} = {report['methods'][method][metric]}"
    return summary


def plan_hybrid_stage(settings: Settings, folder: Location, progress: Progress = log.info) -> list[str]:
    """The hybrid embedding (``recsketch.hybrid``) of the run's models, written once as unit rows
    for row-block shards, as the visual neighbours are: ALS item factors of the thresholded
    likes, blended with the visual features at the CF weight evaluate tuned. Memory holds the
    factors (N x 64) and a block of features, never N x d: the features stream from the
    visual plan's consolidated file (or the chunks) twice, once to fit the cold-start ridge map
    and once to write the rows. No shards (and no hybrid set) when evaluate tuned no weight."""
    try:
        report = json.loads((folder / EVALUATION_FILE).read_text())
    except FileNotFoundError:
        raise RecsketchError(f"{folder / EVALUATION_FILE} is missing: run the evaluate stage first") from None
    weight = (report.get("hybrid") or {}).get("cf_weight")
    if weight is None:
        SimilarityPlan("none", method="hybrid").write(folder)
        progress("hybrid: the evaluation tuned no CF weight (too few models for a cold-start split): no hybrid set")
        return []
    visual = TopKStore.for_run(folder).require("similarity")
    started = time.monotonic()
    matrix = Likes.from_frame(_run_likes(settings, folder, progress), visual.mids).matrix()
    set_threads(settings.effective_threads)
    _, item_factors = fit_als(matrix, threads=settings.effective_threads)
    liked = np.asarray(matrix.sum(axis=0)).ravel() > 0
    del matrix
    progress(f"hybrid: ALS factors for {len(visual.mids)} models ({int(liked.sum())} liked) "
             f"in {time.monotonic() - started:.1f}s")
    shards = row_shards(settings, len(visual.mids))
    plan = SimilarityPlan(f"full, CF weight {weight}", visual.mids, shards=shards, method="hybrid")
    with _visual_unit_rows(settings, folder, visual) as source, \
            files.scratch_file(folder, "hybrid-features.npy") as scratch:
        unit = NpyRows(source)
        sink = NpyFileRows(scratch)
        try:
            blocks = [(first, min(len(visual.mids), first + HYBRID_BLOCK_ROWS))
                      for first in range(0, len(visual.mids), HYBRID_BLOCK_ROWS)]
            fit = RidgeFit(unit.shape[1], item_factors.shape[1])
            for first, last in blocks:  # pass 1: the cold-start map, fitted on the liked models
                keep = liked[first:last]
                fit.add(unit[first:last][keep], normalise(item_factors[first:last][keep]))
            mapping = None if liked.all() else fit.solve()
            sink.open(len(visual.mids), unit.shape[1] + item_factors.shape[1])
            for first, last in blocks:  # pass 2: the rows
                sink.put(np.arange(first, last), hybrid_rows(unit[first:last], item_factors[first:last],
                                                             liked[first:last], mapping, float(weight)))
        finally:
            unit.close()
            sink.close()
        files.put_file(scratch, folder / features_file(plan))
    plan.write(folder)
    progress(f"hybrid: {len(visual.mids)} models embedded (CF weight {weight}, {int((~liked).sum())} without "
             f"likes given predicted factors) in {time.monotonic() - started:.1f}s; {len(shards)} shards")
    return [f"{first}-{last}" for first, last in shards]


HYBRID_BLOCK_ROWS = 16_384  # features read per step: 80 MB at 1,280-d


@contextlib.contextmanager
def _visual_unit_rows(settings: Settings, folder: Location, visual: TopK) -> Iterator[Path]:
    """The run's unit visual features in ``visual.mids`` order, as a local ``.npy``: the visual
    plan's consolidated file when the run made one at full dimension, else gathered from the
    chunks (incremental and PCA runs)."""
    plan = SimilarityPlan.read(folder)
    if plan.sharded and not plan.reduced and plan.ordered_mids() == visual.mids:
        with files.local_copy(folder / features_file(plan)) as path:
            yield path
        return
    versions = (dict(zip(visual.mids, visual.versions, strict=True)) if visual.versions
                else dict.fromkeys(visual.mids, ""))
    with files.scratch_file(folder, "hybrid-visual.npy") as scratch:
        sink = NpyFileRows(scratch)
        try:
            gathered = ChunkStore(settings.features_dir, visual.backbone_key).gather(versions, visual.mids, sink,
                                                                                     unit=True)
        finally:
            sink.close()
        if gathered.mids != visual.mids:
            raise RecsketchError(f"the features of {len(gathered.mids)} models were found for {len(visual.mids)} "
                                 "neighbour lists: run similarity again")
        yield scratch


def hybrid_shard_stage(settings: Settings, folder: Location, shard: str, progress: Progress = log.info) -> dict:
    """One row block of the hybrid top-k, over the embedding plan_hybrid wrote."""
    return _top_k_shard(settings, folder, shard, "hybrid", progress)


def merge_hybrid_stage(settings: Settings, folder: Location, progress: Progress = log.info) -> dict:
    """Join the hybrid shards into the run's hybrid neighbours (``topk-hybrid.npz``)."""
    plan = SimilarityPlan.read(folder, "hybrid")
    if not plan.sharded:
        return {"models": 0, "cf_weight": None}
    visual = TopKStore.for_run(folder).require("similarity")
    order = plan.ordered_mids()
    if order != visual.mids:
        raise RecsketchError(f"the hybrid plan in {folder} is for other models than the visual neighbours: "
                             "run plan_hybrid again")
    shards, indices, scores = read_shards(folder, plan)
    if len(indices) != len(order):
        raise RecsketchError(f"{shards} shards cover {len(indices)} of {len(order)} rows: "
                             "a shard is missing, run the hybrid shards again")
    TopKStore.for_run(folder, "hybrid").write(TopK(order, indices, scores, visual.backbone_key, visual.versions))
    weight = json.loads((folder / EVALUATION_FILE).read_text())["hybrid"]["cf_weight"]
    progress(f"hybrid: top-{indices.shape[1]} for {len(order)} models ready ({shards} shards, CF weight {weight})")
    return {"models": len(order), "cf_weight": weight, "shards": shards}


def hybrid_stage(settings: Settings, folder: Location, progress: Progress = log.info) -> dict:
    """The whole hybrid step in this process (``recsketch run`` / ``recsketch hybrid``)."""
    for shard in plan_hybrid_stage(settings, folder, progress):
        hybrid_shard_stage(settings, folder, shard, progress)
    return merge_hybrid_stage(settings, folder, progress)


def _metric_rows(report: dict) -> list[dict]:
    rows = [{"method": method, "metric": metric, "split": "warm", "value": float(value)}
            for method, values in report.get("methods", {}).items() for metric, value in values.items()]
    rows += [{"method": method, "metric": metric, "split": "cold_start", "value": float(value)}
             for method, values in report.get("cold_start", {}).items() for metric, value in values.items()]
    return rows


def quality_gate(settings: Settings, engine: Engine, report: dict | None, run_id: str, force: bool) -> str:
    """Refuse a run whose primary metric falls below RECSKETCH_GATE_MIN_RATIO x the live run's;
    returns what was decided, for the log."""
    method, metric = PRIMARY_METRIC
    if report is None:
        return "gate: the run was not evaluated; loaded without a gate"
    new = report["methods"].get(method, {}).get(metric)
    live = store.live_metric(engine, method, metric)
    if new is None or live is None or settings.gate_min_ratio <= 0:
        return f"gate: nothing to compare with (this run {method} {metric} = {new}); loaded"
    live_run, old = live
    floor = settings.gate_min_ratio * old
    verdict = (f"run {run_id} has {method} {metric} = {new:.4f}, the live run {live_run} {old:.4f} "
               f"(floor {settings.gate_min_ratio} x {old:.4f} = {floor:.4f})")
    if new >= floor:
        return f"gate: passed: {verdict}"
    if force:
        return f"gate: FAILED but forced: {verdict}; loaded because force is set"
    raise QualityGateFailed(f"quality gate: {verdict}: not loaded, {live_run} stays served. Rerun load with the "
                            "param force=true (or RECSKETCH_GATE_MIN_RATIO=0) to serve it anyway")


def load_stage(settings: Settings, folder: Location, run_id: str, progress: Progress = log.info,
               force: bool = False) -> dict:
    """Replace the served recommendations with this run's, atomically, if the run passes the
    quality gate; its metrics are stored in the same transaction."""
    topk = TopKStore.for_run(folder).require("similarity")
    engine = store.connect(settings.resolved_database_url)
    try:
        report = json.loads((folder / EVALUATION_FILE).read_text())
    except FileNotFoundError:
        report = None
    progress(quality_gate(settings, engine, report, run_id, force))
    hybrid = TopKStore.for_run(folder, "hybrid").read()
    if hybrid is not None and (hybrid.mids != topk.mids or hybrid.k != topk.k):
        raise RecsketchError(f"the run's hybrid neighbours ({len(hybrid.mids)} models, top-{hybrid.k}) are not of its "
                             f"visual ones ({len(topk.mids)} models, top-{topk.k}): run evaluate and hybrid again")
    store.load_recommendations(engine, run_id, topk.backbone_key, topk.k, topk,  # streamed from the arrays
                               metrics=_metric_rows(report) if report else (),
                               more={"hybrid": hybrid} if hybrid is not None else None)
    rows = len(topk.mids) * topk.k * (2 if hybrid is not None else 1)
    progress(f"load: {rows} recommendations ({'visual and hybrid' if hybrid is not None else 'visual'}) for "
             f"{len(topk.mids)} models are live as run {run_id}")
    summary: dict = {"rows": rows, "models": len(topk.mids), "run_id": run_id}
    if report:
        method, metric = PRIMARY_METRIC
        summary[f"{method}_{metric}"] = report["methods"][method][metric]
    return summary


def run_pipeline(settings: Settings, run_id: str | None = None, progress: Progress = log.info) -> dict:
    """Every stage in order, in this process: ``recsketch run``."""
    run_id = run_id or new_run_id()
    folder = run_dir(settings, run_id)
    summary: dict = {"run_id": run_id, "crawl": crawl_stage(settings, folder, progress=progress),
                     "threshold": threshold_stage(settings, folder, progress)}
    chunk_ids = plan_stage(settings, folder, progress)
    summary["extract"] = [extract_stage(settings, folder, c, progress) for c in chunk_ids]
    summary["similarity"] = similarity_stage(settings, folder, progress)
    summary["evaluate"] = evaluate_stage(settings, folder, progress)
    summary["hybrid"] = hybrid_stage(settings, folder, progress)
    summary["load"] = load_stage(settings, folder, run_id, progress)
    return summary
