"""Top-k similarity at scale (issue 5): the seed's dense N×N matrix vs recsketch's row blocks.

Each measurement runs in its own process, so peak RSS is its own:
  dense   - the seed: the full N×N float32 similarity matrix, then a top-k per row,
  blocked - recsketch.similarity.top_k_cosine (row blocks, memory ∝ block × N; torch imported
            before timing, a one-time ~0.8 s per process),
  matmul  - a bare float32 multiply of the same shapes, block by block (the speed ceiling).
Large shapes time a sample of row blocks and extrapolate (marked "est."); RSS is measured.

    python -m benchmarks.similarity_bench [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

K = 10


def features(n: int, d: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)


def run(mode: str, n: int, d: int, sample_rows: int) -> dict:
    """Time one mode. With ``sample_rows``, the one-time part (normalising the features, which
    also faults their pages in) is timed once and only the per-row part is scaled to N rows."""
    from recsketch.similarity import block_rows_for, normalise, top_k_cosine

    x = features(n, d)
    rows = sample_rows or n
    if mode == "blocked":
        import torch  # noqa: F401  (top-k selection uses torch.topk: its one-time ~0.8 s import is not timed)
    started = time.perf_counter()
    unit = normalise(x)
    fixed = time.perf_counter() - started
    started = time.perf_counter()
    if mode == "dense":
        scores = unit @ unit.T
        np.fill_diagonal(scores, -np.inf)
        np.argpartition(-scores, K, axis=1)[:, :K]
    elif mode == "blocked":
        del x
        top_k_cosine(unit, K, rows=(0, rows), normalised=True)
    else:
        step = block_rows_for(n)
        for start in range(0, rows, step):
            unit[start : min(rows, start + step)] @ unit.T
    per_rows = time.perf_counter() - started
    full = fixed + per_rows * n / rows
    return {"seconds": full, "estimated": bool(sample_rows), "gflops": 2 * n * n * d / full / 1e9,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def pca_recall() -> None:
    """recall@10 of PCA-reduced features, on real ones: EfficientNet-Lite0 on the demo photos."""
    import tempfile
    from pathlib import Path

    from recsketch.demo import build_demo_catalog
    from recsketch.features.backbones import EfficientNetLite0Backbone
    from recsketch.features.images import load_image
    from recsketch.similarity import recall_at_k, reduce_dimensions, top_k_cosine

    with tempfile.TemporaryDirectory() as tmp:
        groups = build_demo_catalog(Path(tmp))
        images = np.stack([load_image(Path(tmp) / "model_thumbs" / f"{mid}_thumb200.jpg", 224) for mid in groups])
    backbone = EfficientNetLite0Backbone()
    feats = np.concatenate([backbone.embed(images[i : i + 4]) for i in range(0, len(images), 4)])
    exact, _ = top_k_cosine(feats, K)
    line = ", ".join(f"{dim}-d {recall_at_k(exact, top_k_cosine(reduce_dimensions(feats, dim), K)[0]):.2f}"
                     for dim in (8, 16, 32, 64, 71))
    print(f"PCA recall@{K} on {len(feats)} real Lite0 features (1280-d): {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        mode, n, d, sample = args.one
        print(json.dumps(run(mode, int(n), int(d), int(sample))))
        return
    import numpy

    config = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
    print(f"similarity benchmark, top-{K}: BLAS {config.get('name')} {config.get('version')}, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}, {os.cpu_count()} cores")
    n_seed = 4_000 if args.quick else 25_655
    cases = [  # (label, n, d, sample rows or 0, modes)
        (f"N={n_seed:,} x 1280", n_seed, 1280, 0, ("dense", "blocked", "matmul")),
        (f"N={n_seed:,} x 25088", n_seed, 25_088, 0 if args.quick else 2048, ("blocked", "matmul")),
        (f"N={20_000 if args.quick else 200_000:,} x 512", 20_000 if args.quick else 200_000, 512, 2048,
         ("blocked", "matmul")),
    ]
    if not args.quick:
        cases.insert(2, (f"N={n_seed:,} x 25088", n_seed, 25_088, 0, ("dense",)))
    print(f"{'shape':<22}{'mode':<9}{'seconds':>12}{'GFLOP/s':>9}{'peak RSS MiB':>14}")
    for label, n, d, sample, modes in cases:
        got = {}
        for mode in modes:
            out = subprocess.run([sys.executable, "-m", "benchmarks.similarity_bench", "--one", mode, str(n), str(d),
                                  str(sample)], capture_output=True, text=True, check=True)
            got[mode] = r = json.loads(out.stdout.strip().splitlines()[-1])
            seconds = f"{r['seconds']:.1f}" + (" est." if r["estimated"] else "")
            print(f"{label:<22}{mode:<9}{seconds:>12}{r['gflops']:>9.1f}{r['peak_rss_mib']:>14.0f}")
        if "blocked" in got:
            ratio = got["blocked"]["gflops"] / got["matmul"]["gflops"]
            rss = (f", dense/blocked RSS: {got['dense']['peak_rss_mib'] / got['blocked']['peak_rss_mib']:.1f}x"
                   if "dense" in got else "")
            print(f"{'':<22}blocked/matmul speed: {ratio:.2f} (goal >= 0.7){rss}")
        if d == 512 and "blocked" in got:
            million = got["blocked"]["seconds"] * (1_000_000 / n) ** 2
            print(f"{'':<22}1M x {d}: est. {million / 3600:.1f} h on one such machine; "
                  f"{int(np.ceil(million / 3600))} one-hour row-block shards")


    pca_recall()
    day_refresh(20_000 if args.quick else 100_000, 256)
    against_faiss(4096, 20_000 if args.quick else 100_000, 1280)
    exact_against_plain(1024, 32_768 if args.quick else 262_144, 1280, 100)


class _PlainRows:
    """Unit rows scored by their own float32 product (``product``): ``top_k_tiled``'s plain path,
    which every list took before issue 36 where bfloat16 was not chosen."""

    cosine = True

    def __init__(self, unit: np.ndarray) -> None:
        self.unit, self.shape, self.dtype = unit, unit.shape, unit.dtype

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        return self.unit[key]

    def product(self, query: np.ndarray, start: int, stop: int) -> np.ndarray:
        return query @ self.unit[start:stop].T


def exact_against_plain(queries: int, n: int, d: int, k: int, rounds: int = 2) -> None:
    """What the exact float32 kernel (float64 scores, ties by index on every path) costs over the
    plain float32 path it replaced, at the visual lists' depth: the same rows, best of rounds."""
    from recsketch.similarity import normalise, top_k_tiled

    unit = normalise(np.random.default_rng(6).standard_normal((n, d), dtype=np.float32))
    before = os.environ.get("RECSKETCH_KERNEL")
    os.environ["RECSKETCH_KERNEL"] = "fp32"
    times: dict[str, list[float]] = {"kernel": [], "plain": []}
    try:
        for _ in range(rounds):
            for name, rows in (("kernel", unit), ("plain", _PlainRows(unit))):
                started = time.perf_counter()
                top_k_tiled(rows, k, (0, queries))
                times[name].append(time.perf_counter() - started)
    finally:
        os.environ.pop("RECSKETCH_KERNEL", None) if before is None else os.environ.update(RECSKETCH_KERNEL=before)
    kernel, plain = min(times["kernel"]), min(times["plain"])
    print(f"exact float32 kernel vs the plain float32 path, top-{k} of {queries:,} queries x {n:,} x {d}: "
          f"{kernel:.2f} s vs {plain:.2f} s = {kernel / plain:.2f}x the time (the price of ties broken alike)")


