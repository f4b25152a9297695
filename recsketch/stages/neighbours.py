"""Stages 4 and 5b: neighbour lists, one job for every method.

Each method is a :class:`Source` of unit rows. The job is the same for all: ``plan`` asks the
source for its rows (written once, as the plan's features file) or for a result it finished
itself (the visual source's incremental and unchanged runs), ``shard`` computes the exact
top-k of one row block against every row, ``merge`` joins the shards into the run's lists.
A third method is a third source: a ``rows`` that writes its embedding and an ``identity``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np

from recsketch import likes_fit, storage
from recsketch.config import Settings
from recsketch.contracts import (
    LIKES_FIT_FILE,
    ChunkPlan,
    EvaluationReport,
    Method,
    PlanMode,
    SimilarityPlan,
    TopK,
    TopKStore,
    ValidModels,
    hybrid_visual_rows_key,
)
from recsketch.errors import RecsketchError
from recsketch.evaluation import Likes
from recsketch.features.chunks import ChunkStore, Gathered, NpyFileRows, RowSink
from recsketch.features.keys import backbone_key
from recsketch.heldout import fitting_likes
from recsketch.hybrid import (
    BlendedRows,
    bounded_top_k,
    knn_top_k,
    like_columns,
    stream_factors,
)
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
    bounded: bool = False  # hybrid: bounded by the exact visual lists (PlanMode.BOUNDED)


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

    def shard(self, settings: Settings, folder: Location, plan: SimilarityPlan, first: int,
              last: int) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
        """(indices, scores, what the shard's summary adds) of rows first..last of the plan."""

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
        mode = PlanMode.INCREMENTAL if refresh is not None else PlanMode.BOUNDED if planned.bounded else PlanMode.FULL
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
    limit_threads(settings.effective_threads, load_torch=True)
    indices, scores, extra = SOURCES[method].shard(settings, folder, plan, first, last)
    plan.write_shard(folder, first, last, indices, scores, extra)
    said = "".join(f", {key} {value}" for key, value in extra.items())
    progress(f"{plan.name} shard {shard}: {last - first} rows x {len(order)} models "
             f"in {time.monotonic() - started:.1f}s{said}")
    return {"shard": shard, "rows": last - first, **extra}


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
    if plan.mode is PlanMode.BOUNDED:
        summary.update(bounded_summary(plan.read_shard_stats(folder), len(result.mids)))
        progress(f"{plan.name}: {summary['proven']} rows proven by the visual lists' bound, {summary['unproven']} "
                 f"served unproven (recall@{result.k} {summary['checked_recall']} on {summary['checked']} rows "
                 f"computed in full to check), {summary['computed_in_full']} computed in full")
    return {**summary, **source.summary(folder)}


def visual_depth(settings: Settings) -> int:
    """How deep the exact visual lists are kept (served: the first ``top_k``): PCA lists are
    approximate and never worked forward, so they are made only as deep as served."""
    return settings.top_k if settings.pca_dim else max(settings.top_k, settings.neighbour_depth)


def _rows_of(path: Path, order: list[str], features: Location) -> NpyRows:
    unit = NpyRows(path)  # blocks read on demand and freed: RSS holds a block, not the file
    if unit.shape[0] != len(order):
        unit.close()
        raise RecsketchError(f"{features} has {unit.shape[0]} rows, the plan {len(order)}: run the plan again")
    return unit


def bounded_summary(stats: list[dict], rows: int) -> dict[str, object]:
    """The bounded shards' counts summed; the checked recall weighted by the rows checked."""
    total = {key: sum(int(part.get(key) or 0) for part in stats)
             for key in ("computed_in_full", "unproven", "checked", "pairs")}
    recall = sum((part.get("checked_recall") or 0.0) * int(part.get("checked") or 0) for part in stats)
    total["proven"] = rows - total["computed_in_full"] - total["unproven"] - total["checked"]
    return {**total, "checked_recall": round(recall / total["checked"], 5) if total["checked"] else None}


class VisualSource:
    """The pictures: the run's unit features from the chunks. While the backbone's last exact
    result can be worked forward for less than a full pass costs, it is (``_incremental``).
    Lists are made to :func:`visual_depth`; the run serves their first ``top_k``."""

    method = Method.VISUAL

    def rows(self, settings: Settings, folder: Location, scratch: Path, progress: Progress) -> Rows | Done:
        valid = ValidModels.read(folder)
        chunk_store = ChunkStore(settings.features_dir, backbone_key(settings))
        chunk_plan = chunk_plan_if_any(folder)
        if chunk_plan is not None:  # the chunks this run extracted join the manifest (its one writer)
            added = chunk_store.register(chunk_plan.chunks)
            progress(f"similarity: {added} new chunks registered in {chunk_store.manifest_path}")
        sweep(progress, chunk_store.root, folder)
        previous = None if settings.pca_dim else _reusable_previous(chunk_store, visual_depth(settings), progress)
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

    def shard(self, settings: Settings, folder: Location, plan: SimilarityPlan, first: int,
              last: int) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
        """Rows first..last against every model (or the last result worked forward, for these
        rows), read block by block from the plan's unit rows (copied to local scratch first when
        the data dir is an object store), in tiles: memory stays a few hundred MB whatever N is."""
        features = plan.features_path(folder)
        with storage.local_copy(features) as path:
            unit = _rows_of(path, plan.ordered_mids(), features)
            try:
                if plan.mode is PlanMode.INCREMENTAL:
                    refresh = plan.read_refresh(folder)
                    indices, scores = refresh_top_k(unit, visual_depth(settings), refresh, rows=(first, last))
                else:
                    indices, scores = top_k_tiled(unit, visual_depth(settings), (first, last))
            finally:
                unit.close()
        return indices, scores, {}

    def identity(self, settings: Settings, folder: Location, mids: list[str]) -> tuple[str, list[str]]:
        versions = ValidModels.read(folder).versions
        return backbone_key(settings), [versions.get(m, "") for m in mids]

    def publish(self, settings: Settings, folder: Location, topk: TopK, exact: bool) -> None:
        """The run's served lists (the first ``top_k`` of ``topk``); and, for exact ones, the
        whole depth: the run's (the hybrid's bound reads it) and the backbone's latest, the
        base of the next incremental run (a PCA result never becomes it)."""
        served = min(settings.top_k, topk.k)
        TopKStore.for_run(folder).write(TopK(topk.mids, np.ascontiguousarray(topk.indices[:, :served]),
                                             np.ascontiguousarray(topk.scores[:, :served]), topk.backbone_key,
                                             topk.versions))
        if exact:
            TopKStore.deep_for_run(folder).write(topk)
            TopKStore.latest(ChunkStore(settings.features_dir, topk.backbone_key).root).write(topk)

    def summary(self, folder: Location) -> dict[str, object]:
        return {}


class HybridSource:
    """The pictures and the likes: ALS item factors of the run's likes, whitened into likes rows
    (``hybrid.likes_rows``), blended with the unit visual features at the CF weight evaluate
    tuned (``recsketch.hybrid``), over the models of
    the visual lists. No lists when evaluate tuned no weight. The plan writes the N x f
    factors (cold models' predicted from their pictures); when the run's exact visual lists
    are deep enough to bound it (``hybrid.bounded_top_k``), a shard computes its rows from them
    and one scan of the factors; else (PCA lists) a full pass over the blended rows, which are
    made per tile (``hybrid.BlendedRows``) and never written."""

    method = Method.HYBRID

    def rows(self, settings: Settings, folder: Location, scratch: Path, progress: Progress) -> Rows | Done:
        report = EvaluationReport.require(folder)
        weight = report.cf_weight
        if weight is None:
            progress("hybrid: the evaluation tuned no CF weight (too few models for a cold-start split): no hybrid set")
            return Done(PlanMode.NONE, "")
        params = report.als_params or {}  # what evaluate chose on validation (an older report: ALS's defaults)
        visual = TopKStore.for_run(folder).require("similarity")
        started = time.monotonic()
        if report.hybrid_likes == "itemknn":
            return self._itemknn_rows(settings, folder, visual, weight, scratch, progress)
        likes = fitting_likes(run_likes(settings, folder, progress))  # never the held-out likes the gate scores on
        limit_threads(settings.effective_threads)
        kinds = (("factors", int), ("regularization", float), ("alpha", float), ("iterations", int))
        chosen: dict[str, float] = {name: cast(params[name]) for name, cast in kinds if name in params}
        latest_path = ChunkStore(settings.features_dir, visual.backbone_key).root / likes_fit.LATEST_FILE
        latest = likes_fit.HybridLatest.read(latest_path)
        keys = likes_fit.like_keys(likes)
        changed = likes_fit.drift(latest.fit.keys, keys) if latest is not None else 1.0
        reason = likes_fit.refit_reason(latest, chosen, visual.backbone_key, changed, settings.als_refit_drift,
                                        settings.als_refit_days)
        liked_mids = likes_fit.liked_models(likes)
        liked = np.array([mid in liked_mids for mid in visual.mids], dtype=bool)
        if reason is None and not liked.all():
            reason = f"{int((~liked).sum())} models have no likes (the cold-start map moves with their pictures)"
        if reason is None and latest is not None:
            fit, new = likes_fit.fold_in(latest.fit, likes, visual.mids, settings.effective_threads)
            progress(f"hybrid: the ALS fit of {_when(latest.fit.fitted_at)} kept ({changed:.2%} of its likes "
                     f"changed since); {int(new.sum())} new models folded in, "
                     f"in {time.monotonic() - started:.1f}s")
        else:
            progress(f"hybrid: fitting ALS: {reason}")
            fit = likes_fit.fit(likes, visual.mids, chosen, settings.effective_threads, keys)
            progress(f"hybrid: ALS factors ({chosen or 'defaults'}) for {len(visual.mids)} models "
                     f"({int(liked.sum())} liked) in {time.monotonic() - started:.1f}s")
            if not liked.all():  # the cold models' rows predicted from their pictures
                location = visual_rows(settings, folder, visual, progress)
                with storage.local_copy(location) as path:
                    unit = _rows_of(path, visual.mids, location)
                    try:
                        fit = dataclasses.replace(fit, rows=stream_factors(unit, fit.rows, liked))
                    finally:
                        unit.close()
        del likes, keys
        previous = None if latest is None else (latest.topk, latest.cf_weight)
        del latest  # the kept fit's arrays (~1 GB at 1 M models): the day's fit is ``fit`` now
        fit.write(folder / LIKES_FIT_FILE)
        with scratch.open("wb") as handle:
            np.save(handle, fit.rows, allow_pickle=False)
        visual_rows(settings, folder, visual, progress)  # gathered once for the shards, when the run wrote none
        deep = TopKStore.deep_for_run(folder).read()
        bounded = deep is not None and deep.mids == visual.mids
        depth = deep.k if bounded and deep is not None else None
        del deep  # 1.2 GB at 1 M models: a refresh reads it again, by then alone
        detail = f"CF weight {weight}" + (f", visual depth {depth}" if depth is not None else "")
        if reason is None and previous is not None and previous[1] == weight and \
                previous[0].k == min(settings.top_k, len(visual.mids) - 1):
            worked = self._worked_forward(settings, folder, visual, previous[0], fit, weight, detail, progress)
            if worked is not None:
                return worked
        progress(f"hybrid: {len(visual.mids)} models' factors ready (CF weight {weight}, {int((~liked).sum())} "
                 f"without likes given predicted factors) in {time.monotonic() - started:.1f}s; "
                 + (f"bounded by the exact visual top-{depth}" if depth is not None
                    else "the visual lists are approximate (PCA): a full blended pass"))
        return Rows(visual.mids, detail, bounded=bounded)

    def _worked_forward(self, settings: Settings, folder: Location, visual: TopK, last: TopK,
                        fit: likes_fit.LikesFit, weight: float, detail: str, progress: Progress) -> Rows | Done | None:
        """The last hybrid lists worked forward onto today's (``similarity.refresh_top_k`` over the
        blended rows): the fit's models kept their likes rows, so only the new ones, the changed
        pictures and the rows whose lists held a gone or changed model are computed (against
        all, by the bound where the run has exact visual lists); None when that would cost a
        full pass."""
        old_version = dict(zip(last.mids, last.versions, strict=True))
        new_version = dict(zip(visual.mids, visual.versions, strict=True))
        changed = {mid for mid, version in new_version.items() if mid in old_version and old_version[mid] != version}
        if last.mids == visual.mids and last.versions == visual.versions:
            progress("hybrid: the same models, pictures and fit as the last lists: reused")
            return Done(PlanMode.UNCHANGED, "reused", last)
        k = last.k
        refresh = plan_refresh(last.mids, last.indices, last.scores, visual.mids, changed, k, k)
        gone = len(set(old_version) - set(new_version))
        fresh = len(refresh.fresh)
        worked = (f"worked forward: {fresh - len(changed)} new, {len(changed)} changed, {gone} gone: "
                  f"{refresh.dirty} rows x {len(visual.mids)}")
        if refresh.cost >= FULL_PASS_SHARE:
            progress(f"hybrid: the last lists {worked} would cost a full pass: bounded lists of every model instead")
            return None
        progress(f"hybrid: the last lists {worked}, {refresh.cost:.1%} of a full pass ({detail})")
        if refresh.cost * len(visual.mids) > settings.similarity_shard_rows:
            return Rows(visual.mids, f"{detail}; {worked}", refresh=refresh)
        indices, scores = _hybrid_refresh(settings, folder, visual, fit.rows, weight, refresh, None)
        return Done(PlanMode.INCREMENTAL, f"{detail}; {worked}",
                    TopK(visual.mids, indices, scores, visual.backbone_key, visual.versions))

    @staticmethod
    def _itemknn_rows(settings: Settings, folder: Location, visual: TopK, weight: float, scratch: Path,
                      progress: Progress) -> Rows:
        """ItemKNN as the likes half (it validated better than ALS): nothing to fit or write (the
        shards read the run's likes); bounded by the exact visual lists, else each shard finds
        its rows' exact visual top-k first (``hybrid.knn_top_k``)."""
        visual_rows(settings, folder, visual, progress)  # gathered once for the shards, when the run wrote none
        with scratch.open("wb") as handle:  # no factors: the plan's file holds N x 0
            np.save(handle, np.zeros((len(visual.mids), 0), dtype=np.float32), allow_pickle=False)
        deep = TopKStore.deep_for_run(folder).read()
        bounded = deep is not None and deep.mids == visual.mids
        progress(f"hybrid: likes half ItemKNN (it validated better than ALS), CF weight {weight}, for "
                 f"{len(visual.mids)} models; " + (f"bounded by the exact visual top-{deep.k}" if bounded and deep
                                                   else "the visual lists are approximate (PCA): each shard's "
                                                        "exact visual top-k first"))
        detail = f"ItemKNN, CF weight {weight}" + (f", visual depth {deep.k}" if bounded and deep is not None else "")
        return Rows(visual.mids, detail, bounded=bounded)

    def shard(self, settings: Settings, folder: Location, plan: SimilarityPlan, first: int,
              last: int) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
        report = EvaluationReport.require(folder)
        weight = report.cf_weight
        if weight is None:
            raise RecsketchError(f"the evaluation in {folder} tuned no CF weight: run evaluate and plan_hybrid again")
        visual = TopKStore.for_run(folder).require("similarity")
        order = plan.ordered_mids()
        if order != visual.mids:
            raise RecsketchError(f"the hybrid plan in {folder} is for other models than the visual neighbours: "
                                 "run plan_hybrid again")
        if report.hybrid_likes == "itemknn":
            return self._itemknn_shard(settings, folder, plan, visual, weight, first, last)
        features = plan.features_path(folder)
        with storage.local_copy(features) as path:
            factors = np.load(path)
        location = visual_rows(settings, folder, visual, None)
        with storage.local_copy(location) as path:
            unit = _rows_of(path, order, location)
            try:
                if plan.mode is PlanMode.INCREMENTAL:
                    indices, scores = _hybrid_refresh(settings, folder, visual, factors, weight,
                                                      plan.read_refresh(folder), (first, last), unit)
                    return indices, scores, {}
                if plan.mode is PlanMode.BOUNDED:
                    deep = TopKStore.deep_for_run(folder).require("similarity")
                    result = bounded_top_k(unit, factors, deep.indices[first:last], deep.scores[first:last],
                                           (first, last), weight, settings.top_k, exact=settings.hybrid_exact)
                    return result.indices, result.scores, {
                        "computed_in_full": result.fallback_rows, "unproven": result.unproven_rows,
                        "checked": result.checked_rows, "checked_recall": result.checked_recall,
                        "pairs": result.candidates}
                indices, scores = top_k_tiled(BlendedRows(unit, factors, weight), settings.top_k, (first, last))
                return indices, scores, {}
            finally:
                unit.close()

    @staticmethod
    def _itemknn_shard(settings: Settings, folder: Location, plan: SimilarityPlan, visual: TopK, weight: float,
                       first: int, last: int) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
        columns = like_columns(Likes.from_frame(fitting_likes(run_likes(settings, folder, log.info)),
                                                visual.mids).matrix())
        location = visual_rows(settings, folder, visual, None)
        with storage.local_copy(location) as path:
            unit = _rows_of(path, visual.mids, location)
            try:
                if plan.mode is PlanMode.BOUNDED:
                    deep = TopKStore.deep_for_run(folder).require("similarity")
                    listed, listed_scores = deep.indices[first:last], deep.scores[first:last]
                else:  # approximate visual lists bound nothing: the rows' exact visual top-k
                    listed, listed_scores = top_k_tiled(unit, settings.top_k, (first, last))
                indices, scores, pairs = knn_top_k(unit, columns, listed, listed_scores, (first, last), weight,
                                                   settings.top_k)
            finally:
                unit.close()
        return indices, scores, {"pairs": pairs}  # every row proven by the bound (knn_top_k)

    def identity(self, settings: Settings, folder: Location, mids: list[str]) -> tuple[str, list[str]]:
        visual = TopKStore.for_run(folder).require("similarity")
        if mids != visual.mids:
            raise RecsketchError(f"the hybrid plan in {folder} is for other models than the visual neighbours: "
                                 "run plan_hybrid again")
        return visual.backbone_key, visual.versions

    def publish(self, settings: Settings, folder: Location, topk: TopK, exact: bool) -> None:
        """The run's lists; with ALS as the likes half, also the base of the next day's refresh:
        the lists with the run's fit and weight (``likes_fit.HybridLatest``)."""
        TopKStore.for_run(folder, Method.HYBRID).write(topk)
        report = EvaluationReport.require(folder)
        fit = likes_fit.LikesFit.read(folder / LIKES_FIT_FILE)
        if not exact or report.hybrid_likes == "itemknn" or report.cf_weight is None or fit is None \
                or fit.mids != topk.mids:
            return
        latest = ChunkStore(settings.features_dir, topk.backbone_key).root / likes_fit.LATEST_FILE
        state = likes_fit.HybridLatest(fit, topk, report.cf_weight)
        if not state.same_as_stored(latest):  # an unchanged day's lists are the stored ones
            state.write(latest)

    def summary(self, folder: Location) -> dict[str, object]:
        return {"cf_weight": EvaluationReport.require(folder).cf_weight}


def _when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _hybrid_refresh(settings: Settings, folder: Location, visual: TopK, factors: np.ndarray, weight: float,
                    refresh: Refresh, rows: tuple[int, int] | None, unit: NpyRows | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The hybrid lists of ``rows`` (default all) worked forward from the last ones: the rows
    to compute (new, changed, or whose list lost a model) by the bound from the run's exact
    visual lists when it has them (``bounded_top_k``, 64-d), else against every blended row."""
    deep = TopKStore.deep_for_run(folder).read()
    bounded = deep is not None and deep.mids == visual.mids

    def dirty(unit_rows, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not bounded or deep is None:
            return top_k_tiled(BlendedRows(unit_rows, factors, weight), refresh.known_indices.shape[1], ids)
        result = bounded_top_k(unit_rows, factors, deep.indices[ids], deep.scores[ids], ids, weight,
                               refresh.known_indices.shape[1], exact=settings.hybrid_exact)
        return result.indices, result.scores

    def run(unit_rows) -> tuple[np.ndarray, np.ndarray]:
        return refresh_top_k(BlendedRows(unit_rows, factors, weight), refresh.known_indices.shape[1], refresh,
                             rows=rows, dirty=lambda ids: dirty(unit_rows, ids))

    if unit is not None:
        return run(unit)
    location = visual_rows(settings, folder, visual, None)
    with storage.local_copy(location) as path:
        local = _rows_of(path, visual.mids, location)
        try:
            return run(local)
        finally:
            local.close()


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


def _reusable_previous(chunk_store: ChunkStore, depth: int, progress: Progress) -> TopK | None:
    """The backbone's last exact result, if the next one can be worked into it: same backbone
    key, and lists as deep as this run keeps them (or as deep as that catalogue allowed)."""
    previous = TopKStore.latest(chunk_store.root).read()
    if previous is None or previous.backbone_key != chunk_store.backbone_key:
        return None
    if len(previous.mids) < 2 or len(previous.versions) != len(previous.mids):
        return None
    if previous.k != min(depth, len(previous.mids) - 1):
        progress(f"similarity: the last exact lists are {previous.k} deep, this run keeps {depth} "
                 "(RECSKETCH_NEIGHBOUR_DEPTH, RECSKETCH_TOP_K): a full pass")
        return None
    return previous


FULL_PASS_SHARE = 1.0  # a refresh that computes as much as a full pass runs as one


def _incremental(settings: Settings, chunk_store: ChunkStore, previous: TopK, valid: ValidModels,
                 chunk_plan: ChunkPlan | None, scratch: Path, progress: Progress) -> Rows | Done:
    """The previous exact result worked forward (``similarity.refresh_top_k``): new models and
    changed thumbnails are computed against all; a model that is gone (deleted, below the
    threshold) or changed leaves the lists it was in, which stay exact, only shorter, and a row
    whose list wore down past half its depth is computed against all too; every other row keeps
    its list, merged with the new and changed models. The unit rows stream into ``scratch`` (memory holds a
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
    depth = visual_depth(settings)
    refresh = plan_refresh(previous.mids, previous.indices, previous.scores, order, changed, settings.top_k, depth)
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
        indices, scores = refresh_top_k(unit, depth, refresh)
    finally:
        unit.close()
    topk = TopK(order, indices, scores, chunk_store.backbone_key, [valid.versions[m] for m in order])
    return Done(PlanMode.INCREMENTAL, detail, topk, rows_written=True)


def visual_rows(settings: Settings, folder: Location, visual: TopK, progress: Progress | None) -> Location:
    """The run's unit visual features in ``visual.mids`` order, where every hybrid task reads
    them: the visual plan's features file when the run wrote one at full dimension (full and
    incremental runs), else ``hybrid-visual-<digest>.npy``, gathered from the chunks once
    (``progress`` given: the plan task) for the models and versions of the lists."""
    plan = SimilarityPlan.read(folder)
    if plan.mids == visual.mids and not plan.reduced:  # a plan that names its models wrote their rows
        return plan.features_path(folder)
    versions = (dict(zip(visual.mids, visual.versions, strict=True)) if visual.versions
                else dict.fromkeys(visual.mids, ""))
    location = hybrid_visual_rows_key(folder, visual.mids, visual.versions)
    if progress is None or location.exists():
        if not location.exists():
            raise RecsketchError(f"{location} is missing: run plan_hybrid again")
        return location
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
        storage.put_file(scratch, location)
    progress(f"hybrid: the visual rows of {len(visual.mids)} models gathered into {location}")
    return location


# the tasks of the registry: the one job bound to a method
plan_similarity_stage = functools.partial(plan_neighbours, method=Method.VISUAL)
similarity_shard_stage = functools.partial(shard_neighbours, method=Method.VISUAL)
merge_similarity_stage = functools.partial(merge_neighbours, method=Method.VISUAL)
plan_hybrid_stage = functools.partial(plan_neighbours, method=Method.HYBRID)
hybrid_shard_stage = functools.partial(shard_neighbours, method=Method.HYBRID)
merge_hybrid_stage = functools.partial(merge_neighbours, method=Method.HYBRID)
