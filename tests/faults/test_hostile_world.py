"""A hostile world (issue 37): pictures crafted to exhaust memory or crash a decoder are
quarantined with a named reason, within a bounded peak RSS, and the rest of the batch goes on."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recsketch.errors import BadImageError
from recsketch.features.images import MAX_ASPECT, check_image, decode_image


def png(width: int, height: int, mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, "PNG")
    return out.getvalue()


def malformed_dds() -> bytes:
    """A DDS header naming a pixel format no decoder implements (Pillow: NotImplementedError)."""
    header = struct.pack("<4sIIIIIII", b"DDS ", 124, 0x1007, 64, 64, 0, 0, 0) + b"\0" * 44
    return header + struct.pack("<II4sIIIII", 32, 0x4, b"ZZZZ", 0, 0, 0, 0, 0) + b"\0" * 1020


def malformed_blp() -> bytes:
    return b"BLP1" + struct.pack("<IIII", 7, 0, 64, 64) + b"\0" * 2000


def peak_rss_decoding(path: Path) -> tuple[str, float]:
    """(the error decode_image raised, or "ok"; the process's peak RSS in MiB), in a fresh process."""
    code = ("import json, resource, sys\nfrom pathlib import Path\nfrom recsketch.features.images import decode_image\n"
            "try:\n    decode_image(Path(sys.argv[1]).read_bytes(), 224, sys.argv[1]); error = 'ok'\n"
            "except Exception as exc:\n    error = f'{type(exc).__name__}: {exc}'\n"
            "print(json.dumps([error, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    error, rss = json.loads(out.stdout.strip().splitlines()[-1])
    return error, rss


@pytest.mark.parametrize("width,height", [(2_000_000, 8), (65_535, 8), (8, 400_000)])
def test_a_strip_under_the_pixel_limit_is_quarantined_before_anything_is_allocated(tmp_path: Path, width: int,
                                                                                   height: int) -> None:
    """2,000,000 x 8 pixels (46 KB) is under the pixel limit; resizing its short side to 224
    would ask for ~50 GB (it was a MemoryError that stopped extraction for good)."""
    path = tmp_path / "strip.png"
    path.write_bytes(png(width, height))
    error, rss = peak_rss_decoding(path)
    assert error.startswith("BadImageError") and "is a strip" in error and f"{MAX_ASPECT}:1" in error, error
    assert rss < 400, rss  # the interpreter, numpy and Pillow: nothing of the picture's


@pytest.mark.parametrize("name,data,reason", [("bad.dds", malformed_dds(), "NotImplementedError"),
                                              ("bad.blp", malformed_blp(), "BLPFormatError")])
def test_a_decoder_that_fails_its_own_way_is_a_named_quarantine(name: str, data: bytes, reason: str) -> None:
    with pytest.raises(BadImageError, match=rf"{name}: the decoder failed \({reason}"):
        check_image(data, name)
    with pytest.raises(BadImageError, match=name):
        decode_image(data, 32, name)


def test_16_bit_and_float_greyscale_embed_as_they_look() -> None:
    """A 16-bit greyscale PNG was clipped to white by Pillow's RGB conversion (a blank image)."""
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    out = io.BytesIO()
    Image.fromarray(ramp).save(out, "PNG")
    decoded = decode_image(out.getvalue(), 64, "ramp16.png")
    assert decoded.shape == (64, 64, 3) and (decoded[..., 0] == decoded[..., 2]).all()
    assert abs(float(decoded.mean()) - ramp.mean() / 257) < 2 and decoded.min() < 10 and decoded.max() > 245
    tiff = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64), "F").save(tiff, "TIFF")
    grey = decode_image(tiff.getvalue(), 64, "float.tif")
    assert 120 < float(grey.mean()) < 135  # 0..1 read as black..white


