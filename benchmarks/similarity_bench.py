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
    from recsketch.similarity import block_rows_for, normalise, top_k_cosine

    x = features(n, d)
    rows = sample_rows or n
    if mode == "blocked":
        import torch  # noqa: F401  (top-k selection uses torch.topk: its one-time ~0.8 s import is not timed)
    started = time.perf_counter()
    if mode == "dense":
        unit = normalise(x)
        scores = unit @ unit.T
        np.fill_diagonal(scores, -np.inf)
        np.argpartition(-scores, K, axis=1)[:, :K]
    elif mode == "blocked":
        top_k_cosine(x, K, rows=(0, rows))
    else:
        unit = normalise(x)
        step = block_rows_for(n)
        for start in range(0, rows, step):
            unit[start : min(rows, start + step)] @ unit.T
    seconds = time.perf_counter() - started
    full = seconds * n / rows
    return {"seconds": full, "estimated": bool(sample_rows), "gflops": 2 * n * n * d / full / 1e9,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


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
    print(f"{'shape':<22}{'mode':<9}{'seconds':>12}{'GFLOP/s':>9}{'peak RSS MiB':>14}")
    for label, n, d, sample, modes in cases:
        got = {}
        for mode in modes:
            out = subprocess.run([sys.executable, "-m", "benchmarks.similarity_bench", "--one", mode, str(n), str(d),
                                  str(sample)], capture_output=True, text=True, check=True)
            got[mode] = r = json.loads(out.stdout.strip().splitlines()[-1])
            seconds = f"{r['seconds']:.1f}" + (" est." if r["estimated"] else "")
            print(f"{label:<22}{mode:<9}{seconds:>12}{r['gflops']:>9.1f}{r['peak_rss_mib']:>14.0f}")
        print(f"{'':<22}blocked/matmul speed: {got['blocked']['gflops'] / got['matmul']['gflops']:.2f} (goal >= 0.7)"
              + (f", dense/blocked RSS: {got['dense']['peak_rss_mib'] / got['blocked']['peak_rss_mib']:.1f}x"
                 if "dense" in got else ""))
        if d == 512:
            million = got["blocked"]["seconds"] * (1_000_000 / n) ** 2
            print(f"{'':<22}1M x {d}: est. {million / 3600:.1f} h on one such machine; "
                  f"{int(np.ceil(million / 3600))} one-hour row-block shards")


if __name__ == "__main__":
    main()
