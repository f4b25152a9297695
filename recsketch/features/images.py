"""Thumbnail decoding: any common format to RGB uint8 at the backbone's input size.

Every failure becomes a BadImageError with the reason, so the caller can quarantine the
image and go on with the rest of the chunk.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from recsketch.errors import BadImageError

# Sketchfab thumbnails are at most 1920×1080 (2 MP); anything above ~16 MP is a decompression bomb here.
MAX_PIXELS = 16_000_000
MIN_SIDE = 8


def _open(data: bytes, source: str) -> Image.Image:
    if not data:
        raise BadImageError(f"{source}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise BadImageError(f"{source}: {width}x{height} pixels, above the "
                                    f"{MAX_PIXELS} pixel limit (decompression bomb?)")
            if min(width, height) < MIN_SIDE:
                raise BadImageError(f"{source}: {width}x{height} is too small to embed")
            image.load()
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImageError(f"{source}: too many pixels to decode safely (decompression bomb)") from None
    except UnidentifiedImageError as exc:
        raise BadImageError(f"{source}: not a decodable image ({type(exc).__name__})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImageError(f"{source}: corrupt or truncated image ({exc})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (as Sketchfab's viewer background would be)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def check_image(data: bytes, source: str) -> tuple[int, int]:
    """Raise BadImageError unless ``data`` decodes as an image; return its size."""
    return _open(data, source).size


def decode_image(data: bytes, size: int, source: str = "image", preprocess: str = "crop") -> np.ndarray:
    """Decode to an RGB uint8 array of shape (size, size, 3).

    ``crop`` (the default, the ImageNet convention): the short side is resized to ``size``
    (bilinear) and the centre cropped, so Sketchfab's 16:9 thumbnails keep their proportions.
    ``seed``: stretched to size×size with nearest-neighbour sampling, as Keras' ``load_img``
    did in rec-a-sketch.
    """
    image = to_rgb(_open(data, source))
    if preprocess == "seed":
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.NEAREST)
        return np.asarray(image, dtype=np.uint8)
    width, height = image.size
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BILINEAR)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    if resized != (size, size):
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def thumbnail_version(data: bytes) -> str:
    """A thumbnail's content hash: features are keyed by it, so a changed image is re-extracted."""
    return hashlib.sha256(data).hexdigest()[:16]


def load_image(path: Path, size: int, preprocess: str = "crop") -> np.ndarray:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadImageError(f"{path}: thumbnail file is missing") from None
    return decode_image(data, size, str(path), preprocess)
