"""Stages 4 and 5b: neighbour lists, one job for every method.

Each method is a :class:`Source` of unit rows. The job is the same for all: ``plan`` asks the
source for its rows (written once, as the plan's features file) or for a result it finished
itself (the visual source's incremental and unchanged runs), ``shard`` computes the exact
top-k of one row block against every row, ``merge`` joins the shards into the run's lists.
A third method is a third source: a ``rows`` that writes its embedding and an ``identity``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from recsketch import storage
from recsketch.config import Settings
from recsketch.contracts import (
    ChunkPlan,
    EvaluationReport,
    Method,
    PlanMode,
    SimilarityPlan,
    TopK,
    TopKStore,
    ValidModels,
)
from recsketch.errors import RecsketchError
from recsketch.evaluation import Likes
from recsketch.features.chunks import ChunkStore, Gathered, NpyFileRows, RowSink
from recsketch.features.keys import backbone_key
from recsketch.hybrid import fit_als, write_embedding
from recsketch.resources import limit_threads
from recsketch.similarity import NpyRows, Refresh, plan_refresh, reduce_measured, refresh_top_k, top_k_tiled
from recsketch.stages.common import Progress, chunk_plan_if_any, log, run_likes, sweep
from recsketch.storage import Location


@dataclass(frozen=True)
class Rows:
    """A source's unit rows, written to the scratch file (the models in row order), for a full
    pass, or for a refresh of the last result (``refresh``) too large to finish at plan time."""

    mids: list[str]
    detail: str = ""
    recall_at_k: float | None = None
    refresh: Refresh | None = None


@dataclass(frozen=True)
class Done:
    """Neighbours the source finished at plan time (``topk``), or none to make (``None``);
    ``rows_written``: the scratch file holds their unit rows, in ``topk.mids`` order."""

    mode: PlanMode
    detail: str
    topk: TopK | None = None
    rows_written: bool = False


class Source(Protocol):
    method: Method

    def rows(self, settings: Settings, folder: Location, scratch: Path, progress: Progress) -> Rows | Done:
        """Write the unit rows of a full pass to ``scratch`` (a local ``.npy``), or finish here."""

    def identity(self, settings: Settings, folder: Location, mids: list[str]) -> tuple[str, list[str]]:
        """(backbone key, thumbnail versions of ``mids``) that the merged lists are stamped with."""

    def publish(self, settings: Settings, folder: Location, topk: TopK, exact: bool) -> None:
        """Store the run's lists (and whatever the method keeps beyond the run)."""

    def summary(self, folder: Location) -> dict[str, object]:
        """What the merge's summary adds for this method."""


