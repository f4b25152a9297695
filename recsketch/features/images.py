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
# A 16:9 thumbnail is 1.8:1. A strip of 2,000,000 x 8 pixels is under the pixel limit, but resizing
# its short side to 224 asks for ~50 GB: the aspect ratio is bounded before anything is decoded (at
# 64:1 the resize holds at most 224 x 14,336 pixels, ~10 MB).
MAX_ASPECT = 64


def _open(data: bytes, source: str) -> Image.Image:
    """The image decoded, checked from its header first (pixels, aspect ratio, short side), so
    nothing past the limits is ever allocated; any failure of any decoder is a BadImageError
    that names the reason."""
    if not data:
        raise BadImageError(f"{source}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            check_size(*image.size, source)
            image.load()
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImageError(f"{source}: too many pixels to decode safely (decompression bomb)") from None
    except UnidentifiedImageError as exc:
        raise BadImageError(f"{source}: not a decodable image ({type(exc).__name__})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImageError(f"{source}: corrupt or truncated image ({exc})") from None
    except MemoryError:
        raise BadImageError(f"{source}: too large to decode in memory") from None
    except Exception as exc:  # any decoder's own failure, e.g. NotImplementedError for a DDS variant
        raise BadImageError(f"{source}: the decoder failed ({type(exc).__name__}: {exc})") from None
    return image


def check_size(width: int, height: int, source: str) -> None:
    """Refuse a size before it is decoded: too many pixels, a strip, or a side too short."""
    if width * height > MAX_PIXELS:
        raise BadImageError(f"{source}: {width}x{height} pixels, above the {MAX_PIXELS} pixel limit "
                            "(decompression bomb?)")
    if min(width, height) < MIN_SIDE:
        raise BadImageError(f"{source}: {width}x{height} is too small to embed")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise BadImageError(f"{source}: {width}x{height} is a strip, over {MAX_ASPECT}:1 (its resize alone "
                            "would need more memory than the picture holds)")


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale as it looks, in 8 bits: Pillow's own conversion clips them to
    white (a 16-bit PNG embedded as a blank image)."""
    if image.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8), "L")
    if image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        top = 65535 if values.max(initial=0) > 255 else 255  # a 16-bit PNG opens as I; 8-bit values stay
        return Image.fromarray((np.clip(values, 0, top) * 255 // top).astype(np.uint8), "L")
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), "L")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (as Sketchfab's viewer background would be)."""
    image = _eight_bit(image)
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
    image = _open(data, source)
    try:
        image = to_rgb(image)
        if preprocess == "seed":
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.NEAREST)
            return np.asarray(image, dtype=np.uint8)
        width, height = image.size
        scale = size / min(width, height)
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        if resized[0] * resized[1] > MAX_ASPECT * size * size:  # check_size bounds it: never reached
            raise BadImageError(f"{source}: resizing {width}x{height} to {resized[0]}x{resized[1]} is too large")
        if resized != image.size:
            image = image.resize(resized, Image.Resampling.BILINEAR)
        left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
        if resized != (size, size):
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.uint8)
    except BadImageError:
        raise
    except Exception as exc:  # a mode or a conversion no decoder test foresaw
        raise BadImageError(f"{source}: could not be converted to RGB ({type(exc).__name__}: {exc})") from None


def thumbnail_version(data: bytes) -> str:
    """A thumbnail's content hash: features are keyed by it, so a changed image is re-extracted."""
    return hashlib.sha256(data).hexdigest()[:16]


def load_image(path: Path, size: int, preprocess: str = "crop") -> np.ndarray:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadImageError(f"{path}: thumbnail file is missing") from None
    return decode_image(data, size, str(path), preprocess)
