"""Feature extraction throughput (issue 4): JPEG files -> chunk files, per backbone and precision.

For each configuration, three measurements in separate processes (so peak RSS is each one's own):
  model   - the backbone alone on pre-decoded uint8 batches (the ceiling),
  e2e     - recsketch's extraction: decode on a thread overlapped with inference, chunk files,
  seed    - rec-a-sketch's approach: decode every image into one float64 array, then batches of
            32 through the model (Keras ``predict`` for VGG16), no overlap.

    python -m benchmarks.extract_bench [--images 192] [--only vgg16-float32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    "efficientnet_lite0-float32": ("efficientnet_lite0", "float32"),
    "efficientnet_lite0-bfloat16": ("efficientnet_lite0", "bfloat16"),
    "vgg16-float32": ("vgg16", "float32"),
    "vgg16-bfloat16": ("vgg16", "bfloat16"),
}
GOALS = {"efficientnet_lite0-float32": 100.0, "efficientnet_lite0-bfloat16": 100.0, "vgg16-float32": 14.0}


def make_thumbnails(folder: Path, count: int) -> list[Path]:
    from recsketch.demo import PHOTOS, VARIANTS, load_photo, variant

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    photos = [load_photo(name) for name in PHOTOS]
    paths = []
    for index in range(count):
        path = folder / f"{index:032x}.jpg"
        variant(photos[index % len(photos)], VARIANTS[index // len(photos) % 4], rng).save(path, quality=90)
        paths.append(path)
    return paths


def build(backbone_name: str, precision: str):  # type: ignore[no-untyped-def]
    from recsketch.features.backbones import EfficientNetLite0Backbone, VGG16Backbone

    if backbone_name == "vgg16":  # speed does not depend on the weights' values
        return VGG16Backbone(weights="random", pooling="flatten", precision=precision)
    return EfficientNetLite0Backbone(precision=precision)


def measure(config: str, mode: str, folder: Path) -> dict:
    from recsketch.config import Settings
    from recsketch.features.chunks import ChunkStore
    from recsketch.features.extract import extract_chunk
    from recsketch.features.images import load_image

    backbone = build(*CONFIGS[config])
    paths = sorted(folder.glob("*.jpg"))
    batch = backbone.batch_size
    warm = np.stack([load_image(p, 224) for p in paths[:batch]])
    backbone.embed(warm)  # build graphs / pick kernels before timing
    started = time.perf_counter()
    if mode == "model":
        decoded = np.stack([load_image(p, 224) for p in paths])
        started = time.perf_counter()
        for i in range(0, len(decoded), batch):
            backbone.embed(decoded[i : i + batch])
    elif mode == "e2e":
        with tempfile.TemporaryDirectory() as tmp:
            store = ChunkStore(Path(tmp), backbone.key)
            mids = [p.stem for p in paths]
            size = Settings().chunk_size  # the product's default chunk, each one fsync'ed
            for c in range(0, len(mids), size):
                extract_chunk(store, backbone, f"c{c}", mids[c : c + size], lambda m: folder / f"{m}.jpg",
                              batch, progress=lambda _: None)
    else:  # the seed: everything decoded into float64 first, then predict in batches of 32
        from PIL import Image

        images = np.zeros((len(paths), 224, 224, 3), dtype=np.float64)
        for i, p in enumerate(paths):
            images[i] = np.asarray(Image.open(p).convert("RGB").resize((224, 224)), dtype=np.float64)
        if CONFIGS[config][0] == "vgg16":
            from keras.applications.vgg16 import preprocess_input

            backbone._model.predict(preprocess_input(images), batch_size=32, verbose=0)
        else:
            for i in range(0, len(images), 32):
                backbone.embed(images[i : i + 32])
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds, "peak_rss_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--only", choices=list(CONFIGS), action="append")
    parser.add_argument("--one", nargs=3, metavar=("CONFIG", "MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], Path(args.one[2]))))
        return
    print(f"extraction benchmark: {args.images} thumbnails, {os.cpu_count()} cores, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}")
    print(f"{'config':<28}{'model img/s':>12}{'e2e img/s':>11}{'seed img/s':>12}{'e2e/model':>10}"
          f"{'e2e/seed':>9}{'RSS e2e MiB':>12}{'RSS seed MiB':>13}")
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="recsketch-bench-") as tmp:
        folder = Path(tmp) / "thumbs"
        make_thumbnails(folder, args.images)
        for config in args.only or list(CONFIGS):
            results[config] = {}
            for mode in ("model", "e2e", "seed"):
                out = subprocess.run([sys.executable, "-m", "benchmarks.extract_bench", "--one", config, mode,
                                      str(folder)], capture_output=True, text=True, check=True)
                results[config][mode] = json.loads(out.stdout.strip().splitlines()[-1])
            r = {m: results[config][m] for m in ("model", "e2e", "seed")}
            print(f"{config:<28}{r['model']['images_per_s']:>12.1f}{r['e2e']['images_per_s']:>11.1f}"
                  f"{r['seed']['images_per_s']:>12.1f}{r['e2e']['images_per_s'] / r['model']['images_per_s']:>10.2f}"
                  f"{r['e2e']['images_per_s'] / r['seed']['images_per_s']:>9.2f}"
                  f"{r['e2e']['peak_rss_mib']:>12.0f}{r['seed']['peak_rss_mib']:>13.0f}")
    for config, goal in GOALS.items():
        if config in results:
            got = results[config]["e2e"]["images_per_s"]
            print(f"goal {config}: e2e >= {goal:g} img/s -> {got:.1f} ({'met' if got >= goal else 'NOT met'})")
    if "vgg16-float32" in results and "vgg16-bfloat16" in results:
        ratio = results["vgg16-bfloat16"]["e2e"]["images_per_s"] / results["vgg16-float32"]["e2e"]["images_per_s"]
        print(f"goal vgg16 bf16 >= 1.5x fp32 -> {ratio:.2f}x ({'met' if ratio >= 1.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