def against_faiss(queries: int, n: int, d: int, rounds: int = 3) -> None:
    """A shard's kernel (``top_k_tiled``) beside FAISS's exact ``IndexFlatIP`` on the same
    clustered unit rows, interleaved rounds (best of each), in each product precision the
    kernel can use here, and whether their top-k agree."""
    import faiss

    from recsketch import kernel
    from recsketch.similarity import normalise, top_k_tiled

    rng = np.random.default_rng(5)
    centres = rng.standard_normal((n // 100, d), dtype=np.float32)
    unit = normalise(centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, d), dtype=np.float32))
    index = faiss.IndexFlatIP(d)
    index.add(unit)
    precisions = ["bf16", "fp32"] if kernel._native_bf16() else ["fp32"]
    ours: dict[str, list[float]] = {p: [] for p in precisions}
    lists: dict[str, np.ndarray] = {}
    theirs = []
    before = os.environ.get("RECSKETCH_KERNEL")
    top_k_tiled(unit[:4096], K, (0, 256))  # the bfloat16 kernels' first call compiles them: not timed
    try:
        for _ in range(rounds):
            for precision in precisions:
                os.environ["RECSKETCH_KERNEL"] = precision
                started = time.perf_counter()
                lists[precision], _ = top_k_tiled(unit, K, (0, queries))
                ours[precision].append(time.perf_counter() - started)
            started = time.perf_counter()
            _, found = index.search(unit[:queries], K + 1)  # FAISS lists the row itself first
            theirs.append(time.perf_counter() - started)
    finally:
        os.environ.pop("RECSKETCH_KERNEL", None) if before is None else os.environ.update(RECSKETCH_KERNEL=before)
    own = found == np.arange(queries)[:, None]
    peers = np.array([row[~mask][:K] for row, mask in zip(found, own, strict=True)])
    for precision in precisions:
        indices = lists[precision]
        agree = float((np.sort(indices, axis=1) == np.sort(peers, axis=1)).all(axis=1).mean())
        differ = float((indices != lists[precisions[-1]]).any(axis=1).mean())  # near-ties within float32's rounding
        print(f"a shard's exact top-{K} ({precision} candidates) vs FAISS IndexFlatIP {faiss.__version__}, "
              f"{queries:,} queries x {n:,} x {d}: {min(ours[precision]):.2f} s vs {min(theirs):.2f} s = "
              f"{min(theirs) / min(ours[precision]):.2f} of FAISS's speed (goal >= 1.0); the same top-{K} sets "
              f"for {agree:.2%} of rows; {differ:.2%} of lists ordered otherwise than the fp32 kernel's")


