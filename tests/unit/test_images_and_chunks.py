"""Decoding of awkward thumbnails, the chunk store's checkpoint protocol, and extraction."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recsketch.errors import BadImageError
from recsketch.features.chunks import Chunk, ChunkStore, chunk_id_for
from recsketch.features.extract import embed_many, extract_chunk
from recsketch.features.images import decode_image


def encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


RGB = Image.new("RGB", (200, 200), (200, 30, 30))


@pytest.mark.parametrize("data", [
    encode(RGB, "JPEG"),
    encode(RGB.convert("L"), "JPEG"),
    encode(RGB.convert("CMYK"), "JPEG"),
    encode(RGB.convert("P"), "PNG"),
    encode(Image.new("RGBA", (200, 200), (0, 0, 0, 0)), "PNG"),  # fully transparent -> white
    encode(RGB, "PNG"),  # a PNG behind a .jpg name decodes by content
    encode(RGB.resize((37, 1200)), "WEBP"),
], ids=["jpeg", "grey", "cmyk", "palette", "alpha", "png", "webp-odd-shape"])
def test_formats_decode_to_rgb_224(data: bytes) -> None:
    array = decode_image(data, 224)
    assert array.shape == (224, 224, 3) and array.dtype == np.uint8


def test_crop_keeps_proportions_and_seed_stretches_like_keras_load_img() -> None:
    """A 16:9 thumbnail: ``crop`` resizes the short side to 224 and keeps the centre (the
    letterbox bars fall away); ``seed`` stretches the whole frame with nearest sampling."""
    frame = Image.new("RGB", (720, 405), (38, 38, 38))
    frame.paste(Image.new("RGB", (405, 405), (10, 200, 60)), (157, 0))
    data = encode(frame, "PNG")
    cropped = decode_image(data, 224)
    assert cropped.shape == (224, 224, 3)
    # only the square picture is left (its outermost pixels blend with the bar when resampled)
    assert np.abs(cropped[1:-1, 1:-1].astype(int) - (10, 200, 60)).max() <= 2
    seeded = decode_image(data, 224, preprocess="seed")
    assert np.array_equal(seeded, np.asarray(frame.resize((224, 224), Image.NEAREST)))
    assert (seeded[:, 0] == 38).all()  # the bars are squeezed in, as the seed did
    square = encode(Image.new("RGB", (200, 200), (1, 2, 3)), "PNG")  # a rec-a-sketch folder's thumbnail
    assert decode_image(square, 224).shape == decode_image(square, 224, preprocess="seed").shape


def test_the_preprocessing_is_part_of_the_feature_key() -> None:
    from recsketch.config import Settings
    from recsketch.features.keys import backbone_key

    assert backbone_key(Settings()) != backbone_key(Settings(preprocess="seed"))
    assert backbone_key(Settings(backbone="vgg16")).endswith("-crop")


def test_transparency_is_composited_on_white() -> None:
    array = decode_image(encode(Image.new("RGBA", (50, 50), (0, 0, 0, 0)), "PNG"), 224)
    assert array.min() == 255


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty file"),
    (b"<html>404</html>", "not a decodable image"),
    (encode(RGB, "JPEG")[:400], "corrupt or truncated"),
    (encode(Image.new("RGB", (4, 4)), "PNG"), "too small"),
])
def test_bad_images_raise_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(BadImageError, match=reason):
        decode_image(data, 224, "thumbs/x.jpg")


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = encode(Image.new("1", (20_000, 20_000)), "PNG")  # tiny file, 400 MP
    assert len(bomb) < 200_000
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(bomb, 224)


def test_chunk_store_round_trip_plan_and_corruption(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path, "test-key")
    mids = [f"{i:032x}" for i in range(10)]
    plan = store.plan(mids, 4)
    assert [len(m) for m in plan.values()] == [4, 4, 2]
    first_id, first_mids = next(iter(plan.items()))
    assert first_id == chunk_id_for(first_mids)
    store.write(Chunk(first_id, first_mids[:3], np.ones((3, 5), np.float32), {first_mids[3]: "bad"}, "test-key"))
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]  # no temp file left
    replanned = store.plan(mids, 4)
    assert list(replanned) == list(plan)[1:]  # same ids for the chunks still to do
    loaded_mids, features, failed = store.load_features(mids)
    assert loaded_mids == first_mids[:3] and features.shape == (3, 5) and failed == {first_mids[3]: "bad"}
    # a truncated chunk file is not data: it is planned again
    path = store.path(first_id)
    path.write_bytes(path.read_bytes()[:100])
    assert store.read(first_id) is None
    assert list(store.plan(mids, 4)) == list(plan)
    # a chunk written for another backbone is not read as this one's
    other = ChunkStore(tmp_path, "other-key")
    other.write(Chunk(first_id, first_mids, np.ones((4, 5), np.float32)))
    os.replace(other.path(first_id), path)
    assert store.read(first_id) is None


class FakeBackbone:
    """Deterministic stand-in with the Backbone interface: mean colour per image."""

    name, input_size, dim, key = "fake", 32, 3, "fake"

    def __init__(self) -> None:
        self.calls = 0

    def embed(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        return images.reshape(len(images), -1, 3).mean(axis=1).astype(np.float32)


def test_extract_quarantines_bad_images_and_skips_done_chunks(tmp_path: Path) -> None:
    thumbs = tmp_path / "thumbs"
    thumbs.mkdir()
    mids = [f"{i:032x}" for i in range(7)]
    for i, mid in enumerate(mids):
        (thumbs / f"{mid}.jpg").write_bytes(encode(Image.new("RGB", (64, 64), (i * 30, 0, 0)), "PNG"))
    (thumbs / f"{mids[2]}.jpg").write_bytes(b"garbage")
    (thumbs / f"{mids[5]}.jpg").unlink()
    store, backbone = ChunkStore(tmp_path / "features", "fake"), FakeBackbone()
    lines: list[str] = []
    report = extract_chunk(store, backbone, "c1", mids, lambda m: thumbs / f"{m}.jpg", batch_size=2,
                           progress=lines.append)
    assert report.images == 7 and report.failed == 2 and not report.skipped
    chunk = store.read("c1")
    assert chunk is not None
    assert chunk.mids == [m for m in mids if m not in (mids[2], mids[5])]
    assert "not a decodable image" in chunk.failed[mids[2]] and "missing" in chunk.failed[mids[5]]
    assert np.allclose(chunk.features[:, 0], [0, 30, 90, 120, 180], atol=0.5)
    assert any("img/s" in line and "ETA" in line for line in lines)
    inode = store.path("c1").stat().st_ino
    again = extract_chunk(store, backbone, "c1", mids, lambda m: thumbs / f"{m}.jpg", batch_size=2)
    assert again.skipped and store.path("c1").stat().st_ino == inode
    assert backbone.calls == 4  # the rerun embedded nothing


class LanedFakeBackbone(FakeBackbone):
    """FakeBackbone with two single-threaded lanes: records how many embeds ran at once."""

    lanes = 2

    def __init__(self) -> None:
        super().__init__()
        self.active = self.most_at_once = 0
        self.lock = threading.Lock()
        self.threads: set[str] = set()

    def embed(self, images: np.ndarray) -> np.ndarray:
        with self.lock:
            self.active += 1
            self.most_at_once = max(self.most_at_once, self.active)
            self.threads.add(threading.current_thread().name)
        time.sleep(0.02)  # long enough for the other lane to start its batch
        with self.lock:
            self.active -= 1
        return super().embed(images)


def test_lanes_embed_batches_at_once_and_keep_the_chunk_in_order(tmp_path: Path) -> None:
    """A backbone with lanes (the exported runtimes) gets its batches decoded and embedded on
    every lane at once; the chunk is the same as one lane's, bad images quarantined alike."""
    thumbs = tmp_path / "thumbs"
    thumbs.mkdir()
    mids = [f"{i:032x}" for i in range(23)]
    for i, mid in enumerate(mids):
        (thumbs / f"{mid}.jpg").write_bytes(encode(Image.new("RGB", (40, 40), (i * 10, 255 - i * 10, 7)), "PNG"))
    (thumbs / f"{mids[4]}.jpg").write_bytes(b"not an image")
    (thumbs / f"{mids[17]}.jpg").unlink()
    one, laned = ChunkStore(tmp_path / "one", "fake"), ChunkStore(tmp_path / "laned", "fake")
    backbone = LanedFakeBackbone()
    extract_chunk(one, FakeBackbone(), "c", mids, lambda m: thumbs / f"{m}.jpg", batch_size=3)
    report = extract_chunk(laned, backbone, "c", mids, lambda m: thumbs / f"{m}.jpg", batch_size=3)
    assert backbone.most_at_once == 2 and len(backbone.threads) == 2  # both lanes busy together
    assert report.images == 23 and report.failed == 2
    expected, got = one.read("c"), laned.read("c")
    assert expected is not None and got is not None
    assert got.mids == expected.mids == [m for m in mids if m not in (mids[4], mids[17])]
    assert np.array_equal(got.features, expected.features) and got.failed == expected.failed
    assert got.versions == expected.versions
    batches = [np.full((2, 32, 32, 3), value, np.uint8) for value in range(9)]
    embedded = embed_many(backbone, batches)  # in order, whichever lane finished first
    assert all(np.array_equal(f, FakeBackbone().embed(b)) for f, b in zip(embedded, batches, strict=True))


def test_a_chunk_whose_bytes_changed_fails_its_checksum(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path, "k")
    store.write(Chunk("c1", ["a" * 32, "b" * 32], np.ones((2, 3), np.float32), {}, "k"))
    assert store.read("c1") is not None
    with np.load(store.path("c1")) as data:
        fields = {name: data[name] for name in data.files}
    fields["features"] = fields["features"] * 2  # valid zip, valid arrays, wrong numbers
    np.savez(store.path("c1"), **fields)
    assert store.read("c1") is None