def test_a_batch_with_hostile_pictures_embeds_the_rest(tmp_path: Path) -> None:
    """extract's decoding step: the hostile ones are quarantined with their reasons, every good
    one in the batch is decoded."""
    from recsketch.features.extract import _decode_batch

    good = io.BytesIO()
    Image.new("RGB", (200, 120), (200, 30, 30)).save(good, "JPEG")
    files = {"good1": good.getvalue(), "strip": png(2_000_000, 8), "dds": malformed_dds(),
             "good2": good.getvalue(), "html": b"<html>404</html>"}
    paths = []
    for mid, data in files.items():
        (tmp_path / mid).write_bytes(data)
        paths.append((mid, tmp_path / mid))
    mids, images, failed, versions = _decode_batch(paths, 32, "crop")
    assert mids == ["good1", "good2"] and images.shape == (2, 32, 32, 3)
    assert set(failed) == {"strip", "dds", "html"} and "is a strip" in failed["strip"]
    assert "decoder failed" in failed["dds"] and "not a decodable image" in failed["html"]
    assert set(versions) == set(files)


A, B = "a" * 32, "b" * 32


def test_the_gallery_links_only_to_sketchfab_and_serves_thumbnails_as_what_they_are(tmp_path: Path) -> None:
    """A stored viewerUrl of javascript: or data: was rendered as a link; every thumbnail was
    served as image/jpeg, without nosniff (issue 37 part 8)."""
    from fastapi.testclient import TestClient

    from recsketch.config import Settings
    from recsketch.crawl import thumbnail_path
    from recsketch.db import store
    from recsketch.gallery import create_app

    engine = store.connect(f"sqlite:///{tmp_path / 'recsketch.sqlite'}")
    store.upsert_models(engine, [{"mid": A, "name": "A", "viewer_url": "javascript:alert(document.domain)"},
                                 {"mid": B, "name": "B", "viewer_url": "data:text/html,<b>x</b>"}])
    store.load_recommendations(engine, "run", "bb", 1, [(A, 1, B, 0.9), (B, 1, A, 0.9)])
    settings = Settings(data_dir=tmp_path)
    client = TestClient(create_app(lambda: settings, authenticate=lambda: None))
    page = client.get("/", params={"q": A}).text
    assert "javascript:" not in page and "data:text" not in page
    assert all(f'href="https://sketchfab.com/3d-models/{mid}"' in page for mid in (A, B))
    assert client.get(f"/api/similar/{A}").json()[0]["viewer_url"] == f"https://sketchfab.com/3d-models/{B}"
    stored = thumbnail_path(settings, A)
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_bytes(png(64, 64))  # a PNG stored under .jpg, as the crawl keeps what came
    answer = client.get(f"/thumbs/{A}.jpg")
    assert answer.headers["content-type"] == "image/png" and answer.headers["x-content-type-options"] == "nosniff"
    stored.write_bytes(b"<html><script>alert(1)</script></html>")
    assert client.get(f"/thumbs/{A}.jpg").headers["content-type"] == "application/octet-stream"


def test_names_cannot_drive_the_terminal(tmp_path: Path) -> None:
    """``similar`` and ``show`` printed escape and bell sequences from names raw."""
    import os

    from recsketch.db import store

    engine = store.connect(f"sqlite:///{tmp_path / 'recsketch.sqlite'}")
    store.upsert_models(engine, [{"mid": A, "name": "\x1b]0;pwned\x07\x1b[2J clear"}, {"mid": B, "name": "b\rB"}])
    store.load_recommendations(engine, "run", "bb", 1, [(A, 1, B, 0.9), (B, 1, A, 0.9)])
    env = {**os.environ, "RECSKETCH_DATA_DIR": str(tmp_path)}
    for command in (["similar", B], ["show", "--models", "2"]):
        done = subprocess.run([sys.executable, "-m", "recsketch.cli", *command], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "\x1b" not in done.stdout and "\x07" not in done.stdout and "\r" not in done.stdout
        assert "pwned" in done.stdout  # the name is shown, its controls are not
