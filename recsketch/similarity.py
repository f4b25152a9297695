"""Exact cosine top-k, one row block at a time: memory grows with block×N, never N×N."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse

from recsketch import kernel
from recsketch.kernel import merge_lists

DEFAULT_BLOCK_BYTES = 256 * 1024 * 1024


def normalise(features, copy: bool = True):
    """L2-normalised float32 rows, dense or scipy.sparse; all-zero rows stay zero (cosine 0).

    ``copy=False`` divides a float32 dense matrix in place (no second matrix in memory)."""
    if sparse.issparse(features):
        matrix = sparse.csr_matrix(features, dtype=np.float32)
        norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
        scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        return sparse.diags(scale.astype(np.float32)) @ matrix
    matrix = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if not copy:
        norms[norms == 0] = 1.0  # zero rows divided by 1 stay zero
        return np.divide(matrix, norms, out=matrix)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


def _dense_rows(features, rows: np.ndarray) -> np.ndarray:
    picked = features[rows]
    return picked.toarray() if sparse.issparse(picked) else np.asarray(picked)


def _scores(unit, start: int, stop: int, columns: slice = slice(None)) -> np.ndarray:
    """Cosine scores of rows start..stop against the given columns, as a dense float32 block."""
    block = unit[start:stop] @ unit[columns].T
    return (block.toarray() if sparse.issparse(block) else block).astype(np.float32, copy=False)


def block_rows_for(n_items: int, budget_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per block so that a block's float32 score matrix (plus sort scratch) fits the budget."""
    return max(1, min(n_items, budget_bytes // max(1, n_items * 4 * 3)))


def top_k_cosine(
    features: np.ndarray, k: int, block_rows: int | None = None, rows: tuple[int, int] | None = None,
    normalised: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the ``k`` most cosine-similar other rows, best first.

    Returns (indices int64 [m, k'], scores float32 [m, k']) with k' = min(k, n - 1). A row is
    never its own neighbour; ties are broken by the lower index, so results are deterministic.
    ``rows=(first, last)`` computes only those query rows against all items (m = last - first):
    a shard, independent of the others. ``normalised=True`` trusts that rows are unit vectors
    (or zero) and skips the normalised copy: half the memory for wide features.
    """
    features = features if sparse.issparse(features) else np.asarray(features, dtype=np.float32)
    unit = features if normalised else normalise(features)
    n = unit.shape[0]
    first, last = rows if rows is not None else (0, n)
    kk, indices, scores = _empty_lists(last - first, n, k)
    if kk <= 0:
        return indices, scores
    if not sparse.issparse(unit):
        return top_k_tiled(unit, k, (first, last))  # the kernel's exact scores, as every list holds them
    step = block_rows or block_rows_for(n)
    for start in range(first, last, step):
        stop = min(last, start + step)
        block = _scores(unit, start, stop)  # [rows, n]
        diagonal = np.arange(stop - start)
        block[diagonal, diagonal + start] = -np.inf  # never recommend a model to itself
        out = slice(start - first, stop - first)
        indices[out], scores[out] = _select(block, kk, features, start)
    return indices, scores


def _empty_lists(rows: int, n: int, k: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(k' = min(k, n - 1), the rows' neighbour indices and scores to fill)."""
    kk = min(k, n - 1)
    return kk, np.zeros((rows, max(kk, 0)), dtype=np.int64), np.zeros((rows, max(kk, 0)), dtype=np.float32)


def _select(block: np.ndarray, kk: int, features, start: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``kk`` best columns of each row of ``block`` (scores of rows ``start``.., or of the
    rows an index array names, vs all items), ordered by (-score, index); identical vectors
    rescored to exactly 1.0 and near-ties settled in float64 (``settle_ties``)."""
    return settle_ties(features, start, *exact_largest(block, kk))


def largest(block: np.ndarray, kk: int, *, ordered: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values) of the ``kk`` largest per row, best first if ``ordered`` (ties in no
    particular order). torch.topk when available: 6x faster than numpy's argpartition here,
    which at 512-d costs as much as the multiply."""
    try:
        import torch
    except ImportError:
        candidates = np.argpartition(-block, kk - 1, axis=1)[:, :kk]
        values = np.take_along_axis(block, candidates, axis=1)
        if ordered:
            order = np.argsort(-values, axis=1, kind="stable")
            candidates, values = np.take_along_axis(candidates, order, 1), np.take_along_axis(values, order, 1)
        return candidates, values
    top = torch.topk(torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)), kk, dim=1, sorted=ordered)
    return top.indices.numpy(), top.values.numpy()


class NpyRows:
    """Rows of a 2-d C-order ``.npy`` file, read on demand with ``pread`` into ordinary memory.

    Unlike a memory map, whose pages stay resident (and count as the task's RSS) once touched,
    a block read here is freed when dropped: a shard scanning a 5 GB matrix holds one block.
    """

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb")
        version = np.lib.format.read_magic(self._file)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(self._file)
        if fortran or len(shape) != 2:
            raise ValueError(f"{path}: expected a 2-d C-order array, got shape {shape}")
        self.shape, self.dtype, self._offset = tuple(shape), np.dtype(dtype), self._file.tell()
        self._row_bytes = self.shape[1] * self.dtype.itemsize

    def close(self) -> None:
        self._file.close()

    def _read(self, start: int, stop: int) -> np.ndarray:
        data = os.pread(self._file.fileno(), (stop - start) * self._row_bytes, self._offset + start * self._row_bytes)
        return np.frombuffer(data, self.dtype).reshape(stop - start, self.shape[1])

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, _ = key.indices(self.shape[0])
            return self._read(start, max(start, stop))
        rows = np.asarray(key).ravel()
        return np.stack([self._read(int(r), int(r) + 1)[0] for r in rows]) if len(rows) else \
            np.zeros((0, self.shape[1]), self.dtype)


def top_k_tiled(unit, k: int, rows: tuple[int, int] | np.ndarray, query_block: int = 2048,
                candidate_block: int = 32768) -> tuple[np.ndarray, np.ndarray]:
    """``top_k_cosine(unit, k, rows=rows, normalised=True)`` with both sides tiled: memory holds a
    query block, a candidate block and their score tile (~``query_block × candidate_block``
    floats), never a row block × N. ``unit`` may be an array, a memory map or :class:`NpyRows`
    over the run's consolidated features (unit rows): a shard of 10 k rows against 1 M items
    reads each candidate block once per query block. ``rows``: a block (first, last), or the
    query rows themselves (an index array, as a refresh's dirty rows are).

    Each tile's best are chosen exactly by (-score, index) and merged the same way, so the
    result is the exact top-k; scores near 1.0 are rescored in float64 as ``top_k_cosine`` does.
    """
    n = unit.shape[0]
    product = getattr(unit, "product", None)  # rows made on demand may score a tile without being copied
    queries = np.arange(*rows) if isinstance(rows, tuple) else np.asarray(rows, dtype=np.int64)
    kk, indices, scores = _empty_lists(len(queries), n, k)
    if kk <= 0:
        return indices, scores
    if _scored_exactly(unit):
        return _top_k_kernel(unit, kk, queries, query_block, candidate_block,
                             kernel.product_precision(unit.shape[1], kk))
    wide = min(kk + TIE_SPARE, n - 1)  # ties at the k-th place settled among a few more
    for q_first in range(0, len(queries), query_block):
        q_rows = queries[q_first : q_first + query_block]
        query = _query_rows(unit, q_rows)
        best = np.zeros((len(q_rows), 0), dtype=np.int64)
        best_scores = np.zeros((len(q_rows), 0), dtype=np.float32)
        for c_start in range(0, n, candidate_block):
            c_stop = min(n, c_start + candidate_block)
            tile = (product(query, c_start, c_stop) if product is not None
                    else query @ np.asarray(unit[c_start:c_stop], dtype=np.float32).T)
            own = np.flatnonzero((q_rows >= c_start) & (q_rows < c_stop))
            tile[own, q_rows[own] - c_start] = -np.inf  # never recommend a model to itself
            take = min(wide, c_stop - c_start)
            candidates, values = exact_largest(tile, take)
            best, best_scores = merge_lists(best, best_scores, candidates + c_start, values, wide)
        out = slice(q_first, q_first + len(q_rows))
        settled, settled_scores = settle_ties(unit, q_rows, best, best_scores)
        indices[out], scores[out] = settled[:, :kk], settled_scores[:, :kk]
    return indices, scores


def _scored_exactly(unit) -> bool:
    """Whether ``unit``'s lists go through ``recsketch.kernel`` (unit rows, read as they are):
    every score the float64 dot product rounded once, ties by the lower index, on every path.
    Rows made on demand (the hybrid's ``BlendedRows``) are scored by their own product and
    settled by :func:`settle_ties`."""
    return getattr(unit, "product", None) is None and getattr(unit, "cosine", True)


def _query_rows(unit, q_rows: np.ndarray) -> np.ndarray:
    """The query rows as float32: one slice read when they are contiguous, else picked."""
    contiguous = q_rows[-1] - q_rows[0] + 1 == len(q_rows)
    return np.asarray(unit[q_rows[0]:q_rows[-1] + 1] if contiguous else unit[q_rows], dtype=np.float32)


QUERY_SPAN = 16384  # query rows that share one read of the candidates (their float32 and bfloat16 copies in memory)


def _top_k_kernel(unit, kk: int, queries: np.ndarray, query_block: int, candidate_block: int,
                  precision: str = "bf16") -> tuple[np.ndarray, np.ndarray]:
    """``top_k_tiled`` through ``recsketch.kernel`` (candidates found in ``precision``, float64
    scores): up to ``QUERY_SPAN`` query rows at a time, each candidate block read (and rounded)
    once for them."""
    n = unit.shape[0]
    indices = np.full((len(queries), kk), -1, dtype=np.int64)
    scores = np.full((len(queries), kk), -np.inf, dtype=np.float32)
    for span_first in range(0, len(queries), QUERY_SPAN):
        span = queries[span_first : span_first + QUERY_SPAN]
        sides = []
        for q_first in range(0, len(span), query_block):
            q_rows = span[q_first : q_first + query_block]
            sides.append((q_first, q_rows, kernel.Side(_query_rows(unit, q_rows), precision)))
        for c_start in range(0, n, candidate_block):
            c_stop = min(n, c_start + candidate_block)
            block = kernel.Side(np.asarray(unit[c_start:c_stop], dtype=np.float32), precision)
            ids = np.arange(c_start, c_stop)
            for q_first, q_rows, side in sides:
                out = slice(span_first + q_first, span_first + q_first + len(q_rows))
                own = np.where((q_rows >= c_start) & (q_rows < c_stop), q_rows - c_start, -1)
                indices[out], scores[out] = kernel.merge_tile(side, block, ids, indices[out], scores[out], kk, own)
    return indices, scores


def exact_largest(block: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k selection every neighbour list goes through: the ``kk`` best columns of
    each row by (-score, index), ties at the k-th resolved exactly (argpartition and topk pick
    arbitrarily among values tied with the k-th). One more than ``kk`` is selected: a row whose
    (kk + 1)-th value equals its kk-th has a tie there, and only such rows are sorted whole."""
    take = min(kk + 1, block.shape[1])
    candidates, values = largest(block, take)
    order = np.lexsort((candidates, -values), axis=1)
    candidates, values = np.take_along_axis(candidates, order, 1), np.take_along_axis(values, order, 1)
    if take > kk:
        for row in np.flatnonzero(values[:, kk] >= values[:, kk - 1]):
            exact = np.lexsort((np.arange(block.shape[1]), -block[row]))[:kk]
            candidates[row, :kk], values[row, :kk] = exact, block[row, exact]
    return np.ascontiguousarray(candidates[:, :kk]), np.ascontiguousarray(values[:, :kk])


TIE_TOLERANCE = 4e-6  # relative: float32 products of equal pairs may differ by a few units of the last place
TIE_SPARE = 4  # neighbours kept past the k-th until ties are settled: a tie at the k-th place decided by index


def settle_ties(unit, start: int | np.ndarray, best: np.ndarray,
                best_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lists scored by a float32 product made canonical where it matters: scores near 1.0, and
    each pair of neighbours in a list within rounding of each other, are rescored in float64
    (``unit.exact_scores`` where the rows define it, else the dot product, divided by the norms
    near 1.0 for unit rows) and rounded once, then each list is sorted by (-score, index). So
    identical rows score exactly equal and come by the lower index, whichever product, tile or
    path found them. ``start``: the first query row (contiguous queries), or the query rows."""
    valid = best >= 0
    close = np.zeros(best.shape, dtype=bool)
    with np.errstate(invalid="ignore"):  # -inf pads: never close to anything
        close[:, 1:] = np.abs(best_scores[:, 1:] - best_scores[:, :-1]) <= TIE_TOLERANCE * np.maximum(
            1.0, np.abs(best_scores[:, 1:]))
    close[:, :-1] |= close[:, 1:]
    close |= best_scores > 1.0 - 1e-5
    rows, cols = np.nonzero(close & valid & np.isfinite(best_scores))
    if not len(rows):
        return best, best_scores
    queries = start + rows if isinstance(start, int) else np.asarray(start)[rows]
    best_scores = best_scores.copy()
    best_scores[rows, cols] = _exact_pair_scores(unit, queries, best[rows, cols])
    order = np.lexsort((np.where(valid, best, np.iinfo(np.int64).max), -best_scores), axis=1)
    return np.take_along_axis(best, order, 1), np.take_along_axis(best_scores, order, 1)


def _exact_pair_scores(unit, queries: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The float64 score of each (query row, column) pair, rounded to float32 once."""
    exact = getattr(unit, "exact_scores", None)
    if exact is not None:
        return np.asarray(exact(queries, columns), dtype=np.float32)
    a = _dense_rows(unit, queries).astype(np.float64)
    b = _dense_rows(unit, columns).astype(np.float64)
    dots = np.einsum("ij,ij->i", a, b)
    if getattr(unit, "cosine", True):
        near = dots >= kernel.NEAR_ONE
        norms = np.linalg.norm(a[near], axis=1) * np.linalg.norm(b[near], axis=1)
        dots[near] = np.minimum(dots[near] / np.where(norms > 0, norms, 1.0), 1.0)
    return dots.astype(np.float32)


def merge_new_items(
    features: np.ndarray, old_count: int, old_indices: np.ndarray, old_scores: np.ndarray, k: int,
    block_rows: int | None = None, normalised: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k for all rows when rows ``old_count:`` are new and the old rows' top-k is known.

    New rows are scored against everything; old rows only against the new items, merged
    with their known lists (exact: an old row's best old neighbours are already in its list).
    Costs (new × all) instead of (all × all). ``normalised=True`` trusts unit rows (no copy).
    """
    features = features if sparse.issparse(features) else np.asarray(features, dtype=np.float32)
    n = features.shape[0]
    kk = min(k, n - 1)
    if old_count == 0 or kk <= 0:
        return top_k_cosine(features, k, block_rows)
    unit = features if normalised else normalise(features)
    indices = np.zeros((n, kk), dtype=np.int64)
    scores = np.zeros((n, kk), dtype=np.float32)
    indices[old_count:], scores[old_count:] = top_k_cosine(unit, k, block_rows, rows=(old_count, n), normalised=True)
    step = block_rows or block_rows_for(n)
    for start in range(0, old_count, step):
        stop = min(old_count, start + step)
        block = np.full((stop - start, n), -np.inf, dtype=np.float32)  # only known candidates compete
        np.put_along_axis(block, old_indices[start:stop], old_scores[start:stop], axis=1)
        block[:, old_count:] = _scores(unit, start, stop, slice(old_count, None))
        indices[start:stop], scores[start:stop] = _select(block, kk, features, start)
    return indices, scores


def refresh_top_k(unit, depth: int, refresh: Refresh, rows: tuple[int, int] | None = None, block_rows: int = 2048,
                  candidate_block: int = 32768,
                  dirty: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-``depth`` of rows ``first..last`` (default: all) of ``unit`` from a previous
    result, as ``(indices, scores)`` padded with -1 / -inf where a row's list is shorter.

    ``refresh.clean`` rows kept their features, and their known list (``known_indices``/``scores``,
    in this row order, without the models that are gone or changed) is still the exact top
    ``refresh.limit`` among the models that kept theirs; they are scored only against the
    ``fresh`` columns (new models, changed features) and merged with their list, which stays
    exact to its ``limit``. Every other row (new, changed, or whose list lost too many models)
    is computed against all rows, tiled, to the full depth (or by ``dirty``, given the rows'
    numbers: an exact top-``depth`` of them found another way, as the hybrid's bound). Equal to a full recompute to each
    row's limit; costs (dirty rows x N) + (clean rows x fresh columns) instead of N x N.
    ``unit`` may be an array or :class:`NpyRows`: memory holds blocks and the fresh rows.
    """
    known_indices, known_scores, clean, fresh = refresh.known_indices, refresh.known_scores, refresh.clean, \
        refresh.fresh
    n = unit.shape[0]
    first, last = rows if rows is not None else (0, n)
    kk, indices, scores = _empty_lists(last - first, n, depth)
    if kk <= 0:
        return indices, scores
    indices[:], scores[:] = -1, -np.inf
    fresh = np.asarray(fresh, dtype=np.int64)
    clean = np.asarray(clean, dtype=bool)
    if clean[first:last].any() and known_indices.shape[1] < kk:
        raise ValueError(f"the known lists hold {known_indices.shape[1]} neighbours, fewer than depth {kk}")
    dirty_rows = first + np.flatnonzero(~clean[first:last])
    if len(dirty_rows):
        indices[dirty_rows - first], scores[dirty_rows - first] = \
            top_k_tiled(unit, kk, dirty_rows) if dirty is None else dirty(dirty_rows)
    fresh = np.sort(fresh)
    tiles = [fresh[i : i + candidate_block] for i in range(0, len(fresh), candidate_block)]
    exact = _scored_exactly(unit)  # the kernel's scores, as the dirty rows' are
    precision = kernel.product_precision(unit.shape[1], kk)

    def side(rows: np.ndarray):  # a kernel side, or plain rows in float32 (rows made on demand)
        return kernel.Side(rows, precision) if exact else rows

    loaded = [side(np.asarray(unit[tile], dtype=np.float32)) for tile in tiles] if len(tiles) == 1 else None
    for start in range(first, last, block_rows):  # one read of each row range; its clean rows picked from it
        stop = min(last, start + block_rows)
        block = start + np.flatnonzero(clean[start:stop])  # a clean row's list holds no fresh model, nor is it fresh
        if not len(block):
            continue
        query = side(np.asarray(unit[start:stop], dtype=np.float32)[block - start])
        best, best_scores = known_indices[block, :kk], known_scores[block, :kk]
        wide = kk if exact else min(kk + TIE_SPARE, n - 1)  # float32 scores: ties at the k-th settled among more
        for number, tile in enumerate(tiles):  # the fresh models, a tile at a time, merged into the lists
            rows_of_tile = loaded[number] if loaded is not None else side(np.asarray(unit[tile], dtype=np.float32))
            if exact:
                best, best_scores = kernel.merge_tile(query, rows_of_tile, tile, best, best_scores, kk)
            else:
                candidates, values = exact_largest((query @ rows_of_tile.T).astype(np.float32), min(wide, len(tile)))
                best, best_scores = merge_lists(best, best_scores, tile[candidates], values, wide)
        if not exact:
            best, best_scores = settle_ties(unit, block, best, best_scores)
            best, best_scores = best[:, :kk], best_scores[:, :kk]
        beyond = np.arange(best.shape[1])[None, :] >= refresh.limit[block][:, None]  # past a row's limit: unknown
        best, best_scores = np.where(beyond, -1, best), np.where(beyond, -np.inf, best_scores).astype(np.float32)
        indices[block - first, :best.shape[1]], scores[block - first, :best.shape[1]] = best, best_scores
    return indices, scores


@dataclass(frozen=True)
class Refresh:
    """What :func:`refresh_top_k` needs to work a previous result forward, in the new row order."""

    clean: np.ndarray  # bool [n]: the row keeps its known list
    known_indices: np.ndarray  # int64 [n, depth]: the previous list in new positions, gone ones removed, -1 pads
    known_scores: np.ndarray  # float32 [n, depth], -inf pads
    fresh: np.ndarray  # int64: the rows whose features are new (new models, changed ones)
    limit: np.ndarray  # int64 [n]: how deep a clean row's list stays exact once the fresh models are merged

    @property
    def dirty(self) -> int:
        return int((~self.clean).sum())

    @property
    def cost(self) -> float:
        """The share of a full N x N pass that the refresh computes."""
        n = len(self.clean)
        return (self.dirty * n + (n - self.dirty) * len(self.fresh)) / max(1, n * n)


def plan_refresh(old_ids: Sequence[str], old_indices: np.ndarray, old_scores: np.ndarray, new_ids: Sequence[str],
                 changed: set[str], k: int, depth: int | None = None, block_rows: int = 65_536) -> Refresh:
    """Map a previous top-``depth`` (rows ``old_ids``, -1 pads allowed) onto ``new_ids``.

    A model that is gone or ``changed`` leaves every list it was in, and what remains of a list
    is still exact, only shorter (removing models does not reorder the others): a row stays
    clean while it keeps its model, its features, and at least ``max(k, depth / 2)`` neighbours
    (or holds every other model that kept its features, when the catalogue is that small), so
    a deletion dirties a row only once its list has worn down. New and changed models are fresh.
    """
    depth = k if depth is None else max(k, depth)
    position = {mid: row for row, mid in enumerate(new_ids)}
    old_to_new = np.array([position.get(mid, -1) if mid not in changed else -1 for mid in old_ids], dtype=np.int64)
    n = len(new_ids)
    kk = min(depth, n - 1)
    old = set(old_ids)
    fresh = np.array([row for row, mid in enumerate(new_ids) if mid not in old or mid in changed], dtype=np.int64)
    clean = np.zeros(n, dtype=bool)
    limit = np.zeros(n, dtype=np.int64)
    known_indices = np.full((n, max(kk, 0)), -1, dtype=np.int64)
    known_scores = np.full((n, max(kk, 0)), -np.inf, dtype=np.float32)
    if kk > 0 and old_indices.shape[1] > 0:
        need = min(kk, max(k, -(-depth // 2)))
        for start in range(0, len(old_ids), block_rows):  # by row blocks: a million lists x 100 fit in 4 GB
            old_rows = start + np.flatnonzero(old_to_new[start : start + block_rows] >= 0)
            listed = old_indices[old_rows]
            mapped = np.where(listed >= 0, old_to_new[np.maximum(listed, 0)], -1)
            order = np.argsort(mapped < 0, axis=1, kind="stable")[:, :kk]  # what remains, in its order, then pads
            mapped = np.take_along_axis(mapped, order, 1)
            mapped_scores = np.where(mapped >= 0, np.take_along_axis(old_scores[old_rows], order, 1), -np.inf)
            width = mapped.shape[1]
            remaining = (mapped >= 0).sum(axis=1)
            complete = remaining >= n - len(fresh) - 1  # every other model that kept its features is listed
            keep = complete | (remaining >= need)
            rows = old_to_new[old_rows[keep]]
            clean[rows] = True
            limit[rows] = np.where(complete[keep], kk, remaining[keep])
            known_indices[rows, :width], known_scores[rows, :width] = mapped[keep], mapped_scores[keep]
    return Refresh(clean, known_indices, known_scores, fresh, limit)


def reduce_dimensions(features: np.ndarray, dim: int, seed: int = 0, power_iterations: int = 2) -> np.ndarray:
    """Project the L2-normalised features on their top ``dim`` right singular vectors.

    A truncated SVD without centring (centring would change the cosines even at full rank),
    by a randomised SVD (Halko et al.): O(n·d·dim), not O(d³). Cosine top-k on the result
    approximates the exact one; recall_at_k says how well.
    """
    unit = normalise(np.asarray(features, dtype=np.float32))
    if dim >= min(unit.shape):
        return unit
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(unit @ rng.standard_normal((unit.shape[1], dim + 10), dtype=np.float32))
    for _ in range(power_iterations):
        basis, _ = np.linalg.qr(unit @ (unit.T @ basis))
    _, _, components = np.linalg.svd(basis.T @ unit, full_matrices=False)
    return unit @ components[:dim].T


def recall_at_k(exact: np.ndarray, approximate: np.ndarray) -> float:
    """Share of the exact top-k neighbours that the approximate top-k also found."""
    hits = sum(len(set(a) & set(b)) for a, b in zip(exact, approximate, strict=True))
    return hits / exact.size if exact.size else 1.0


def reduce_measured(unit: np.ndarray, dim: int, k: int, sample_rows: int = 500) -> tuple[np.ndarray, float, int]:
    """(unit rows projected to ``dim`` (:func:`reduce_dimensions`), the recall@k of their top-k
    against the exact one, measured on the first ``sample_rows`` rows, how many rows that was)."""
    reduced = normalise(reduce_dimensions(unit, dim), copy=False)
    sample = (0, min(len(unit), sample_rows))
    recall = recall_at_k(top_k_cosine(unit, k, rows=sample)[0], top_k_cosine(reduced, k, rows=sample)[0])
    return reduced, recall, sample[1]
