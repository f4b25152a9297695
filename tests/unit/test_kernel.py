"""The exact top-k kernel: whichever precision finds the candidates, the lists are the exact
ones (in bfloat16 the same to the last bit, in float32 within sgemm's rounding); the error
bound it relies on holds on real products."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from recsketch import kernel
from recsketch.similarity import normalise, plan_refresh, refresh_top_k, top_k_tiled

PRECISIONS = ("bf16", "fp32")


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Clustered unit rows with the hard cases: 40 copies of one row (ties at 1.0 past k and past
    the kernel's spare), a zero row, and a row pointing away from everything."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), d)).astype(np.float32)
    rows = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    rows[10:50] = rows[10]
    rows[3] = 0.0
    rows[4] = -centres.mean(axis=0)
    return normalise(rows)


def reference(unit: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair scored as ``kernel.exact_scores`` defines it, sorted by (-score, index)."""
    n = len(unit)
    q_rows = np.repeat(queries, n)
    c_rows = np.tile(np.arange(n), len(queries))
    scores = kernel.exact_scores(unit, unit, q_rows, c_rows).reshape(len(queries), n)
    scores[np.arange(len(queries)), queries] = -np.inf
    order = np.array([np.lexsort((np.arange(n), -row))[:k] for row in scores])
    return order, np.take_along_axis(scores, order, axis=1)


def same_scores(precision: str, scores: np.ndarray, expected: np.ndarray) -> bool:
    """bfloat16 lists hold the kernel's float64 scores, to the bit; float32 ones their float32 products."""
    return np.array_equal(scores, expected) if precision == "bf16" else np.allclose(scores, expected, atol=1e-6,
                                                                                     rtol=0)