def row_shards(settings: Settings, rows: int, work_rows: float | None = None) -> list[tuple[int, int]]:
    """Row blocks [first, last) for the mapped shard tasks: one per RECSKETCH_SIMILARITY_SHARD_ROWS
    rows of full work (``work_rows``: a refresh's work in full rows' worth, default every row),
    at most RECSKETCH_MAX_MAPPED_TASKS of them, so blocks grow with the catalogue."""
    if work_rows is None:
        step = max(settings.similarity_shard_rows, -(-rows // settings.max_mapped_tasks))
    else:
        count = max(1, min(settings.max_mapped_tasks, int(np.ceil(work_rows / settings.similarity_shard_rows))))
        step = -(-rows // count)
    return [(first, min(rows, first + step)) for first in range(0, rows, step)]


def plan_neighbours(settings: Settings, folder: Location, progress: Progress = log.info, *,
                    method: Method) -> list[str]:
    """The method's plan: its rows written once for the shards (returned, as ``first-last``
    ids), or its lists finished here (no shards)."""
    source = SOURCES[method]
    with storage.scratch_file(folder, f"{method.file_name}-features.npy") as scratch:
        planned = source.rows(settings, folder, scratch, progress)
        if isinstance(planned, Done):
            if planned.topk is not None:
                source.publish(settings, folder, planned.topk, exact=True)
            mids = planned.topk.mids if planned.topk is not None and planned.rows_written else None
            plan = SimilarityPlan(planned.mode, mids, method=method, detail=planned.detail)
            if mids is not None:  # kept for the hybrid step, which would otherwise gather them again
                storage.put_file(scratch, plan.features_path(folder))
            plan.write(folder)
            if planned.topk is not None:
                progress(f"{plan.name}: top-{planned.topk.k} for {len(planned.topk.mids)} models, {plan.label}")
            return []
        refresh = planned.refresh
        shards = row_shards(settings, len(planned.mids), None if refresh is None else refresh.cost * len(planned.mids))
        mode = PlanMode.FULL if refresh is None else PlanMode.INCREMENTAL
        plan = SimilarityPlan(mode, planned.mids, planned.recall_at_k, shards, method, planned.detail)
        if refresh is not None:
            plan.write_refresh(folder, refresh)
        storage.put_file(scratch, plan.features_path(folder))
    plan.write(folder)
    progress(f"{plan.name}: {plan.label} top-{settings.top_k} for {len(planned.mids)} models "
             f"in {len(shards)} shards of up to {shards[0][1] - shards[0][0]} rows")
    return [f"{first}-{last}" for first, last in shards]


def shard_neighbours(settings: Settings, folder: Location, shard: str, progress: Progress = log.info, *,
                     method: Method) -> dict:
    """One row block of a full top-k: rows first..last against every model, read block by block
    from the plan's unit rows (copied to local scratch first when the data dir is an object
    store), in tiles: memory stays a few hundred MB whatever N is."""
    first, last = (int(part) for part in shard.split("-"))
    plan = SimilarityPlan.read(folder, method)
    order = plan.ordered_mids()
    if (first, last) not in plan.shards:
        raise RecsketchError(f"rows {shard} are not a shard of the {method} plan in {folder}")
    started = time.monotonic()
    limit_threads(settings.effective_threads)
    features = plan.features_path(folder)
    with storage.local_copy(features) as path:
        unit = NpyRows(path)  # blocks read on demand and freed: RSS holds a block, not the file
        try:
            if unit.shape[0] != len(order):
                raise RecsketchError(f"{features} has {unit.shape[0]} rows, the plan {len(order)}: "
                                     f"run plan_{plan.name} again")
            if plan.mode is PlanMode.INCREMENTAL:  # the last result worked forward, this block of rows
                indices, scores = refresh_top_k(unit, settings.top_k, plan.read_refresh(folder), rows=(first, last))
            else:
                indices, scores = top_k_tiled(unit, settings.top_k, (first, last))
        finally:
            unit.close()
    plan.write_shard(folder, first, last, indices, scores)
    progress(f"{plan.name} shard {shard}: {last - first} rows x {len(order)} models "
             f"in {time.monotonic() - started:.1f}s")
    return {"shard": shard, "rows": last - first}


def merge_neighbours(settings: Settings, folder: Location, progress: Progress = log.info, *,
                     method: Method) -> dict:
    """Join the shards (if the plan was full) into the run's lists."""
    source = SOURCES[method]
    plan = SimilarityPlan.read(folder, method)
    shards = len(plan.shards)
    if plan.sharded:
        order = plan.ordered_mids()
        indices, scores = plan.read_shards(folder)
        if len(indices) != len(order):
            raise RecsketchError(f"{shards} shards cover {len(indices)} of {len(order)} rows: "
                                 f"a shard is missing, run the {plan.name} shards again")
        key, versions = source.identity(settings, folder, order)
        source.publish(settings, folder, TopK(order, indices, scores, key, versions), exact=not plan.reduced)
    elif plan.mode is PlanMode.NONE:
        return {"models": 0, "k": 0, "mode": plan.label, "shards": 0, **source.summary(folder)}
    result = TopKStore.for_run(folder, method).require(f"plan_{plan.name}")
    progress(f"{plan.name}: top-{result.k} for {len(result.mids)} models ready "
             f"({plan.label}{f', {shards} shards' if shards else ''})")
    summary: dict[str, object] = {"models": len(result.mids), "k": result.k, "mode": plan.label, "shards": shards}
    if plan.recall_at_k is not None:
        summary["recall_at_k"] = plan.recall_at_k
    return {**summary, **source.summary(folder)}


class VisualSource:
    """The pictures: the run's unit features from the chunks. While the backbone's last exact
    result can be worked forward for less than a full pass costs, it is (``_incremental``)."""

    method = Method.VISUAL

    def rows(self, settings: Settings, folder: Location, scratch: Path, progress: Progress) -> Rows | Done:
        valid = ValidModels.read(folder)
        chunk_store = ChunkStore(settings.features_dir, backbone_key(settings))
        chunk_plan = chunk_plan_if_any(folder)
        if chunk_plan is not None:  # the chunks this run extracted join the manifest (its one writer)
            added = chunk_store.register(chunk_plan.chunks)
            progress(f"similarity: {added} new chunks registered in {chunk_store.manifest_path}")
        sweep(progress, chunk_store.root, folder)
        previous = None if settings.pca_dim else _reusable_previous(chunk_store, settings.top_k)
        if previous is not None:
            return _incremental(settings, chunk_store, previous, valid, chunk_plan, scratch, progress)
        sink = NpyFileRows(scratch)
        try:
            mids = gather_unit_rows(chunk_store, valid, sorted(valid.versions), sink, chunk_plan, progress).mids
        finally:
            sink.close()
        if not settings.pca_dim:
            return Rows(mids)
        reduced, recall, sampled = reduce_measured(np.load(scratch), settings.pca_dim, settings.top_k)
        with scratch.open("wb") as handle:  # one projection for every shard, stored with the run
            np.save(handle, reduced, allow_pickle=False)
        progress(f"similarity: PCA to {reduced.shape[1]}-d keeps recall@{settings.top_k} = {recall:.3f} "
                 f"(measured on {sampled} models against the exact top-{settings.top_k})")
        return Rows(mids, f"PCA {sink.shape[1]}->{reduced.shape[1]}-d", round(recall, 4))

    def identity(self, settings: Settings, folder: Location, mids: list[str]) -> tuple[str, list[str]]:
        versions = ValidModels.read(folder).versions
        return backbone_key(settings), [versions.get(m, "") for m in mids]

    def publish(self, settings: Settings, folder: Location, topk: TopK, exact: bool) -> None:
        """The run's lists; and, for exact ones, the backbone's latest, the base of the next
        incremental run (a PCA result never becomes it)."""
        TopKStore.for_run(folder).write(topk)
        if exact:
            TopKStore.latest(ChunkStore(settings.features_dir, topk.backbone_key).root).write(topk)

    def summary(self, folder: Location) -> dict[str, object]:
        return {}


class HybridSource:
    """The pictures and the likes: ALS item factors of the run's likes blended with the unit
    visual features at the CF weight evaluate tuned (``recsketch.hybrid``), over the models of
    the visual lists. No lists when evaluate tuned no weight."""

    method = Method.HYBRID

    def rows(self, settings: Settings, folder: Location, scratch: Path, progress: Progress) -> Rows | Done:
        weight = EvaluationReport.require(folder).cf_weight
        if weight is None:
            progress("hybrid: the evaluation tuned no CF weight (too few models for a cold-start split): no hybrid set")
            return Done(PlanMode.NONE, "")
        visual = TopKStore.for_run(folder).require("similarity")
        started = time.monotonic()
        matrix = Likes.from_frame(run_likes(settings, folder, progress), visual.mids).matrix()
        limit_threads(settings.effective_threads)
        _, item_factors = fit_als(matrix, threads=settings.effective_threads)
        liked = np.asarray(matrix.sum(axis=0)).ravel() > 0
        del matrix
        progress(f"hybrid: ALS factors for {len(visual.mids)} models ({int(liked.sum())} liked) "
                 f"in {time.monotonic() - started:.1f}s")
        with visual_unit_rows(settings, folder, visual) as source:
            unit = NpyRows(source)
            sink = NpyFileRows(scratch)
            try:
                write_embedding(unit, item_factors, liked, weight, sink)
            finally:
                unit.close()
                sink.close()
        progress(f"hybrid: {len(visual.mids)} models embedded (CF weight {weight}, {int((~liked).sum())} without "
                 f"likes given predicted factors) in {time.monotonic() - started:.1f}s")
        return Rows(visual.mids, f"CF weight {weight}")

    def identity(self, settings: Settings, folder: Location, mids: list[str]) -> tuple[str, list[str]]:
        visual = TopKStore.for_run(folder).require("similarity")
        if mids != visual.mids:
            raise RecsketchError(f"the hybrid plan in {folder} is for other models than the visual neighbours: "
                                 "run plan_hybrid again")
        return visual.backbone_key, visual.versions

    def publish(self, settings: Settings, folder: Location, topk: TopK, exact: bool) -> None:
        TopKStore.for_run(folder, Method.HYBRID).write(topk)

    def summary(self, folder: Location) -> dict[str, object]:
        return {"cf_weight": EvaluationReport.require(folder).cf_weight}


SOURCES: dict[Method, Source] = {Method.VISUAL: VisualSource(), Method.HYBRID: HybridSource()}


def gather_unit_rows(chunk_store: ChunkStore, valid: ValidModels, order: list[str], sink: RowSink,
                     plan: ChunkPlan | None, progress: Progress) -> Gathered:
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


def _reusable_previous(chunk_store: ChunkStore, k: int) -> TopK | None:
    """The backbone's last exact result, if the next one can be worked into it: same backbone
    key and k, and lists as long as this run's will be."""
    previous = TopKStore.latest(chunk_store.root).read()
    if previous is None or previous.backbone_key != chunk_store.backbone_key:
        return None
    if previous.k != k or len(previous.mids) < 2 or len(previous.versions) != len(previous.mids):
        return None
    return previous


FULL_PASS_SHARE = 1.0  # a refresh that computes as much as a full pass runs as one


def _incremental(settings: Settings, chunk_store: ChunkStore, previous: TopK, valid: ValidModels,
                 chunk_plan: ChunkPlan | None, scratch: Path, progress: Progress) -> Rows | Done:
    """The previous exact result worked forward (``similarity.refresh_top_k``): new models and
    changed thumbnails are computed against all, as is every row whose list held a model that
    is gone (deleted, below the threshold) or changed; every other row keeps its list, merged
    with the new and changed models. The unit rows stream into ``scratch`` (memory holds a
    chunk, then blocks); a refresh of more than one shard's work is planned as shards, one that
    costs as much as a full pass becomes one (over the same rows)."""
    old_version = dict(zip(previous.mids, previous.versions, strict=True))
    if old_version == valid.versions:
        return Done(PlanMode.UNCHANGED, "reused", previous)
    kept_or_changed = [mid for mid in previous.mids if mid in valid.versions]
    new = sorted(set(valid.versions) - set(old_version))
    sink = NpyFileRows(scratch)
    try:
        order = gather_unit_rows(chunk_store, valid, kept_or_changed + new, sink, chunk_plan, progress).mids
    finally:
        sink.close()
    changed = {mid for mid in order if mid in old_version and old_version[mid] != valid.versions[mid]}
    stable = [mid for mid in order if mid in old_version and mid not in changed]
    if len(stable) == len(previous.mids) == len(order):  # nothing gone or changed, no new model with features
        return Done(PlanMode.UNCHANGED, "reused; the new models have no features", previous)
    refresh = plan_refresh(previous.mids, previous.indices, previous.scores, order, changed, settings.top_k)
    gone = len(previous.mids) - len(stable) - len(changed)
    detail = f"{len(order) - len(stable) - len(changed)} new x {len(order)}"
    if changed or gone:
        detail += f"; {len(changed)} changed, {gone} gone: {refresh.dirty} rows x {len(order)}"
    if refresh.cost >= FULL_PASS_SHARE:
        progress(f"similarity: working the last result forward ({detail}) would cost {refresh.cost:.0%} of a full "
                 "pass: a full pass instead")
        return Rows(order)
    progress(f"similarity: {detail}, {refresh.cost:.1%} of a full pass")
    if refresh.cost * len(order) > settings.similarity_shard_rows:  # more than one shard's work: mapped
        return Rows(order, detail, refresh=refresh)
    unit = NpyRows(scratch)
    try:
        indices, scores = refresh_top_k(unit, settings.top_k, refresh)
    finally:
        unit.close()
    topk = TopK(order, indices, scores, chunk_store.backbone_key, [valid.versions[m] for m in order])
    return Done(PlanMode.INCREMENTAL, detail, topk, rows_written=True)


@contextlib.contextmanager
def visual_unit_rows(settings: Settings, folder: Location, visual: TopK) -> Iterator[Path]:
    """The run's unit visual features in ``visual.mids`` order, as a local ``.npy``: the visual
    plan's features file when the run wrote one at full dimension (full and incremental runs),
    else gathered from the chunks (reused and PCA runs)."""
    plan = SimilarityPlan.read(folder)
    if plan.mids == visual.mids and not plan.reduced:  # a plan that names its models wrote their rows
        with storage.local_copy(plan.features_path(folder)) as path:
            yield path
        return
    versions = (dict(zip(visual.mids, visual.versions, strict=True)) if visual.versions
                else dict.fromkeys(visual.mids, ""))
    with storage.scratch_file(folder, "hybrid-visual.npy") as scratch:
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


# the tasks of the registry: the one job bound to a method
plan_similarity_stage = functools.partial(plan_neighbours, method=Method.VISUAL)
similarity_shard_stage = functools.partial(shard_neighbours, method=Method.VISUAL)
merge_similarity_stage = functools.partial(merge_neighbours, method=Method.VISUAL)
plan_hybrid_stage = functools.partial(plan_neighbours, method=Method.HYBRID)
hybrid_shard_stage = functools.partial(shard_neighbours, method=Method.HYBRID)
merge_hybrid_stage = functools.partial(merge_neighbours, method=Method.HYBRID)
