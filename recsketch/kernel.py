"""The exact top-k tile kernel: a fast product finds candidates, a proven bound keeps every
model that could be in a list, and float64 scores decide it.

A score tile is first computed in a low precision (bfloat16 on CPUs that multiply it natively,
about twice the float32 rate here; float32 elsewhere). For a tile scored ``ŝ`` with
``|ŝ - s| <= ε`` for every pair, the k-th best exact score of a row is at least
``t - ε`` (``t``: the tile's k-th best ``ŝ``) and at least the row's running k-th; a model can
only enter the list if ``ŝ >= max(t - 2ε, running k-th - ε)``. Those candidates are scored
exactly (:func:`exact_scores`) and merged by (-score, index). Every path that builds a
neighbour list (a full pass, a refresh's clean rows, the in-memory reference) ends in the same
exact scores, so their lists agree to the last bit, whatever precision found the candidates.
Past the exact window (float32 tiles scored by sgemm itself) the last bits can depend on a
pair's place in its tile (seen on a Zen 5's OpenBLAS): paths agree within 1e-6 there.

The bound, for rows ``q``, ``c`` and their bfloat16 roundings ``q̃ = q - r_q``, ``c̃ = c - r_c``:
``|q·c - q̃·c̃| <= |q̃||r_c| + |r_q||c̃| + |r_q||r_c|`` (Cauchy-Schwarz, with the residuals'
actual norms), plus float32 accumulation (``d · 2^-24 · |q̃||c̃|``) and the output's rounding to
bfloat16 (``2^-8 · |ŝ|``). Each candidate's ``|ŝ - s|`` is checked against it; a tile that
breaks it (a library that accumulates differently) is recomputed in float32.
"""

from __future__ import annotations

import logging
import os
import warnings
from functools import cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BF16_UNIT = 2.0**-8  # bfloat16's unit roundoff (8 significant bits)
FP32_UNIT = 2.0**-24
NEAR_ONE = 1.0 - 1e-5  # at or above it, a score is divided by the rows' norms (identical rows: exactly 1.0)
PAIR_BLOCK = 256  # candidate pairs scored at a time: small gathers stay in the allocator's cache
SPARE = 24  # candidates per row beyond k read from the tile's top before a row is searched whole
MERGE_ROWS = 256  # query rows whose candidates are merged into their lists at a time


BF16_MIN_DIM = 768  # below it the bfloat16 product gains nothing here over float32 (measured: equal at 512)
BF16_MAX_K = 32  # deeper lists: float32 is faster (at k = 100 the window's exact scoring outweighs the product)


@cache
def torch_module():  # torch, imported when first needed
    import torch

    return torch