@pytest.fixture(params=PRECISIONS)
def precision(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("RECSKETCH_KERNEL", request.param)
    return str(request.param)


@pytest.mark.parametrize("k", [1, 10, 45])
def test_lists_are_the_exact_ones_in_either_precision(precision: str, k: int) -> None:
    unit = clustered(1500, 256)
    queries = np.array([0, 3, 4, 10, 11, 49, 50, 777, 1499])
    indices, scores = top_k_tiled(unit, k, queries, query_block=4, candidate_block=256)
    expected_indices, expected_scores = reference(unit, queries, k)
    assert np.array_equal(indices, expected_indices)
    assert same_scores(precision, scores, expected_scores)
    copies = np.flatnonzero(queries == 11)[0]  # the copies of row 10 score exactly 1.0, lowest index first
    assert indices[copies, :min(k, 39)].tolist() == [c for c in range(10, 50) if c != 11][:min(k, 39)]
    assert (scores[copies, :min(k, 39)] == 1.0).all()


def test_a_model_that_the_fast_product_ranks_second_but_scores_first_is_found(precision: str) -> None:
    """Rounded to bfloat16, A = (1 + 0.99h, w + 0.03h) falls below B = (1 + 1.01h, w) (h: half a
    bfloat16 step at 1.0), though A scores higher: only the bound's margin keeps A."""
    h = 2.0**-8
    a = np.array([1 + 0.99 * h, 0.001 + 0.03 * h], dtype=np.float32) * np.float32(0.25)
    b = np.array([1 + 1.01 * h, 0.001], dtype=np.float32) * np.float32(0.25)
    rows = np.array([[0.5, 0.5], b, a, [-0.25, 0.0], [0.0, 0.01]], dtype=np.float32)
    indices, scores = top_k_tiled(rows, 1, np.array([0]))
    assert indices.tolist() == [[2]]
    assert same_scores(precision, scores[0], np.array([rows[0].astype(np.float64) @ a], dtype=np.float32))


def test_both_precisions_give_the_same_lists_up_to_float32_near_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    unit = clustered(3000, 1280, seed=1)
    results = {}
    for name in PRECISIONS:
        monkeypatch.setenv("RECSKETCH_KERNEL", name)
        results[name] = top_k_tiled(unit, 20, (0, 600), query_block=256, candidate_block=1024)
    differ = (results["bf16"][0] != results["fp32"][0]).any(axis=1)
    assert differ.mean() <= 0.02  # only where two scores are within float32's rounding of each other:
    assert np.abs(results["bf16"][1] - results["fp32"][1]).max() <= 1e-6  # the same scores, rank by rank


@pytest.mark.parametrize("scale", [1.0, 3.0, 0.01])
def test_the_bfloat16_bound_holds_over_whole_tiles(scale: float) -> None:
    import torch

    rng = np.random.default_rng(2)
    rows = (rng.standard_normal((700, 1280)) * rng.uniform(0.1, 2, (700, 1)) * scale).astype(np.float32)
    rows[:300] = np.abs(rows[:300])  # non-negative rows, as pooled CNN features are: scores near the top
    query, candidates = kernel.Side(rows[:200], "bf16"), kernel.Side(rows, "bf16")
    approximate = (query.low @ candidates.low.T).to(torch.float32).numpy().astype(np.float64)
    exact = rows[:200].astype(np.float64) @ rows.astype(np.float64).T
    bound = kernel.error_bound(query, candidates)
    assert (np.abs(approximate - exact) <= bound[:, None]).all()
    assert np.abs(approximate - exact).max() > 0.05 * bound.min()  # the products do round: the bound is not idle


def test_a_tile_that_breaks_its_bound_is_recomputed_in_float32(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("RECSKETCH_KERNEL", "bf16")
    honest = kernel.error_bound
    monkeypatch.setattr(kernel, "error_bound", lambda q, c: honest(q, c) * (1e-6 if q.precision == "bf16" else 1.0))
    unit = clustered(600, 256, seed=3)
    queries = np.arange(0, 600, 7)
    with caplog.at_level(logging.WARNING, logger="recsketch.kernel"):
        indices, scores = top_k_tiled(unit, 10, queries, candidate_block=128)
    expected_indices, expected_scores = reference(unit, queries, 10)
    assert np.array_equal(indices, expected_indices) and np.array_equal(scores, expected_scores)
    assert "broke its error bound" in caplog.text


def test_a_refreshed_list_equals_a_full_pass(precision: str) -> None:
    """In bfloat16 (exact float64 scores) to the last bit; in float32 within sgemm's rounding,
    which on some CPUs (seen on a Zen 5) depends on a row's place in its tile: scores within
    1e-6, and indices the same except where two scores are that close (issue 23's contract)."""
    rng = np.random.default_rng(4)
    old = clustered(900, 256, seed=4)
    ids = [f"m{i}" for i in range(900)]
    old_indices, old_scores = top_k_tiled(old, 40, (0, 900), candidate_block=300)
    changed = {ids[i] for i in (5, 50, 500)}
    rows = {mid: old[i] for i, mid in enumerate(ids)}
    for mid in changed:
        rows[mid] = normalise(rng.standard_normal((1, 256)).astype(np.float32))[0]
    new_ids = [mid for mid in ids if mid != "m7"] + [f"n{i}" for i in range(25)]
    fresh = clustered(25, 256, seed=5)
    rows.update({f"n{i}": fresh[i] for i in range(25)})
    day = np.stack([rows[mid] for mid in new_ids])
    refresh = plan_refresh(ids, old_indices, old_scores, new_ids, changed, k=10, depth=40)
    indices, scores = refresh_top_k(day, 40, refresh, candidate_block=300)
    full_indices, full_scores = top_k_tiled(day, 40, (0, len(day)), candidate_block=300)
    for row in range(len(day)):
        limit = int(refresh.limit[row])
        got, want, want_scores = indices[row, :limit], full_indices[row, :limit], full_scores[row, :limit]
        if precision == "bf16":
            assert np.array_equal(got, want) and np.array_equal(scores[row, :limit], want_scores), row
            continue
        assert np.allclose(scores[row, :limit], want_scores, rtol=0, atol=1e-6), row
        gaps = np.abs(np.diff(want_scores))
        near = np.zeros(limit, dtype=bool)  # a place whose score is within 1e-6 of a neighbour's
        near[:-1] |= gaps <= 1e-6
        near[1:] |= gaps <= 1e-6
        assert np.array_equal(got[~near], want[~near]), row
        assert set(got[near].tolist()) <= set(full_indices[row].tolist()), row


def test_the_kernel_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSKETCH_KERNEL", "fp16")
    with pytest.raises(ValueError, match="RECSKETCH_KERNEL='fp16'"):
        kernel.product_precision(1280, 10)
    monkeypatch.setenv("RECSKETCH_KERNEL", "fp32")
    assert kernel.product_precision(1280, 10) == "fp32"
    monkeypatch.setenv("RECSKETCH_KERNEL", "bf16")
    assert kernel.product_precision(64, 100) == "bf16"  # asked for: whatever the shape
    monkeypatch.setenv("RECSKETCH_KERNEL", "auto")
    assert kernel.product_precision(64, 10) == "fp32"  # narrow rows: float32 is as fast
    assert kernel.product_precision(1280, 100) == "fp32"  # deep lists: float32 is faster
    assert kernel.product_precision(1280, 10) == ("bf16" if kernel._native_bf16() else "fp32")


def test_a_floor_is_rounded_down_to_the_tiles_precision() -> None:
    rng = np.random.default_rng(6)
    floors = np.concatenate([rng.normal(0, 1, 2000), [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30]])
    for precision in PRECISIONS:
        low = kernel.round_down(floors, precision)
        assert (low.astype(np.float64) <= floors).all(), precision
    low = kernel.round_down(floors, "bf16")
    bits = low.view(np.uint32)
    assert ((bits & 0xFFFF) == 0).all()  # a bfloat16 number
    step_up = np.where(low > 0, (bits + 0x10000).view(np.float32), (bits - 0x10000).view(np.float32))
    step_up = np.where(low == 0, 2.0**-133, step_up)
    assert (step_up.astype(np.float64) > floors).all()  # the largest one at or below


@pytest.mark.parametrize("scan", PRECISIONS)
def test_the_factor_scan_finds_every_pair_at_or_past_its_threshold(scan: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hybrid's scan of the 64-d factors: thresholds set at real pairs' cosines, so pairs
    sit exactly on them; the scan must return every pair at or past its row's threshold."""
    from recsketch import hybrid

    monkeypatch.setenv("RECSKETCH_KERNEL", scan)
    rng = np.random.default_rng(7)
    factors = normalise(rng.standard_normal((3000, 64)).astype(np.float32))
    side = kernel.Side(factors, kernel.scan_precision())
    queries = np.arange(100, 400)
    # float32 cosines as the scan reports them: a bfloat16 scan confirms its pairs with einsum, a
    # float32 one reads its tile
    # tile by tile as the scan computes it: some CPUs' sgemm rounds by a pair's place in the tile
    exact = np.einsum("qd,nd->qn", factors[queries], factors) if scan == "bf16" else \
        np.hstack([factors[queries] @ factors[start:start + 512].T for start in range(0, len(factors), 512)])
    threshold = -np.sort(-exact, axis=1)[:, 40].astype(np.float32)  # the 41st best of each row
    none = np.zeros(len(queries), dtype=bool)
    rows, cols, cfs = hybrid._hits(side, side.part(100, 400), threshold, none.copy(), none.copy(), 10_000, 512)
    expected = np.argwhere(exact >= threshold[:, None])
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == sorted(map(tuple, expected.tolist()))
    assert np.allclose(cfs, exact[rows, cols], atol=1e-6)
