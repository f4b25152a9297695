"""The chunk-store key of every backbone configuration, and which runtime runs it.

A key names everything that changes a backbone's output (weights, pooling, precision,
preprocessing, and the runtime where it rounds differently), so features of one
configuration are never reused for another. Nothing here imports torch or TensorFlow: the
keys are known before any model loads.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from pathlib import Path

from recsketch.config import Settings
from recsketch.errors import ConfigError, WeightsUnavailable

EXACT_RUNTIMES = ("onnxruntime", "openvino")
VGG16_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


def lite0_key(precision: str, runtime: str = "torch") -> str:
    """Exact runtimes (proven at export) share torch fp32's chunks; reduced precision differs
    per runtime (torch autocast and OpenVINO bf16 round differently), so it is in the key."""
    key = f"efficientnet_lite0-avg-{precision}-imagenet"
    return key if precision == "float32" or runtime == "torch" else f"{key}-{runtime}"


def vgg16_key(weights: str, pooling: str, precision: str) -> str:
    """``imagenet`` is one file (Keras checks its hash when it fetches it); a weights file is
    named by its content, so replacing the file under the same name makes a new key."""
    source = weights if weights in ("imagenet", "random") else f"file-{weights_digest(Path(weights))}"
    return f"vgg16-{pooling}-{precision}-{source}"


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def content_digest(path: Path) -> str:
    """A file's content hash, cached per path, size and mtime (FileNotFoundError if absent)."""
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def weights_digest(path: Path) -> str:
    """A weights file's content hash (cached per size and mtime); a missing file says so."""
    try:
        return content_digest(path)
    except FileNotFoundError:
        raise WeightsUnavailable(f"VGG16 weights file {path} does not exist "
                                 f"(expected Keras' {VGG16_NOTOP_FILE} or a saved .weights.h5)") from None


def version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def installed(runtime: str) -> bool:
    return version_of(runtime) != "absent"


def resolve_runtime(backbone: str, runtime: str, precision: str = "float32") -> str:
    """The runtime ``auto`` stands for, or the one asked for if it can run this backbone.

    Lite0 fp32: ``exact`` (whichever of ONNX Runtime and OpenVINO is installed and faster here,
    picked when the backbone is built; both proven to agree with torch, so they share its chunk
    key), else torch; bf16: OpenVINO if installed, else torch autocast. VGG16: TensorFlow (the
    seed's path and its reference)."""
    if backbone == "vgg16":
        if runtime not in ("auto", "tensorflow"):
            raise ConfigError(f"RECSKETCH_RUNTIME={runtime} cannot run vgg16: it runs on tensorflow (or auto)")
        return "tensorflow"
    if runtime == "tensorflow":
        raise ConfigError("RECSKETCH_RUNTIME=tensorflow cannot run efficientnet_lite0: use auto, onnxruntime, "
                          "openvino or torch")
    if runtime == "onnxruntime" and precision != "float32":
        raise ConfigError("onnxruntime runs efficientnet_lite0 in float32 only: set RECSKETCH_LITE0_PRECISION="
                          "float32, or RECSKETCH_RUNTIME=openvino or torch for bfloat16")
    if runtime != "auto":
        if runtime != "torch" and not installed(runtime):
            raise ConfigError(f"RECSKETCH_RUNTIME={runtime}, but the package {runtime} is not installed")
        return runtime
    if precision == "float32":
        return "exact" if any(installed(r) for r in EXACT_RUNTIMES) else "torch"
    return "openvino" if installed("openvino") else "torch"


def backbone_key(settings: Settings) -> str:
    """The chunk-store key of the configured backbone and preprocessing, without loading it."""
    if settings.backbone == "efficientnet_lite0":
        runtime = resolve_runtime("efficientnet_lite0", settings.runtime, settings.lite0_precision)
        key = lite0_key(settings.lite0_precision, runtime)
    else:
        key = vgg16_key(settings.vgg16_weights, settings.vgg16_pooling, settings.vgg16_precision)
    return f"{key}-{settings.preprocess}"
