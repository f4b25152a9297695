"""Real backbones: EfficientNet-Lite0 with its shipped ImageNet weights, VGG16 as in the seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from recsketch.demo import load_photo, variant
from recsketch.errors import WeightsUnavailable
from recsketch.features.backbones import EfficientNetLite0Backbone, VGG16Backbone
from recsketch.features.keys import VGG16_NOTOP_FILE


def photos(*names: str, size: int = 224) -> np.ndarray:
    import random

    rng = random.Random(0)
    images = []
    for name in names:
        photo_name, _, kind = name.partition(":")
        image = variant(load_photo(photo_name), kind or "photo", rng).resize((size, size))
        images.append(np.asarray(image))
    return np.stack(images)


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0Backbone:
    return EfficientNetLite0Backbone()


def test_efficientnet_weights_are_the_pretrained_ones(lite0) -> None:
    """The ImageNet head on our pooled features must name what is in the photos."""
    import torch

    features = lite0.embed(photos("coffee", "chelsea"))
    assert features.shape == (2, 1280) and features.dtype == np.float32
    with torch.inference_mode():
        classes = lite0._model._fc(torch.from_numpy(features)).argmax(dim=1).tolist()
    assert classes[0] in (967, 968, 504)  # espresso / cup / coffee mug
    assert classes[1] in (281, 282, 285)  # tabby / tiger cat / Egyptian cat


def test_efficientnet_features_find_variants(lite0) -> None:
    features = lite0.embed(photos("astronaut", "astronaut:mirror", "rocket", "coffee"))
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    scores = unit @ unit.T
    assert scores[0, 1] > max(scores[0, 2], scores[0, 3]) + 0.1
    assert np.array_equal(features, lite0.embed(photos("astronaut", "astronaut:mirror", "rocket", "coffee")))


def test_vgg16_seed_shapes_and_determinism(tmp_path: Path) -> None:
    images = photos("astronaut", "coffee", "rocket")
    flatten = VGG16Backbone(weights="random", pooling="flatten", seed=7)
    features = flatten.embed(images)
    assert features.shape == (3, 25_088) and features.dtype == np.float32 and flatten.dim == 25_088
    again = VGG16Backbone(weights="random", pooling="flatten", seed=7).embed(images)
    np.testing.assert_allclose(features, again, rtol=1e-5, atol=1e-5)
    # a weights file saved by us loads through the file path and gives the same features
    path = tmp_path / "vgg16_notop.weights.h5"
    flatten._model.save_weights(str(path))
    from_file = VGG16Backbone(weights=str(path), pooling="flatten")
    np.testing.assert_allclose(from_file.embed(images), features, rtol=1e-5, atol=1e-5)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert from_file.key == f"vgg16-flatten-float32-file-{digest}"  # named by content, not by file name
    pooled = VGG16Backbone(weights=str(path), pooling="avg").embed(images)
    assert pooled.shape == (3, 512)
    # avg pooling is the mean over the 7x7 positions of the same feature map
    np.testing.assert_allclose(pooled, features.reshape(3, 7, 7, 512).mean(axis=(1, 2)), rtol=1e-4, atol=1e-4)
    other = VGG16Backbone(weights="random", pooling="flatten", seed=8)
    other._model.save_weights(str(path))  # other weights under the same name: another key
    assert VGG16Backbone(weights=str(path), pooling="flatten").key != from_file.key


def test_vgg16_without_weights_offline_names_the_file(tmp_path: Path, monkeypatch) -> None:
    """The download fails here by construction (not because this machine happens to be
    offline): the error names the file and where to put it."""
    from keras.src.utils import file_utils

    def refused(*args: object, **kwargs: object) -> str:
        raise OSError("download refused by the test")

    monkeypatch.setattr(file_utils, "get_file", refused)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(WeightsUnavailable) as caught:
        VGG16Backbone(weights="imagenet")
    message = str(caught.value)
    assert VGG16_NOTOP_FILE in message and str(tmp_path / "keras" / "models") in message
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        VGG16Backbone(weights=str(tmp_path / "nowhere.weights.h5"))
