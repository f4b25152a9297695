"""A day at a million models (issue 23): what the day's neighbours cost beside a full pass.

The world: N synthetic clustered unit features (1,280-d, a ``.npy`` read by blocks as the
shards read the run's features file) and 64-d CF factors of clustered tastes; then a day with
0.1 % change: 1,000 new models, 300 changed thumbnails, 300 deleted, 300 fallen below the
threshold. A full pass at 1 M models is hours, so every cost is measured on sampled rows and
scaled, as ``scale_bench`` does, and checked against the exact lists of the same rows:

  visual day   the sampled rows' lists of the day before, worked forward (``plan_refresh`` /
               ``refresh_top_k``: gone models leave, the fresh ones are merged), plus the rows
               the day dirties (new and changed models: against every model)
  visual full  the sampled rows against every model, to the kept depth
  hybrid day   ``bounded_top_k`` from the sampled rows' exact visual lists and the factors
  hybrid full  the sampled rows against every model's blended row (``BlendedRows``)
  hybrid kept  the day with the ALS fit kept (``recsketch.likes_fit``): the sampled rows' exact
               hybrid lists of the day before worked forward (``refresh_top_k`` over the blended
               rows, the dirty rows by the bound), checked against the day's exact lists
  tasks        the day's other tasks timed whole at N: threshold, the features' gather (a copy),
               evaluate, plan_hybrid (a refit: ALS; a kept fit: the fold-in and the refresh's
               plan), the merges' writes, the load of both methods into PostgreSQL; with the
               neighbours, the day's DAG for a refit day and a kept-fit day (goal <= 30 min)

Each part runs in a child process of its own, so its peak RSS is its own (``os.wait4``).

    python -m benchmarks.daily_bench [--models 1000000] [--sample 1000] [--dim 1280]

``--models 100000`` makes a quick run; ``--no-tasks`` stops after the neighbours. Goals: the
day's neighbours <= 0.05 x a full pass (visual + hybrid); the day's DAG <= 30 min.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import parts

DEPTH, K, CF_WEIGHT, FACTORS = 100, 10, 0.5, 64
PAIR_BUDGET = 8_000_000  # bounded_top_k's pending pairs between two reads of the features
SHARD_ROWS = 50_000  # RECSKETCH_SIMILARITY_SHARD_ROWS: hybrid shards, each checks its unproven rows once
NEW, CHANGED, GONE = 1000, 300, 600  # gone: 300 deleted + 300 fallen below the threshold (the same to the lists)


def layout(models: int) -> dict[str, int]:
    """The after-day file holds the kept and changed models first (rows [0, kept)), then the new
    ones; the models gone today were rows [kept, models) of the day before."""
    kept = models - GONE
    return {"kept": kept, "after": kept + NEW, "before": models}


def clustered(rng: np.random.Generator, centres: np.ndarray, rows: int, noise: float,
              labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(unit rows around centres, their centre) with their own spread (up to ``noise`` x 3):
    tight groups and loose ones, so that similarity decays down a list as it does in a
    catalogue. ``labels``: the centre of each row (default: drawn)."""
    labels = rng.integers(len(centres), size=rows) if labels is None else labels
    spread = noise * rng.uniform(1.0, 3.0, size=(rows, 1)).astype(np.float32)
    block = centres[labels] + spread * rng.standard_normal((rows, centres.shape[1]), dtype=np.float32)
    return (block / np.linalg.norm(block, axis=1, keepdims=True)).astype(np.float32), labels


