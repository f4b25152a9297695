import numpy as np
import pytest

from recsketch.similarity import block_rows_for, top_k_cosine


def reference(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense N×N, sorted by (-score, index): the definition the blocked version must meet."""
    x = features.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    scores = unit @ unit.T
    np.fill_diagonal(scores, -np.inf)
    kk = min(k, len(x) - 1)
    order = np.array([np.lexsort((np.arange(len(x)), -row))[:kk] for row in scores]).reshape(len(x), kk)
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize(("n", "d", "k", "block"), [(1, 4, 5, None), (2, 3, 10, 1), (50, 16, 5, 7),
                                                    (200, 64, 10, 33), (31, 8, 40, None)])
def test_matches_dense_reference(n: int, d: int, k: int, block: int | None) -> None:
    features = np.random.default_rng(n).normal(size=(n, d)).astype(np.float32)
    indices, scores = top_k_cosine(features, k, block_rows=block)
    ref_indices, ref_scores = reference(features, k)
    assert indices.shape == (n, min(k, n - 1))
    assert (indices == ref_indices).all()
    assert np.allclose(scores, ref_scores, atol=1e-5)
    assert not (indices == np.arange(n)[:, None]).any()  # never itself


def test_ties_are_broken_by_lower_index_in_every_block_size() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 8)).astype(np.float32)
    features = np.repeat(base, 5, axis=0)  # groups of 5 identical rows: many exact ties
    features[7] = 0  # and a zero vector
    ref_indices, _ = reference(features, 3)
    for block in (1, 4, 30):
        indices, _ = top_k_cosine(features, 3, block_rows=block)
        assert (indices == ref_indices).all()
    assert (top_k_cosine(features, 3)[1][0] == 1.0).all()  # identical thumbnails keep score exactly 1
    assert np.allclose(top_k_cosine(features, 3)[1][7], 0.0)  # zero vector: cosine 0


def test_block_size_follows_the_memory_budget() -> None:
    assert block_rows_for(25_655, 256 * 2**20) == 256 * 2**20 // (25_655 * 12)
    assert block_rows_for(10, 10**9) == 10
    assert block_rows_for(10**7, 1) == 1


def test_row_shards_concatenate_to_the_whole() -> None:
    features = np.random.default_rng(5).normal(size=(97, 12)).astype(np.float32)
    whole_i, whole_s = top_k_cosine(features, 6)
    parts = [top_k_cosine(features, 6, block_rows=9, rows=(a, min(97, a + 30))) for a in range(0, 97, 30)]
    assert (np.concatenate([p[0] for p in parts]) == whole_i).all()
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), whole_s, atol=1e-6)  # BLAS edge paths


@pytest.mark.parametrize(("n_old", "n_new", "k"), [(80, 20, 5), (3, 40, 10), (50, 1, 7), (1, 1, 5), (60, 0, 4)])
def test_incremental_equals_full_recompute(n_old: int, n_new: int, k: int) -> None:
    from recsketch.similarity import merge_new_items

    features = np.random.default_rng(n_old * 100 + n_new).normal(size=(n_old + n_new, 16)).astype(np.float32)
    old_indices, old_scores = top_k_cosine(features[:n_old], k)
    merged_i, merged_s = merge_new_items(features, n_old, old_indices, old_scores, k, block_rows=7)
    full_i, full_s = top_k_cosine(features, k)
    assert (merged_i == full_i).all()
    np.testing.assert_allclose(merged_s, full_s, atol=1e-6)


def test_incremental_keeps_identical_items_at_one() -> None:
    from recsketch.similarity import merge_new_items

    base = np.random.default_rng(1).normal(size=(30, 8)).astype(np.float32)
    features = np.concatenate([base, base[:5]])  # five new models repeat old thumbnails exactly
    old_i, old_s = top_k_cosine(base, 3)
    merged_i, merged_s = merge_new_items(features, 30, old_i, old_s, 3)
    assert (merged_s[30:35, 0] == 1.0).all() and (merged_i[30:35, 0] == np.arange(5)).all()
    assert (merged_s[:5, 0] == 1.0).all() and (merged_i[:5, 0] == np.arange(30, 35)).all()


def test_sparse_features_give_the_same_neighbours() -> None:
    from scipy import sparse

    from recsketch.similarity import merge_new_items

    rng = np.random.default_rng(4)
    dense = np.maximum(rng.normal(size=(120, 300)), 0).astype(np.float32)  # ReLU output: about half zeros
    dense[rng.random(dense.shape) < 0.6] = 0
    dense[9] = 0  # an all-zero row
    matrix = sparse.csr_matrix(dense)
    dense_i, dense_s = top_k_cosine(dense, 8, block_rows=50)
    sparse_i, sparse_s = top_k_cosine(matrix, 8, block_rows=50)
    assert (sparse_i == dense_i).all()
    np.testing.assert_allclose(sparse_s, dense_s, atol=1e-5)
    old_i, old_s = top_k_cosine(matrix[:100], 8)
    merged_i, _ = merge_new_items(matrix, 100, old_i, old_s, 8)
    assert (merged_i == dense_i).all()


def test_pca_keeps_most_neighbours_and_recall_is_measured() -> None:
    from recsketch.similarity import recall_at_k, reduce_dimensions

    rng = np.random.default_rng(6)
    latent = rng.normal(size=(600, 24)).astype(np.float32)
    features = latent @ rng.normal(size=(24, 512)).astype(np.float32) + 0.05 * rng.normal(size=(600, 512))
    exact, _ = top_k_cosine(features, 10)
    reduced = reduce_dimensions(features, 32)
    assert reduced.shape == (600, 32)
    recall = recall_at_k(exact, top_k_cosine(reduced, 10)[0])
    assert recall >= 0.9, recall
    assert recall_at_k(exact, top_k_cosine(reduce_dimensions(features, 2), 10)[0]) < recall  # too few: worse
    assert recall_at_k(exact, exact) == 1.0
    assert reduce_dimensions(features, 600).shape == (600, 512)  # asking for more than there is: all kept
    assert recall_at_k(exact, top_k_cosine(reduce_dimensions(features, 599), 10)[0]) == 1.0  # full rank: exact


def test_normalised_input_skips_the_copy_and_gives_the_same_result() -> None:
    from recsketch.similarity import normalise

    features = np.random.default_rng(2).normal(size=(40, 9)).astype(np.float32)
    features[3] = 0
    unit = normalise(features)
    assert (top_k_cosine(unit, 5, normalised=True)[0] == top_k_cosine(features, 5)[0]).all()
    in_place = features.copy()
    assert normalise(in_place, copy=False) is in_place and np.allclose(in_place, unit) and not in_place[3].any()


@pytest.mark.parametrize(("added", "changed", "gone"), [(2, 1, 1), (0, 0, 5), (60, 10, 10), (0, 40, 0)])
def test_refresh_equals_a_full_recompute(added: int, changed: int, gone: int, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Working a previous top-k forward gives the full recompute's lists, ties and all: in
    memory or from the run's file of unit rows, in one row block or by blocks, the fresh
    models in one tile or many."""
    from recsketch.similarity import NpyRows, normalise, plan_refresh, refresh_top_k, top_k_cosine

    rng = np.random.default_rng(added + 3 * changed + 7 * gone)
    ids = [f"m{i:03d}" for i in range(200)]
    rows = {mid: row for mid, row in zip(ids, normalise(rng.normal(size=(200, 8))), strict=True)}
    rows["m001"] = rows["m000"].copy()  # identical pictures: a tie at exactly 1.0
    old_indices, old_scores = top_k_cosine(np.stack([rows[m] for m in ids]), 5, normalised=True)
    picked = rng.choice(np.arange(2, 200), changed + gone, replace=False)
    moved = {ids[i] for i in picked[:changed]}
    for mid in moved:
        rows[mid] = normalise(rng.normal(size=(1, 8)))[0]
    new_ids = [m for i, m in enumerate(ids) if i not in set(picked[changed:].tolist())]
    new_ids += [f"n{i:03d}" for i in range(added)]
    rows.update({mid: normalise(rng.normal(size=(1, 8)))[0] for mid in new_ids if mid.startswith("n")})
    day = np.stack([rows[m] for m in new_ids]).astype(np.float32)
    refresh = plan_refresh(ids, old_indices, old_scores, new_ids, moved, 5)
    assert len(refresh.fresh) == added + changed
    indices, scores = refresh_top_k(day, 5, refresh)
    full_indices, full_scores = top_k_cosine(day, 5, normalised=True)
    assert (indices == full_indices).all() and np.abs(scores - full_scores).max() <= 1e-6
    np.save(tmp_path / "unit.npy", day)
    rows = NpyRows(tmp_path / "unit.npy")
    try:
        parts = [refresh_top_k(rows, 5, refresh, rows=(first, min(len(new_ids), first + 64)), block_rows=16,
                               candidate_block=7)
                 for first in range(0, len(new_ids), 64)]
    finally:
        rows.close()
    assert (np.concatenate([p[0] for p in parts]) == full_indices).all()
    assert np.abs(np.concatenate([p[1] for p in parts]) - full_scores).max() <= 1e-6


def test_deep_lists_lose_gone_models_and_stay_exact_to_their_limit() -> None:
    """Kept to a depth beyond the served k, a list that loses a deleted or changed model is
    not recomputed: what remains is the exact top of the rest, merged with the new models, as
    deep as it still is; only a list worn below half its depth (or k) is computed again."""
    from recsketch.similarity import normalise, plan_refresh, refresh_top_k, top_k_cosine

    rng = np.random.default_rng(5)
    ids = [f"m{i:03d}" for i in range(300)]
    rows = dict(zip(ids, normalise(rng.normal(size=(300, 8))), strict=True))
    old_indices, old_scores = top_k_cosine(np.stack([rows[m] for m in ids]), 20, normalised=True)
    gone = set(rng.choice(ids, 6, replace=False).tolist())
    moved = set(rng.choice(sorted(set(ids) - gone), 3, replace=False).tolist())
    for mid in moved:
        rows[mid] = normalise(rng.normal(size=(1, 8)))[0]
    new_ids = [m for m in ids if m not in gone] + [f"n{i}" for i in range(4)]
    rows.update({f"n{i}": normalise(rng.normal(size=(1, 8)))[0] for i in range(4)})
    day = np.stack([rows[m] for m in new_ids]).astype(np.float32)
    refresh = plan_refresh(ids, old_indices, old_scores, new_ids, moved, k=3, depth=20)
    by_blocks = plan_refresh(ids, old_indices, old_scores, new_ids, moved, k=3, depth=20, block_rows=7)
    for field in ("clean", "known_indices", "known_scores", "fresh", "limit"):  # memory bounded, same plan
        assert np.array_equal(getattr(by_blocks, field), getattr(refresh, field)), field
    touched = np.isin(old_indices, [ids.index(m) for m in gone | moved]).any(axis=1)
    assert refresh.dirty < 3 + 4 + touched.sum() / 4  # a touched list mostly stays clean
    indices, scores = refresh_top_k(day, 20, refresh)
    full_indices, full_scores = top_k_cosine(day, 20, normalised=True)
    shorter = (indices < 0).any(axis=1)
    assert shorter.any() and (indices[:, :10] >= 0).all()  # worn lists keep at least half their depth
    for row in range(len(new_ids)):
        depth = int((indices[row] >= 0).sum())
        assert (indices[row, :depth] == full_indices[row, :depth]).all()
        assert np.abs(scores[row, :depth] - full_scores[row, :depth]).max() <= 1e-6
        assert (scores[row, depth:] == -np.inf).all()
