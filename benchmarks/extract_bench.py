"""Feature extraction throughput (issues 4 and 16): JPEG files -> chunk files, per backbone,
runtime and precision.

For each configuration, measurements in separate processes (so peak RSS is each one's own):
  model   - the backbone alone on pre-decoded uint8 batches (the ceiling); its features are kept
            to compare with the reference (torch fp32 for Lite0): min cosine, and for reduced
            precision the share of each image's top-10 neighbours (among these images) kept,
  e2e     - recsketch's extraction: decode on threads overlapped with inference, chunk files,
  seed    - rec-a-sketch's approach (reference runtimes only): decode every image into one
            float64 array, then batches of 32 through the model, no overlap.

    python -m benchmarks.extract_bench [--images 192] [--only lite0-float32-onnxruntime] [--wide]

``--wide``: 720x405 thumbnails, as crawls fetch them (7x the pixels to decode).
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

CONFIGS = {  # name: (backbone, precision, runtime)
    "lite0-float32-torch": ("efficientnet_lite0", "float32", "torch"),
    "lite0-bfloat16-torch": ("efficientnet_lite0", "bfloat16", "torch"),
    "lite0-float32-onnxruntime": ("efficientnet_lite0", "float32", "onnxruntime"),
    "lite0-float32-openvino": ("efficientnet_lite0", "float32", "openvino"),
    "lite0-bfloat16-openvino": ("efficientnet_lite0", "bfloat16", "openvino"),
    "vgg16-float32-tensorflow": ("vgg16", "float32", "tensorflow"),
    "vgg16-bfloat16-tensorflow": ("vgg16", "bfloat16", "tensorflow"),
}
REFERENCE = {"efficientnet_lite0": "lite0-float32-torch", "vgg16": "vgg16-float32-tensorflow"}
BASELINE = "lite0-float32-torch"  # torch eager fp32: what issue 16's ratios are against


def make_thumbnails(folder: Path, count: int, wide: bool = False) -> list[Path]:
    from PIL import Image, ImageOps

    from recsketch.demo import PHOTOS, VARIANTS, load_photo, variant

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    photos = [load_photo(name) for name in PHOTOS]
    paths = []
    for index in range(count):
        path = folder / f"{index:032x}.jpg"
        photo = photos[index % len(photos)]
        image = (ImageOps.fit(photo, (720, 405), Image.Resampling.BICUBIC) if wide
                 else variant(photo, VARIANTS[index // len(photos) % 4], rng))
        image.save(path, quality=90)
        paths.append(path)
    return paths


def build(backbone_name: str, precision: str, runtime: str, exports: Path):  # type: ignore[no-untyped-def]
    from recsketch.features import runtimes
    from recsketch.features.backbones import EfficientNetLite0Backbone, VGG16Backbone, set_threads

    set_threads(os.cpu_count() or 1)
    if backbone_name == "vgg16":  # speed does not depend on the weights' values
        return VGG16Backbone(weights="random", pooling="flatten", precision=precision)
    if runtime == "torch":
        return EfficientNetLite0Backbone(precision=precision)
    return runtimes.lite0_backbone(runtime, precision, exports, os.cpu_count() or 1)


def measure(config: str, mode: str, folder: Path) -> dict:
    from recsketch.config import Settings
    from recsketch.features.chunks import ChunkStore
    from recsketch.features.extract import extract_chunk
    from recsketch.features.images import load_image

    backbone = build(*CONFIGS[config], folder.parent / "exports")
    paths = sorted(folder.glob("*.jpg"))
    batch = backbone.batch_size
    warm = np.stack([load_image(p, 224) for p in paths[:batch]])
    backbone.embed(warm)  # build graphs / pick kernels before timing
    started = time.perf_counter()
    if mode == "model":
        decoded = np.stack([load_image(p, 224) for p in paths])
        started = time.perf_counter()
        features = [backbone.embed(decoded[i : i + batch]) for i in range(0, len(decoded), batch)]
        seconds = time.perf_counter() - started
        np.save(folder.parent / f"features-{config}.npy", np.concatenate(features))
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
        if CONFIGS[config][0] == "vgg16":  # Keras predict, as the seed did
            from keras.applications.vgg16 import preprocess_input

            backbone._model.predict(preprocess_input(images), batch_size=32, verbose=0)
        else:
            for i in range(0, len(images), 32):
                backbone.embed(images[i : i + 32])
    if mode != "model":
        seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds, "peak_rss_mib": peak_mib}


def agreement(work: Path, config: str) -> tuple[float, float]:
    """(min cosine vs the reference's features, mean share of top-10 neighbours kept)."""
    from recsketch.features.runtimes import cosines
    from recsketch.similarity import top_k_cosine

    reference = np.load(work / f"features-{REFERENCE[CONFIGS[config][0]]}.npy")
    got = np.load(work / f"features-{config}.npy")
    kept = [len(set(a) & set(b)) / len(a) for a, b in zip(top_k_cosine(reference, 10)[0], top_k_cosine(got, 10)[0],
                                                           strict=True)]
    return float(cosines(reference, got).min()), float(np.mean(kept))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--only", choices=list(CONFIGS), action="append")
    parser.add_argument("--wide", action="store_true", help="720x405 thumbnails, as crawls fetch them")
    parser.add_argument("--one", nargs=3, metavar=("CONFIG", "MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], Path(args.one[2]))))
        return
    print(f"extraction benchmark: {args.images} thumbnails of {'720x405' if args.wide else '200x200'}, "
          f"{os.cpu_count()} cores, batch of each backbone's own size")
    print(f"{'config':<28}{'model':>8}{'e2e':>8}{'seed':>8}{'e2e/model':>10}{'e2e/torch':>10}{'RSS e2e':>9}"
          f"{'cosine':>10}{'top-10':>8}   (img/s, MiB; cosine and top-10 kept vs the fp32 reference)")
    results: dict[str, dict[str, dict]] = {}
    configs = args.only or list(CONFIGS)
    if BASELINE not in configs:
        configs = [BASELINE, *configs]
    configs = sorted(configs, key=lambda c: c not in REFERENCE.values())  # references first
    with tempfile.TemporaryDirectory(prefix="recsketch-bench-") as tmp:
        folder = Path(tmp) / "thumbs"
        make_thumbnails(folder, args.images, args.wide)
        for config in configs:
            results[config] = {}
            modes = ("model", "e2e", "seed") if config in REFERENCE.values() else ("model", "e2e")
            for mode in modes:
                out = subprocess.run([sys.executable, "-m", "benchmarks.extract_bench", "--one", config, mode,
                                      str(folder)], capture_output=True, text=True, check=True)
                results[config][mode] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[config]
            cosine, kept = agreement(Path(tmp), config)
            e2e, model = r["e2e"]["images_per_s"], r["model"]["images_per_s"]
            seed = f"{r['seed']['images_per_s']:>8.1f}" if "seed" in r else f"{'-':>8}"
            print(f"{config:<28}{model:>8.1f}{e2e:>8.1f}{seed}{e2e / model:>10.2f}"
                  f"{e2e / results[BASELINE]['e2e']['images_per_s']:>10.2f}{r['e2e']['peak_rss_mib']:>9.0f}"
                  f"{cosine:>10.6f}{kept:>8.3f}", flush=True)
    base = results[BASELINE]["e2e"]["images_per_s"]
    exact = [c for c in ("lite0-float32-onnxruntime", "lite0-float32-openvino") if c in results]
    if exact:
        best = max(results[c]["e2e"]["images_per_s"] for c in exact)
        print(f"goal: Lite0 exact end to end >= 3.5x torch eager fp32 -> {best / base:.2f}x "
              f"({'met' if best / base >= 3.5 else 'NOT met'}); e2e/model of the runtimes: "
              + ", ".join(f"{c} {results[c]['e2e']['images_per_s'] / results[c]['model']['images_per_s']:.2f}"
                          for c in exact) + " (goal >= 0.85)")
    if "lite0-bfloat16-openvino" in results:
        ratio = results["lite0-bfloat16-openvino"]["e2e"]["images_per_s"] / base
        print(f"goal: Lite0 bf16 (opted in) >= 8x torch eager fp32 -> {ratio:.2f}x "
              f"({'met' if ratio >= 8 else 'NOT met'})")
    if "vgg16-float32-tensorflow" in results and "vgg16-bfloat16-tensorflow" in results:
        ratio = (results["vgg16-bfloat16-tensorflow"]["e2e"]["images_per_s"]
                 / results["vgg16-float32-tensorflow"]["e2e"]["images_per_s"])
        print(f"goal vgg16 bf16 >= 1.5x fp32 -> {ratio:.2f}x ({'met' if ratio >= 1.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