def part_world(args: argparse.Namespace, work: Path) -> dict:
    """after.npy (the day's unit features), gone.npy (the rows gone today), changed.npz (the
    changed rows and their features of the day before), factors.npy (the day's CF factors: the
    kept models' are the day before's too, as a kept ALS fit leaves them), gone-factors.npy."""
    sizes = layout(args.models)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.models // 200, args.dim), dtype=np.float32)
    tastes = rng.standard_normal((max(2, args.models // 2000), FACTORS), dtype=np.float32)
    # tastes follow the pictures (each visual group has a taste, shared with other groups), or not
    taste_of_group = (rng.integers(len(tastes), size=len(centres)) if args.tastes == "visual" else None)
    out = np.lib.format.open_memmap(work / "after.npy", mode="w+", dtype=np.float32,
                                    shape=(sizes["after"], args.dim))
    groups = np.zeros(sizes["after"], dtype=np.int64)
    for start in range(0, sizes["after"], 50_000):
        stop = min(sizes["after"], start + 50_000)
        out[start:stop], groups[start:stop] = clustered(rng, centres, stop - start, 0.35)
    out.flush()
    del out
    gone, gone_groups = clustered(rng, centres, GONE, 0.35)
    np.save(work / "gone.npy", gone)
    changed = np.sort(rng.choice(np.arange(args.sample, sizes["kept"]), CHANGED, replace=False))
    np.savez(work / "changed.npz", rows=changed, before=clustered(rng, centres, CHANGED, 0.35)[0])
    labels = None if taste_of_group is None else taste_of_group[groups]
    np.save(work / "factors.npy", clustered(rng, tastes, sizes["after"], 0.5, labels)[0])
    # the gone models' factors of the day before (their own draws: the rest of the world stays as it was)
    gone_labels = None if taste_of_group is None else taste_of_group[gone_groups]
    np.save(work / "gone-factors.npy", clustered(np.random.default_rng(1), tastes, GONE, 0.5, gone_labels)[0])
    return {"bytes": (work / "after.npy").stat().st_size}


class BeforeRows:
    """The day before's unit rows, without writing them: the after-day file's kept rows, with the
    changed ones at their old features, then the rows gone today."""

    def __init__(self, after, kept: int, changed: np.ndarray, before: np.ndarray, gone: np.ndarray) -> None:
        self.after, self.kept, self.gone = after, kept, gone
        self.patch = dict(zip(changed.tolist(), before, strict=True))
        self.shape = (kept + len(gone), after.shape[1])

    def _patched(self, start: int, stop: int) -> np.ndarray:
        block = np.array(self.after[start:stop], dtype=np.float32)
        for row, vector in self.patch.items():
            if start <= row < stop:
                block[row - start] = vector
        return block

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, _ = key.indices(self.shape[0])
            parts = []
            if start < self.kept:
                parts.append(self._patched(start, min(stop, self.kept)))
            if stop > self.kept:
                parts.append(self.gone[max(0, start - self.kept) : stop - self.kept])
            return np.concatenate(parts) if len(parts) > 1 else parts[0]
        return np.stack([self[int(row) : int(row) + 1][0] for row in np.asarray(key).ravel()])


def worked_lists(sizes: dict[str, int], changed_rows: np.ndarray, old_indices: np.ndarray,
                 old_scores: np.ndarray, need: int):  # type: ignore[no-untyped-def]
    """The sampled rows' lists of the day before as ``plan_refresh`` maps them (a ``Refresh``):
    gone and changed models leave, a row stays clean while ``need`` remain; kept rows keep
    their row numbers, the fresh ones are the changed and the new models."""
    from recsketch.similarity import Refresh

    gone_or_changed = np.zeros(sizes["before"], dtype=bool)
    gone_or_changed[sizes["kept"]:] = True
    gone_or_changed[changed_rows] = True
    listed = np.where(gone_or_changed[old_indices], -1, old_indices)
    order = np.argsort(listed < 0, axis=1, kind="stable")
    known = np.take_along_axis(listed, order, 1)
    known_scores = np.where(known >= 0, np.take_along_axis(old_scores, order, 1), -np.inf).astype(np.float32)
    remaining = (known >= 0).sum(axis=1)
    fresh = np.concatenate([changed_rows, np.arange(sizes["kept"], sizes["after"])])
    return Refresh(remaining >= need, known, known_scores, fresh, remaining)


def part_visual(args: argparse.Namespace, work: Path) -> dict:
    from recsketch.similarity import NpyRows, refresh_top_k, top_k_tiled

    sizes = layout(args.models)
    after = NpyRows(work / "after.npy")
    changed = np.load(work / "changed.npz")
    before = BeforeRows(after, sizes["kept"], changed["rows"], changed["before"], np.load(work / "gone.npy"))
    sample = (0, args.sample)  # rows that kept their model and features (changed rows lie past the sample)
    old_indices, old_scores = top_k_tiled(before, DEPTH, sample)  # the day before's exact lists of these rows
    started = time.perf_counter()
    exact_indices, exact_scores = top_k_tiled(after, DEPTH, sample)
    full_seconds = time.perf_counter() - started
    np.savez(work / "visual-sample.npz", indices=exact_indices, scores=exact_scores)
    refresh = worked_lists(sizes, changed["rows"], old_indices, old_scores, max(K, DEPTH // 2))
    clean, remaining = refresh.clean, refresh.limit
    started = time.perf_counter()
    indices, _ = refresh_top_k(after, DEPTH, refresh, rows=sample)
    refresh_seconds = time.perf_counter() - started
    mismatched = 0
    for row in np.flatnonzero(clean):
        depth = int(remaining[row])
        mismatched += int((indices[row, :depth] != exact_indices[row, :depth]).any())
    dirty_sample = np.arange(sizes["kept"], min(sizes["after"], sizes["kept"] + args.dirty_sample))
    started = time.perf_counter()
    top_k_tiled(after, DEPTH, dirty_sample)  # a new model's row: against every model
    dirty_seconds = time.perf_counter() - started
    after.close()
    rows = sizes["after"]
    dirty_rows = NEW + CHANGED + (1 - clean.mean()) * rows  # new and changed rows, and lists worn down
    return {"full_hours": full_seconds * rows / args.sample / 3600,
            "day_hours": (refresh_seconds * rows / args.sample + dirty_seconds * dirty_rows / len(dirty_sample)) / 3600,
            "clean_share": float(clean.mean()), "mismatched_rows": mismatched, "dirty_rows": int(dirty_rows),
            "kept_depth_mean": float(remaining.mean())}


def part_hybrid(args: argparse.Namespace, work: Path) -> dict:
    from recsketch import hybrid, kernel
    from recsketch.hybrid import BlendedRows, bounded_top_k
    from recsketch.similarity import NpyRows, recall_at_k, top_k_tiled

    after = NpyRows(work / "after.npy")
    factors = np.load(work / "factors.npy")
    visual = np.load(work / "visual-sample.npz")
    sample = (0, args.sample)
    reading = [0.0]  # the pairs' visual cosines: one read of the features per flush of pending pairs,
    original = hybrid.pair_visual  # i.e. per shard at this scale, whatever the shard's rows: timed apart

    def timed_pair_visual(*call_args, **call_kwargs):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return original(*call_args, **call_kwargs)
        finally:
            reading[0] += time.perf_counter() - started

    hybrid.pair_visual = timed_pair_visual
    # once per shard, not per row: a task's first bfloat16 product (torch's import, oneDNN's JIT) and
    # the factors rounded for the scan; timed on a few rows, then the factors' rounding alone
    started = time.perf_counter()
    bounded_top_k(after, factors, visual["indices"][:8], visual["scores"][:8], (0, 8), CF_WEIGHT, K,
                  exact=args.exact, check_rows=0)
    setup_seconds = time.perf_counter() - started - reading[0]
    started = time.perf_counter()
    kernel.Side(np.asarray(factors, dtype=np.float32), kernel.scan_precision())
    rounding_seconds = time.perf_counter() - started
    reading[0] = 0.0
    started = time.perf_counter()  # per row: the scan, merging the pairs, the rows computed in full
    result = bounded_top_k(after, factors, visual["indices"], visual["scores"], sample, CF_WEIGHT, K,
                           exact=args.exact, check_rows=0)
    per_row_seconds = time.perf_counter() - started - reading[0] - rounding_seconds
    started = time.perf_counter()
    exact_indices, exact_scores = top_k_tiled(BlendedRows(after, factors, CF_WEIGHT), K, sample)
    full_seconds = time.perf_counter() - started
    fold = _fold_in_day(args, work, after, factors, visual, exact_indices, exact_scores,
                        per_row_seconds / args.sample, reading[0], setup_seconds + rounding_seconds)
    rows = len(factors)
    shards = -(-rows // SHARD_ROWS)
    flushes = max(shards, int(np.ceil(result.candidates / args.sample * rows / PAIR_BUDGET)))
    day_seconds = per_row_seconds * rows / args.sample + reading[0] * flushes + setup_seconds * shards
    check_seconds = 0.0
    if result.unproven_rows:  # per shard, not per row: 20 unproven rows computed in full to measure them
        started = time.perf_counter()
        top_k_tiled(BlendedRows(after, factors, CF_WEIGHT), K, np.arange(20))
        check_seconds = (time.perf_counter() - started) * shards
    after.close()
    recall = recall_at_k(exact_indices, result.indices)
    unproven = result.unproven_rows / args.sample  # their candidates' recall (proven rows are exact)
    unproven_recall = 1 - (1 - recall) / unproven if unproven else 1.0
    sent_to_full = unproven if unproven_recall < hybrid.MIN_RECALL else 0.0  # what each shard's check then does
    day_seconds += sent_to_full * full_seconds * rows / args.sample
    return {"full_hours": full_seconds * rows / args.sample / 3600, "unproven_recall": unproven_recall,
            "sent_to_full": sent_to_full,
            "day_hours": (day_seconds + check_seconds) / 3600, "pair_read_minutes": reading[0] * flushes / 60,
            "setup_minutes": setup_seconds * shards / 60, "scan_seconds_per_1000": per_row_seconds / args.sample * 1000,
            "fallback_share": result.fallback_rows / args.sample, "pairs_per_row": result.candidates / args.sample,
            "unproven_share": result.unproven_rows / args.sample, "check_minutes": check_seconds / 60,
            "recall": recall,
            "score_error": float(np.abs(result.scores - exact_scores).max()),
            "index_agreement": float((result.indices == exact_indices).mean()), "fold_in": fold}


def _fold_in_day(args: argparse.Namespace, work: Path, after, factors: np.ndarray, visual,  # type: ignore[no-untyped-def]
                 exact_indices: np.ndarray, exact_scores: np.ndarray, per_row_seconds: float, flush_seconds: float,
                 setup_seconds: float) -> dict:
    """The hybrid day when the ALS fit is kept (``recsketch.likes_fit``): the sampled rows' exact
    hybrid lists of the day before, worked forward as plan_hybrid does (``refresh_top_k`` over the
    blended rows, the dirty rows by the bound), against the exact lists of the day. The rows the
    day dirties beyond the sample (new and changed models, and the sample's share of worn lists)
    cost the bound's measured time a row (worn lists: as sampled, or the gone and changed models'
    mean in-degree, k each, if more); it is one task (less than a shard's work)."""
    from recsketch.hybrid import BlendedRows, bounded_top_k
    from recsketch.similarity import refresh_top_k, top_k_tiled

    sizes = layout(args.models)
    sample = (0, args.sample)
    changed = np.load(work / "changed.npz")
    before = BeforeRows(after, sizes["kept"], changed["rows"], changed["before"], np.load(work / "gone.npy"))
    before_factors = np.concatenate([factors[: sizes["kept"]], np.load(work / "gone-factors.npy")])
    old_indices, old_scores = top_k_tiled(BlendedRows(before, before_factors, CF_WEIGHT), K, sample)
    refresh = worked_lists(sizes, changed["rows"], old_indices, old_scores, K)
    clean = refresh.clean
    spent = [0.0]

    def dirty(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        result = bounded_top_k(after, factors, visual["indices"][ids], visual["scores"][ids], ids, CF_WEIGHT, K,
                               exact=args.exact, check_rows=0)
        spent[0] += time.perf_counter() - started
        return result.indices, result.scores

    started = time.perf_counter()
    indices, scores = refresh_top_k(BlendedRows(after, factors, CF_WEIGHT), K, refresh, rows=sample, dirty=dirty)
    clean_seconds = time.perf_counter() - started - spent[0]
    rows = len(factors)
    # rows whose lists held a gone or changed model: as sampled, but at least their mean in-degree (k) each
    dirty_rows = NEW + CHANGED + max((1 - clean.mean()) * rows, (GONE + CHANGED) * K)
    day_seconds = clean_seconds * rows / args.sample + dirty_rows * per_row_seconds + flush_seconds + setup_seconds
    return {"day_hours": day_seconds / 3600, "clean_share": float(clean.mean()), "dirty_rows": int(dirty_rows),
            "clean_seconds_per_1000": clean_seconds / args.sample * 1000,
            "differ_rows": int((indices != exact_indices).any(axis=1).sum()),
            "score_error": float(np.abs(scores - exact_scores).max())}


def part_tasks(args: argparse.Namespace, work: Path) -> dict:
    """The day's other tasks at N models, each timed as the DAG runs it: ``threshold_likes`` on
    power-law likes, ``evaluate`` over the day's features (read by blocks), plan_hybrid's ALS fit
    and factors (``fit_als``, ``stream_factors``), the merges' writes of the lists and the load of
    both methods' top-10 into PostgreSQL. The refresh plan's gather of every model's features
    from the chunks into the run's scratch file is stood in for by a copy of the features file
    (the same bytes read and written)."""
    import shutil

    import pandas as pd

    from benchmarks.load_bench import synthetic_topk
    from benchmarks.scale_bench import ADMIN_URL
    from recsketch import likes_fit
    from recsketch.evaluation import EvaluationConfig, Likes, evaluate
    from recsketch.hybrid import knn_pairs_bound
    from recsketch.likes import threshold_likes
    from recsketch.similarity import NpyRows

    n = layout(args.models)["after"]
    rng = np.random.default_rng(2)
    # every model >= 5 likes, a power law above; users' activity a power law too, at least 5 each
    per_model = 5 + np.minimum((rng.pareto(1.5, n) * 10).astype(np.int64), 20_000)
    items = rng.permutation(np.repeat(np.arange(n, dtype=np.int64), per_model))
    per_user = 5 + np.minimum((rng.pareto(1.2, len(items) // 8) * 8).astype(np.int64), 50_000)
    per_user = per_user[: int(np.searchsorted(np.cumsum(per_user), len(items))) + 1]
    users = np.repeat(np.arange(len(per_user), dtype=np.int64), per_user)[: len(items)]
    mids = [f"{i:032x}" for i in range(n)]
    frame = pd.DataFrame({"mid": pd.Categorical.from_codes(items.astype(np.int32), mids),
                          "uid": pd.Categorical.from_codes(users.astype(np.int32),
                                                           [f"u{i}" for i in range(len(per_user))])})
    del items, users
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    kept = threshold_likes(frame, 5).likes
    seconds["threshold"] = time.perf_counter() - started
    likes = Likes.from_frame(kept, mids)
    del frame
    started = time.perf_counter()
    shutil.copyfile(work / "after.npy", work / "gathered.npy")
    seconds["gather (a copy of the features)"] = time.perf_counter() - started
    (work / "gathered.npy").unlink()
    unit = NpyRows(work / "after.npy")
    started = time.perf_counter()
    report = evaluate(likes, unit, EvaluationConfig(threads=os.cpu_count() or 1),
                      progress=lambda line: print(f"    [{time.perf_counter() - started:6.0f} s] {line[:160]}",
                                                  file=sys.stderr, flush=True))  # where evaluate's time goes
    seconds["evaluate"] = time.perf_counter() - started
    unit.close()
    threads = os.cpu_count() or 1
    started = time.perf_counter()  # a refit day's plan_hybrid: the likes' keys, ALS, the likes rows, their write
    keys = likes_fit.like_keys(kept)
    fit = likes_fit.fit(kept, mids, {}, threads, keys)
    fit.write(work / "likes-fit.npz")
    seconds["plan_hybrid (a refit: ALS)"] = time.perf_counter() - started
    folded = _fold_in_plan(work, rng, kept, mids, fit, keys, threads)
    seconds["plan_hybrid (a kept fit: fold-in, the refresh's plan)"] = folded.pop("seconds")
    started = time.perf_counter()  # merge_similarity writes the deep lists twice (the run's, the latest) and the
    deep = rng.integers(0, n, size=(n, DEPTH))  # served ones; merge_hybrid its served ones
    for name in ("deep", "latest"):
        np.savez(work / f"{name}.npz", indices=deep, scores=rng.random((n, DEPTH), dtype=np.float32))
    for name in ("visual", "hybrid"):
        np.savez(work / f"{name}.npz", indices=deep[:, :K], scores=rng.random((n, K), dtype=np.float32))
    seconds["merges' writes"] = time.perf_counter() - started
    del deep
    seconds["load"] = _load_both(ADMIN_URL, synthetic_topk(n, K))
    return {"seconds": seconds, "likes": len(likes.users), "users": int(likes.n_users),
            "factors_shape": list(fit.rows.shape), "evaluated_users": report["split"]["evaluated_users"],
            "hybrid_likes": (report.get("hybrid") or {}).get("likes"), "als_params": report["als"]["params"],
            "knn_pairs_bound": knn_pairs_bound(likes.matrix()), "fold_in": folded}


def _fold_in_plan(work: Path, rng: np.random.Generator, kept, mids: list[str], fit,  # type: ignore[no-untyped-def]
                  keys: np.ndarray, threads: int) -> dict:
    """plan_hybrid on the day after a refit, the fit kept: the day's likes hashed and their drift
    counted, the kept fit read, the 1,000 new models (10 likes each, a fifth from new users)
    folded in, the last lists mapped (``plan_refresh``), the run's fit written; and merge_hybrid's
    write of the kept state (lists of random neighbours stand in for the day before's)."""
    import pandas as pd

    from recsketch import likes_fit
    from recsketch.contracts import TopK
    from recsketch.similarity import plan_refresh

    n = len(mids)
    lists = TopK(mids, rng.integers(0, n, size=(n, K)), np.sort(rng.random((n, K), dtype=np.float32))[:, ::-1],
                 "bench", ["v"] * n)
    likes_fit.HybridLatest(fit, lists, CF_WEIGHT).write(work / "latest.npz")
    gone = set(mids[-GONE:])
    new_mids = [f"new{i:029x}" for i in range(NEW)]
    model_names, user_names = list(kept["mid"].cat.categories), list(kept["uid"].cat.categories)
    staying = ~kept["mid"].isin(gone).to_numpy()
    likers = np.where(rng.random(NEW * 10) < 0.2, len(user_names) + np.arange(NEW * 10),  # a fifth new users
                      rng.integers(0, len(user_names), NEW * 10))
    day = pd.DataFrame({  # as threshold saves them: categorical codes, the new names appended
        "mid": pd.Categorical.from_codes(np.concatenate([kept["mid"].cat.codes.to_numpy()[staying],
                                                         len(model_names) + np.repeat(np.arange(NEW), 10)]),
                                         model_names + new_mids),
        "uid": pd.Categorical.from_codes(np.concatenate([kept["uid"].cat.codes.to_numpy()[staying], likers]),
                                         user_names + [f"newuser{i}" for i in range(NEW * 10)])})
    today = [m for m in mids if m not in gone] + new_mids
    changed = set(mids[:CHANGED])
    steps: dict[str, float] = {}
    started = time.perf_counter()
    day_keys = likes_fit.like_keys(day)
    steps["hashes"] = time.perf_counter() - started
    latest = likes_fit.HybridLatest.read(work / "latest.npz")
    assert latest is not None
    steps["read"] = time.perf_counter() - started - sum(steps.values())
    reason = likes_fit.refit_reason(latest, {}, "bench", likes_fit.drift(latest.fit.keys, day_keys), 0.05, 7.0)
    steps["drift"] = time.perf_counter() - started - sum(steps.values())
    worked, new = likes_fit.fold_in(latest.fit, day, today, threads)
    steps["fold-in"] = time.perf_counter() - started - sum(steps.values())
    refresh = plan_refresh(latest.topk.mids, latest.topk.indices, latest.topk.scores, today, changed, K, K)
    steps["plan_refresh"] = time.perf_counter() - started - sum(steps.values())
    worked.write(work / "likes-fit.npz")
    steps["the run's fit written"] = time.perf_counter() - started - sum(steps.values())
    plan_seconds = time.perf_counter() - started
    started = time.perf_counter()
    worked_lists = TopK(today, refresh.known_indices, refresh.known_scores, "bench", ["v"] * len(today))
    likes_fit.HybridLatest(worked, worked_lists, CF_WEIGHT).write(work / "latest.npz")
    write_seconds = time.perf_counter() - started
    return {"seconds": plan_seconds + write_seconds, "plan_seconds": plan_seconds, "write_seconds": write_seconds,
            "drift": likes_fit.drift(keys, day_keys), "refit_reason": reason, "folded": int(new.sum()),
            "state_gib": (work / "latest.npz").stat().st_size / 2**30, "dirty_rows": refresh.dirty,
            "steps": {name: round(value, 1) for name, value in steps.items()}}


def _load_both(admin_url: str, topk) -> float:  # type: ignore[no-untyped-def]
    """Seconds of ``load_recommendations`` of ``topk`` as both methods, in a database of its own."""
    import uuid

    from sqlalchemy import create_engine, text

    from recsketch.db import store

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"recsketch_daily_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = store.connect(admin.url.set(database=name).render_as_string(hide_password=False))
    try:
        started = time.perf_counter()
        store.load_recommendations(engine, "day", "bench", K, topk, more={"hybrid": topk})
        return time.perf_counter() - started
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def child(part: str, args: argparse.Namespace, work: Path) -> None:
    print("RESULT " + json.dumps(globals()[f"part_{part}"](args, work)), flush=True)


def run_part(part: str, argv: list[str], work: Path) -> dict:
    return parts.run_part("benchmarks.daily_bench", part, argv, work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=1_000_000)
    parser.add_argument("--sample", type=int, default=1000)
    parser.add_argument("--dirty-sample", type=int, default=200)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--exact", action="store_true", help="RECSKETCH_HYBRID_EXACT: unproven rows in full")
    parser.add_argument("--tastes", choices=("visual", "independent"), default="visual",
                        help="CF tastes that follow the visual groups, or tastes independent of them")
    parser.add_argument("--no-tasks", action="store_true",
                        help="the neighbours only: not the day's other tasks (threshold, evaluate, ALS, load)")
    parser.add_argument("--child")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args, args.work)
        return
    argv = ["--models", str(args.models), "--sample", str(args.sample), "--dirty-sample", str(args.dirty_sample),
            "--dim", str(args.dim), "--tastes", args.tastes, *(["--exact"] if args.exact else [])]
    print(f"daily benchmark: {args.models:,} models x {args.dim}-d, a day of {NEW:,} new, {CHANGED} changed, "
          f"{GONE} gone; {args.sample:,} sampled rows; depth {DEPTH}, k {K}, CF weight {CF_WEIGHT}, tastes "
          f"{args.tastes}{', exact' if args.exact else ''}; "
          f"{os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="recsketch-daily-") as tmp:
        work = Path(tmp)
        made = run_part("world", argv, work)
        print(f"  world: {made['bytes'] / 2**30:.1f} GiB of unit features", flush=True)
        visual = run_part("visual", argv, work)
        print(f"  visual: day {visual['day_hours'] * 60:.1f} min vs full pass {visual['full_hours']:.2f} h "
              f"({visual['day_hours'] / visual['full_hours']:.4f}); {visual['clean_share']:.1%} of the sampled rows "
              f"stay clean (kept depth {visual['kept_depth_mean']:.1f}), {visual['dirty_rows']:,} rows dirty; "
              f"sampled rows that differ from the exact lists: {visual['mismatched_rows']}; "
              f"peak RSS {visual['peak_rss_gib']:.2f} GiB (goal <= 4)", flush=True)
        hybrid = run_part("hybrid", argv, work)
        print(f"  hybrid: day {hybrid['day_hours'] * 60:.1f} min vs full pass {hybrid['full_hours']:.2f} h "
              f"({hybrid['day_hours'] / hybrid['full_hours']:.4f}); {hybrid['fallback_share']:.1%} of rows computed "
              f"in full, {hybrid['unproven_share']:.1%} unproven (their candidates' recall@{K} "
              f"{hybrid['unproven_recall']:.4f}: {hybrid['sent_to_full']:.1%} of rows sent to the full computation by "
              f"the shards' check, which costs {hybrid['check_minutes']:.1f} min), "
              f"the pairs' reads of the features {hybrid['pair_read_minutes']:.1f} min, each shard's setup (torch, "
              f"the factors rounded) {hybrid['setup_minutes']:.1f} min, "
              f"{hybrid['scan_seconds_per_1000']:.2f} s per 1,000 rows, "
              f"{hybrid['pairs_per_row']:.0f} pairs a row; the lists before any check, against the exact ones: "
              f"recall@{K} "
              f"{hybrid['recall']:.4f}, "
              f"max score error {hybrid['score_error']:.1e}, indices agree {hybrid['index_agreement']:.4f}; "
              f"peak RSS {hybrid['peak_rss_gib']:.2f} GiB (goal <= 4)", flush=True)
        fold = hybrid["fold_in"]
        print(f"  hybrid with the ALS fit kept (new models folded in, the last lists worked forward): day "
              f"{fold['day_hours'] * 60:.1f} min ({fold['day_hours'] / hybrid['full_hours']:.4f} of a full pass); "
              f"{fold['clean_share']:.1%} of the sampled rows stay clean, {fold['dirty_rows']:,} rows by the bound, "
              f"the clean rows against the fresh models {fold['clean_seconds_per_1000']:.2f} s per 1,000; sampled rows "
              f"that differ from the exact lists: {fold['differ_rows']}, max score error {fold['score_error']:.1e}",
              flush=True)
        for name, hybrid_hours in (("a refit day", hybrid["day_hours"]),
                                   ("a day with the fit kept", fold["day_hours"])):
            day = visual["day_hours"] + hybrid_hours
            full = visual["full_hours"] + hybrid["full_hours"]
            print(f"  the day's neighbours, {name}: {day * 60:.1f} min vs {full:.2f} h for full passes = "
                  f"{day / full:.4f} (goal <= 0.05)", flush=True)
        if args.no_tasks:
            return
        tasks = run_part("tasks", argv, work)
        common = {name: value for name, value in tasks["seconds"].items() if not name.startswith("plan_hybrid")}
        plans = [name for name in tasks["seconds"] if name.startswith("plan_hybrid")]
        kept = tasks["fold_in"]
        print(f"  plan_hybrid with the fit kept: {kept['folded']:,} models folded in, the likes drifted "
              f"{kept['drift']:.3%} (refit: {kept['refit_reason'] or 'no'}), {kept['dirty_rows']:,} lists to recompute "
              f"of random stand-ins; its work {kept['plan_seconds']:.1f} s ({kept['steps']}), the kept state "
              f"({kept['state_gib']:.2f} GiB) written in {kept['write_seconds']:.1f} s", flush=True)
        for name, plan, hybrid_hours in (("a refit day", plans[0], hybrid["day_hours"]),
                                         ("a day with the fit kept", plans[1], fold["day_hours"])):
            steps = {name_: value for name_, value in tasks["seconds"].items() if name_ in common or name_ == plan}
            steps.update({"visual neighbours (the day)": visual["day_hours"] * 3600,
                          "hybrid neighbours (the day)": hybrid_hours * 3600})
            print(f"  the day's DAG from threshold to load, {name}, on this machine ({tasks['likes']:,} likes of "
                  f"{tasks['users']:,} users; evaluate on {tasks['evaluated_users']:,} users; peak RSS "
                  f"{tasks['peak_rss_gib']:.2f} GiB): " + ", ".join(f"{step} {value / 60:.1f} min"
                                                                   for step, value in steps.items())
                  + f"; in all {sum(steps.values()) / 60:.1f} min (goal <= 30)", flush=True)
        print(f"  evaluate chose ALS {tasks['als_params']} and the {tasks['hybrid_likes']} likes half (ItemKNN's "
              f"co-liked pairs at most {tasks['knn_pairs_bound']:,}); the hybrid day above is timed with ALS's "
              "bounded scan at 64 factors", flush=True)


if __name__ == "__main__":
    main()
