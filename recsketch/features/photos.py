"""Real photos that ship offline (scikit-image's data): the demo catalogue is made of them, and
every exported graph is checked on them against torch."""

from __future__ import annotations

import numpy as np
from PIL import Image

from recsketch.features.images import to_rgb


def load_photo(name: str) -> Image.Image:
    import skimage.data

    array = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).astype(np.uint8)
    return to_rgb(Image.fromarray(array))