def day_refresh(n: int, d: int) -> None:
    """A day of 0.1 % new models, 0.03 % changed thumbnails and 0.03 % gone, worked into the last
    exact result (``refresh_top_k``) vs a full pass over the day's models; both exact, compared."""
    from recsketch.similarity import normalise, plan_refresh, refresh_top_k, top_k_cosine

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((200, d), dtype=np.float32)

    def clustered(count: int) -> np.ndarray:
        return normalise(centres[rng.integers(0, 200, count)] + 0.5 * rng.standard_normal((count, d), dtype=np.float32))

    ids = [f"{i:032x}" for i in range(n)]
    unit = clustered(n)
    old_indices, old_scores = top_k_cosine(unit, K, normalised=True)
    added, changed_n, gone_n = n // 1000, max(1, 3 * n // 10_000), max(1, 3 * n // 10_000)
    picked = rng.choice(n, changed_n + gone_n, replace=False)
    changed, gone = {ids[i] for i in picked[:changed_n]}, {ids[i] for i in picked[changed_n:]}
    rows = {mid: unit[i] for i, mid in enumerate(ids) if mid not in gone}
    rows.update(zip(sorted(changed), clustered(changed_n), strict=True))
    new_ids = [mid for mid in ids if mid not in gone] + [f"{n + i:032x}" for i in range(added)]
    rows.update(zip(new_ids[-added:], clustered(added), strict=True))
    day = np.stack([rows[mid] for mid in new_ids])
    started = time.perf_counter()
    refresh = plan_refresh(ids, old_indices, old_scores, new_ids, changed, K)
    indices, scores = refresh_top_k(day, K, refresh)
    refreshed = time.perf_counter() - started
    started = time.perf_counter()
    full_indices, full_scores = top_k_cosine(day, K, normalised=True)
    full = time.perf_counter() - started
    same = bool((indices == full_indices).all() and np.abs(scores - full_scores).max() <= 1e-6)
    print(f"a day worked forward, N={n:,} x {d}: {added} new, {changed_n} changed, {gone_n} gone: "
          f"{refresh.dirty:,} rows recomputed, planned {refresh.cost:.3f} of a full pass; "
          f"{refreshed:.2f} s vs a full pass {full:.2f} s = {refreshed / full:.3f} (goal <= 0.05); "
          f"equal to the full pass: {same}")


if __name__ == "__main__":
    main()
