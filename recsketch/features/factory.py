"""The configured backbone on its runtime: the one place that knows every backbone and runtime."""

from __future__ import annotations

import logging

from recsketch.config import Settings
from recsketch.errors import ConfigError
from recsketch.features import runtimes
from recsketch.features.backbones import Backbone, EfficientNetLite0Backbone, VGG16Backbone
from recsketch.features.keys import resolve_runtime

log = logging.getLogger(__name__)


def create_backbone(settings: Settings, threads: int | None = None) -> Backbone:
    """The configured backbone on its runtime (RECSKETCH_RUNTIME; ``auto``: the fastest exact one
    installed, see ``recsketch.features.runtimes``), using ``threads`` CPU threads (default: the
    task's share, RECSKETCH_THREADS)."""
    threads = threads or settings.effective_threads
    if settings.backbone == "efficientnet_lite0":
        runtime = resolve_runtime("efficientnet_lite0", settings.runtime, settings.lite0_precision)
        if runtime == "torch":
            return EfficientNetLite0Backbone(precision=settings.lite0_precision, threads=threads)
        try:
            return runtimes.lite0_backbone(runtime, settings.lite0_precision, settings.data_root / "exports", threads,
                                           pick=runtime == "exact")
        except runtimes.ExportFailed as exc:
            if settings.runtime != "auto":
                raise
            log.warning("%s; extracting with torch instead", exc)
            return EfficientNetLite0Backbone(precision=settings.lite0_precision, threads=threads)
    if settings.backbone == "vgg16":
        resolve_runtime("vgg16", settings.runtime)  # a runtime that cannot run it is refused, named
        return VGG16Backbone(weights=settings.vgg16_weights, pooling=settings.vgg16_pooling,
                             precision=settings.vgg16_precision, threads=threads)
    raise ConfigError(f"unknown backbone {settings.backbone!r}")