@cache
def _native_bf16() -> bool:
    """Whether torch is installed and the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def product_precision(dim: int, k: int) -> str:
    """``bf16`` or ``fp32`` for top-``k`` lists of rows of ``dim`` features: ``RECSKETCH_KERNEL``
    (auto, bf16, fp32). auto takes bfloat16 where it is native, the rows are at least
    ``BF16_MIN_DIM`` wide and k at most ``BF16_MAX_K``: its wider candidate window costs more
    exact scoring than a deeper list saves (measured in docs/benchmarks.md)."""
    wanted = os.environ.get("RECSKETCH_KERNEL", "auto").strip().lower()
    if wanted not in ("auto", "bf16", "fp32"):
        raise ValueError(f"RECSKETCH_KERNEL={wanted!r}: expected auto, bf16 or fp32")
    if wanted == "bf16":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ValueError("RECSKETCH_KERNEL=bf16 needs torch, which is not installed") from None
        return "bf16"
    return "bf16" if wanted == "auto" and dim >= BF16_MIN_DIM and k <= BF16_MAX_K and _native_bf16() else "fp32"


def scan_precision() -> str:
    """The precision of a threshold scan of narrow rows (the hybrid's 64-d factors): bfloat16
    where it is native and ``RECSKETCH_KERNEL`` is not fp32 (a 64-d product is bound by its
    output: bfloat16 scans it 2.3x faster here), else float32. Hits are confirmed in float32."""
    wanted = os.environ.get("RECSKETCH_KERNEL", "auto").strip().lower()
    if wanted not in ("auto", "bf16", "fp32"):
        raise ValueError(f"RECSKETCH_KERNEL={wanted!r}: expected auto, bf16 or fp32")
    return "bf16" if wanted == "bf16" or (wanted == "auto" and _native_bf16()) else "fp32"


class Side:
    """One side of a tile (query rows or candidate rows): float32 rows, their norms and, in
    bfloat16 mode, their rounding and its residual's norm, made once and reused per tile."""

    def __init__(self, rows: np.ndarray, precision: str) -> None:
        self.rows = np.ascontiguousarray(rows, dtype=np.float32)
        self.precision = precision
        self.norms = _norms(self.rows)
        self.low = None
        self.low_norms = self.norms
        self.residual_norms = np.zeros(len(self.rows))
        if precision == "bf16":
            torch = torch_module()
            with warnings.catch_warnings():  # rows read from a file are read-only; torch only reads them here
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                low = torch.from_numpy(self.rows).to(torch.bfloat16)
            residual = np.empty(len(self.rows))
            for first in range(0, len(self.rows), 1024):  # in cache-sized pieces: no full float32 copy
                part = slice(first, first + 1024)
                residual[part] = _norms(self.rows[part] - low[part].to(torch.float32).numpy())  # exact in float32
            self.low = low
            self.residual_norms = residual
            self.low_norms = self.norms + residual  # |q̃| <= |q| + |q - q̃|


    def take(self, ids: np.ndarray) -> Side:
        """Rows ``ids`` of this side (copies of the rows, nothing recomputed)."""
        piece = Side.__new__(Side)
        piece.rows, piece.precision, piece.norms = self.rows[ids], self.precision, self.norms[ids]
        piece.low = self.low[torch_module().from_numpy(np.asarray(ids, dtype=np.int64))] if self.low is not None \
            else None
        piece.low_norms, piece.residual_norms = self.low_norms[ids], self.residual_norms[ids]
        return piece

    def part(self, first: int, last: int) -> Side:
        """Rows first..last of this side (views, nothing recomputed)."""
        piece = Side.__new__(Side)
        piece.rows, piece.precision, piece.norms = self.rows[first:last], self.precision, self.norms[first:last]
        piece.low = self.low[first:last] if self.low is not None else None
        piece.low_norms, piece.residual_norms = self.low_norms[first:last], self.residual_norms[first:last]
        return piece


def _norms(rows: np.ndarray) -> np.ndarray:
    """Row norms, rounded up: summed in float32 (fast), then raised by more than its rounding."""
    return np.sqrt(np.einsum("ij,ij->i", rows, rows).astype(np.float64)) * (1 + (rows.shape[1] + 2) * FP32_UNIT)


def error_bound(query: Side, candidates: Side) -> np.ndarray:
    """Each query row's bound on ``|ŝ - s|`` over the tile (see the module's docstring)."""
    d = query.rows.shape[1]
    c_norm, c_low, c_res = (float(v.max()) if len(v) else 0.0
                            for v in (candidates.norms, candidates.low_norms, candidates.residual_norms))
    if query.precision == "bf16":
        bound = (query.low_norms * c_res + query.residual_norms * c_low + query.residual_norms * c_res
                 + 1.01 * d * FP32_UNIT * query.low_norms * c_low)
        bound = bound + BF16_UNIT * (query.low_norms * c_low + bound)  # the output's rounding: |ŝ| <= |q̃||c̃| + ε
    else:
        bound = 1.01 * (d + 2) * FP32_UNIT * query.norms * c_norm  # float32 accumulation and the output's rounding
    return bound * 1.001 + 4 * FP32_UNIT  # + the lists' float32 rounding of the exact scores


def candidate_pairs(query: Side, candidates: Side, kk: int, running: np.ndarray,
                    own: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows, columns, their ŝ, each row's bound): every pair of the tile that could enter its
    row's top ``kk``, given the row's running k-th exact score (``-inf``: the list is not full).

    The tile's ``kk + SPARE`` best per row usually hold every such pair; only a row whose last of
    them still reaches its floor is searched whole."""
    bound = error_bound(query, candidates)
    width = len(candidates.rows)
    take, wide = min(kk, width), min(kk + SPARE, width)
    inside = np.flatnonzero(own >= 0) if own is not None else np.zeros(0, dtype=np.int64)
    if query.precision == "bf16" and query.low is not None and candidates.low is not None:
        torch = torch_module()
        tile = query.low @ candidates.low.T
        tile[torch.from_numpy(inside), torch.from_numpy(own[inside] if own is not None else inside)] = -torch.inf
        top = torch.topk(tile, wide, dim=1, sorted=True) if take else None

        def whole_rows(rows: np.ndarray) -> np.ndarray:
            return tile[torch.from_numpy(rows)].to(torch.float32).numpy()
        top_pair = (top.values.to(torch.float32).numpy(), top.indices.numpy()) if top is not None else None
    else:
        dense = query.rows @ candidates.rows.T
        if own is not None:
            dense[inside, own[inside]] = -np.inf
        top_pair = _top(dense, wide) if take else None

        def whole_rows(rows: np.ndarray) -> np.ndarray:
            return dense[rows]
    if top_pair is None:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32), bound
    top_values, top_indices = np.asarray(top_pair[0], dtype=np.float32), np.asarray(top_pair[1])
    floor = np.maximum(np.maximum(top_values[:, take - 1] - 2 * bound, running - bound), -1e30)
    floor32 = round_down(floor, query.precision)
    rows, slots = np.nonzero(top_values >= floor32[:, None])
    cols, values = top_indices[rows, slots], top_values[rows, slots]
    whole = np.flatnonzero(top_values[:, -1] >= floor32) if wide < width else np.zeros(0, dtype=np.int64)
    if len(whole):  # the spare ran out: these rows are searched over the whole tile
        keep = ~np.isin(rows, whole)
        searched = whole_rows(whole)
        more_rows, more_cols = np.nonzero(searched >= floor32[whole][:, None])
        rows = np.concatenate([rows[keep], whole[more_rows]])
        cols = np.concatenate([cols[keep], more_cols])
        values = np.concatenate([values[keep], searched[more_rows, more_cols]])
        order = np.argsort(rows, kind="stable")
        rows, cols, values = rows[order], cols[order], values[order]
    return rows, cols, values, bound


def _top(dense: np.ndarray, wide: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, columns) of each row's ``wide`` largest, best first: torch.topk when installed
    (several times numpy's argpartition here), else numpy."""
    try:
        torch = torch_module()
    except ImportError:
        columns = np.argpartition(-dense, wide - 1, axis=1)[:, :wide]
        values = np.take_along_axis(dense, columns, 1)
        order = np.argsort(-values, axis=1, kind="stable")
        return np.take_along_axis(values, order, 1), np.take_along_axis(columns, order, 1)
    top = torch.topk(torch.from_numpy(dense), wide, dim=1, sorted=True)
    return top.values.numpy(), top.indices.numpy()


def round_down(values: np.ndarray, precision: str) -> np.ndarray:
    """The largest numbers of the tile's precision at or below ``values``, as float32 (exact): a
    tile compared with them keeps every entry that reaches the float64 floor."""
    low = values.astype(np.float32)
    low = np.where(low > values, np.nextafter(low, np.float32(-np.inf)), low).astype(np.float32)
    if precision != "bf16":
        return low
    bits = low.view(np.uint32)
    kept = bits & np.uint32(0xFFFF0000)  # bfloat16 is float32's upper half: truncation goes toward zero
    exact = (bits & np.uint32(0xFFFF)) == 0
    away = kept + np.uint32(0x10000)  # one bfloat16 step away from zero: down, for a negative number
    return np.where(exact | (low > 0), kept.view(np.float32), away.view(np.float32)).astype(np.float32)


def exact_scores(query: np.ndarray, candidates: np.ndarray, q_rows: np.ndarray, c_rows: np.ndarray) -> np.ndarray:
    """The score of each pair (``query[q_rows[i]]``, ``candidates[c_rows[i]]``) of unit (or zero)
    rows as every list holds it: the float64 dot product rounded to float32; at or above
    ``NEAR_ONE`` divided by both norms and capped at 1.0, so identical rows score exactly 1.0."""
    return _exact(query, candidates, q_rows, c_rows)[0]


def _exact(query: np.ndarray, candidates: np.ndarray, q_rows: np.ndarray,
           c_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the pairs' scores as ``exact_scores`` defines them, their float64 dot products)."""
    out = np.empty(len(q_rows), dtype=np.float64)
    raw = np.empty(len(q_rows), dtype=np.float64)
    for start in range(0, len(q_rows), PAIR_BLOCK):
        part = slice(start, start + PAIR_BLOCK)
        a, b = query[q_rows[part]].astype(np.float64), candidates[c_rows[part]].astype(np.float64)
        dots = np.einsum("ij,ij->i", a, b)
        raw[part] = dots
        near = dots >= NEAR_ONE
        if near.any():
            norms = np.linalg.norm(a[near], axis=1) * np.linalg.norm(b[near], axis=1)
            dots[near] = np.minimum(dots[near] / np.where(norms > 0, norms, 1.0), 1.0)
        out[part] = dots
    return out.astype(np.float32), raw


def merge_lists(best: np.ndarray, best_scores: np.ndarray, candidates: np.ndarray, values: np.ndarray,
                kk: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``kk`` best of two candidate lists per row by (-score, index); -1 / -inf pads sort last."""
    merged = np.concatenate([best, candidates], axis=1)
    merged_scores = np.concatenate([best_scores, values], axis=1)
    order = np.lexsort((merged, -merged_scores), axis=1)[:, :kk]
    return np.take_along_axis(merged, order, 1), np.take_along_axis(merged_scores, order, 1)


def merge_tile(query: Side, candidates: Side, candidate_ids: np.ndarray, best: np.ndarray, best_scores: np.ndarray,
               kk: int, own: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``best`` (ids, exact scores [q, kk], -1 / -inf pads) merged with the tile's candidates.

    ``own[i]``: query row i's column in this tile (-1: none), never its own neighbour."""
    running = best_scores[:, kk - 1] if best_scores.shape[1] >= kk else np.full(len(best), -np.inf)
    rows, cols, approx, bound = candidate_pairs(query, candidates, kk, running.astype(np.float64), own)
    values, dots = _exact(query.rows, candidates.rows, rows, cols)
    if len(rows) and (np.abs(dots - approx) > bound[rows]).any():
        if query.precision == "fp32":
            raise RuntimeError("float32 scores broke their own error bound: the BLAS library is not IEEE float32")
        log.warning("a bfloat16 tile broke its error bound; recomputed in float32")
        return merge_tile(Side(query.rows, "fp32"), Side(candidates.rows, "fp32"), candidate_ids, best, best_scores,
                          kk, own)
    return merge_pairs(best, best_scores, rows, candidate_ids[cols], values, kk)


def merge_pairs(best: np.ndarray, best_scores: np.ndarray, rows: np.ndarray, ids: np.ndarray, values: np.ndarray,
                kk: int) -> tuple[np.ndarray, np.ndarray]:
    """``best`` merged with scored pairs (``rows`` ascending), a group of rows at a time: a row
    with many candidates widens only its own group."""
    starts = np.searchsorted(rows, np.arange(len(best) + 1))
    merged, merged_scores = [], []
    for first in range(0, len(best), MERGE_ROWS):
        last = min(len(best), first + MERGE_ROWS)
        part = slice(starts[first], starts[last])
        counts = np.diff(starts[first:last + 1])
        width = int(counts.max()) if len(counts) else 0
        if width == 0:
            merged.append(best[first:last])
            merged_scores.append(best_scores[first:last])
            continue
        group_rows = rows[part] - first
        slot = np.arange(len(group_rows)) - np.repeat(starts[first:last] - starts[first], counts)
        found = np.full((last - first, width), -1, dtype=np.int64)
        found_scores = np.full((last - first, width), -np.inf, dtype=np.float32)
        found[group_rows, slot], found_scores[group_rows, slot] = ids[part], values[part]
        group, group_scores = merge_lists(best[first:last], best_scores[first:last], found, found_scores, kk)
        merged.append(group)
        merged_scores.append(group_scores)
    return np.concatenate(merged), np.concatenate(merged_scores)
