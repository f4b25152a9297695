"""Bad input: every parser either parses or raises recsketch's own error type, naming the input.

Property-based (hypothesis) over random bytes, rows and JSON, plus the specific cases:
malformed PSV lines, duplicates, bad mids, API JSON with missing fields or wrong types,
non-images and bombs, a feature file from another backbone or dimension, bad config.
"""

from __future__ import annotations

import io
import json
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from recsketch.config import Settings
from recsketch.errors import BadInputError, ConfigError, InvalidModelId, RecsketchError
from recsketch.features.chunks import Chunk, ChunkStore
from recsketch.features.images import check_image, decode_image
from recsketch.gallery import model_id_from_input
from recsketch.ids import is_model_id
from recsketch.psv import read_likes, read_models
from recsketch.sketchfab.client import _retry_after_seconds, parse_likes_page, parse_model, parse_page

MID = "0123456789abcdef0123456789abcdef"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
model_keys = st.sampled_from(["uid", "name", "publishedAt", "likeCount", "viewerUrl", "thumbnails", "images",
                              "url", "width", "height"])
model_like = st.dictionaries(model_keys, json_values | st.just(MID) | st.just("2026-11-25T10:00:00Z"), max_size=8)
psv_alphabet = st.sampled_from(list(string.ascii_letters + string.digits + "|\\\"'\r\n\t ,é漢\x00"))


@FUZZ
@given(body=st.binary(max_size=400) | st.text(psv_alphabet, max_size=400).map(lambda t: t.encode("utf-8")))
def test_psv_readers_parse_or_raise_bad_input(tmp_path_factory, body: bytes) -> None:
    folder = tmp_path_factory.mktemp("psv")
    for header, reader in ((b"name|mid\n", read_models), (b"modelname|mid|uid\n", read_likes)):
        for content in (body, header + body):
            path = folder / "file.psv"
            path.write_bytes(content)
            try:
                result = reader(path)
            except BadInputError as exc:
                assert str(path) in str(exc)
                continue
            assert all(is_model_id(row.mid) for row in result.rows)
            assert all(str(path) in problem for problem in result.problems)
            assert len({(r.mid, getattr(r, "uid", None)) for r in result.rows}) == len(result.rows)  # no dupes


@FUZZ
@given(entry=json_values | model_like)
def test_api_model_entries_parse_or_raise_bad_input(entry: object) -> None:
    try:
        model = parse_model(entry)
    except BadInputError:
        return
    assert is_model_id(model.mid) and isinstance(model.name, str)
    assert model.thumbnail_url is None or isinstance(model.thumbnail_url, str)


@FUZZ
@given(payload=json_values | st.fixed_dictionaries({"results": json_values, "next": json_values}))
def test_api_pages_parse_or_raise_api_errors(payload: object) -> None:
    for parse in (lambda: parse_page(payload, "GET /v3/models"), lambda: parse_likes_page(payload, MID)):
        try:
            results, next_url = parse()
        except RecsketchError:
            continue
        assert isinstance(results, list) and (next_url is None or isinstance(next_url, str))


@FUZZ
@given(text=st.text(max_size=300))
def test_model_picker_input_is_a_mid_or_a_named_error(text: str) -> None:
    try:
        assert is_model_id(model_id_from_input(text))
    except InvalidModelId as exc:
        assert "neither a Sketchfab model id" in str(exc)


def test_model_picker_accepts_ids_and_sketchfab_urls() -> None:
    assert model_id_from_input(f"  {MID} ") == MID
    assert model_id_from_input(f"https://sketchfab.com/3d-models/a-car-{MID}") == MID
    assert model_id_from_input(f"sketchfab.com/models/{MID}/embed") == MID
    for bad in (f"https://evil.example/3d-models/x-{MID}", "../../etc/passwd", f"file:///{MID}", "' OR 1=1 --"):
        with pytest.raises(InvalidModelId):
            model_id_from_input(bad)


@FUZZ
@given(value=st.text(max_size=20), name=st.sampled_from(["RECSKETCH_TOP_K", "RECSKETCH_CHUNK_SIZE",
                                                         "RECSKETCH_MIN_LIKES", "RECSKETCH_RATE_LIMIT",
                                                         "RECSKETCH_BACKBONE", "RECSKETCH_VGG16_POOLING",
                                                         "RECSKETCH_MAX_THUMBNAIL_BYTES", "RECSKETCH_PCA_DIM"]))
def test_config_values_parse_or_raise_config_error(name: str, value: str) -> None:
    try:
        Settings.from_env({name: value})
    except ConfigError as exc:
        assert name in str(exc)


@FUZZ
@given(value=st.none() | st.text(max_size=40))
def test_retry_after_never_raises(value: str | None) -> None:
    seconds = _retry_after_seconds(value)
    assert seconds is None or seconds >= 0


@FUZZ
@given(data=st.binary(max_size=2000))
def test_random_bytes_are_never_an_image_by_accident(data: bytes) -> None:
    try:
        check_image(data, "fuzz.jpg")
    except BadInputError as exc:
        assert "fuzz.jpg" in str(exc)


def test_psv_specific_bad_lines_are_named_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "model_urls.psv"
    path.write_bytes(b"name|mid\r\n"
                     b"Good one|" + MID.encode() + b"\r\n"
                     b"too|many|fields|here\n"
                     b"Bad mid|../../etc/passwd\n"
                     b"Good one|" + MID.encode() + b"\n"  # duplicate, LF after CRLF
                     b"\\Quoted | pipe\\|fedcba9876543210fedcba9876543210\n"
                     b"unterminated \\")
    result = read_models(path)
    assert [row.mid for row in result.rows] == [MID, "fedcba9876543210fedcba9876543210"]
    assert result.rows[1].name == "Quoted | pipe"
    assert len(result.problems) >= 2 and all(str(path) in p for p in result.problems)
    assert any(":3: 4 fields, expected 2" in p for p in result.problems)
    assert any(":4: '../../etc/passwd' is not a model id" in p for p in result.problems)
    assert any(":7: a \\ quote that does not close" in p for p in result.problems)
    # a bad row costs that row (issue 37): an invalid UTF-8 byte, a quote opened at a name's start
    # (it swallowed every row after it), a lone CR inside a name (it split the row)
    other = "fedcba9876543210fedcba9876543210"
    path.write_bytes(b"name|mid\n" + "caf\xe9".encode("latin-1") + b"|" + MID.encode() + b"\n"
                     + b"\\starts with a quote|" + MID.encode() + b"\n"
                     + b"Lone\rCR|" + other.encode() + b"\n"
                     + b"Good|" + b"0" * 32 + b"\n")
    result = read_models(path)
    assert [(row.name, row.mid) for row in result.rows] == [("Lone CR", other), ("Good", "0" * 32)]
    assert [p.split(": ", 1)[0] for p in result.problems] == [f"{path}:2", f"{path}:3"]
    assert "not UTF-8" in result.problems[0] and "does not close" in result.problems[1]
    header = tmp_path / "bad-header.psv"
    header.write_bytes(b"n\xe9me|mid\n")
    with pytest.raises(BadInputError, match=r"bad-header.psv:1: not UTF-8"):
        read_models(header)


def test_images_that_are_not_images_or_are_bombs_are_refused() -> None:
    with pytest.raises(BadInputError, match=r"x\.jpg"):
        check_image(b"<html>not an image</html>", "x.jpg")
    bomb = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(bomb, "PNG")  # 400 Mpx of zeros: tiny on disk
    with pytest.raises(BadInputError, match=r"bomb|too large|pixels"):
        decode_image(bomb.getvalue(), 224, "bomb.png")


def test_a_feature_file_from_another_backbone_or_dimension(tmp_path: Path, caplog) -> None:
    mine = ChunkStore(tmp_path, "efficientnet_lite0-avg-float32-imagenet")
    other = ChunkStore(tmp_path, "vgg16-flatten-float32-imagenet")
    mine.write(Chunk("aaaa", [MID], np.ones((1, 1280), np.float32)))
    # a chunk of another backbone copied into this backbone's folder is not used: it is re-planned
    other.write(Chunk("bbbb", ["fedcba9876543210fedcba9876543210"], np.ones((1, 25088), np.float32)))
    other.path("bbbb").rename(mine.path("bbbb"))
    assert mine.read("bbbb") is None and "does not match backbone" in caplog.text
    assert "fedcba9876543210fedcba9876543210" in mine.plan(["fedcba9876543210fedcba9876543210"], 8).popitem()[1]
    # same backbone key but another dimension (a hand-made file): a clear error, nothing used
    odd = ChunkStore(tmp_path, mine.backbone_key)
    odd.write(Chunk("cccc", ["00000000000000000000000000000000"], np.ones((1, 512), np.float32)))
    with pytest.raises(BadInputError, match=r"chunk-cccc.npz holds 512-d features, the other chunks .* 1280-d"):
        mine.load_features([MID, "00000000000000000000000000000000"])
    assert mine.read("aaaa") is not None  # nothing already stored is lost


def test_json_from_the_api_with_wrong_types_is_named() -> None:
    with pytest.raises(BadInputError, match="name is 42"):
        parse_model({"uid": MID, "name": 42})
    with pytest.raises(InvalidModelId, match="model entry uid"):
        parse_model({"uid": "../x", "name": "n"})
    with pytest.raises(BadInputError, match="publishedAt 'yesterday'"):
        parse_model({"uid": MID, "name": "n", "publishedAt": "yesterday"})
    model = parse_model({"uid": MID, "name": "n", "likeCount": "many", "thumbnails": {"images": [3, None, {
        "url": "https://media.sketchfab.com/t.jpg", "width": 200, "height": 200}]}})
    assert model.like_count is None and model.thumbnail_url == "https://media.sketchfab.com/t.jpg"
    with pytest.raises(RecsketchError, match="liker entry without a uid"):
        parse_likes_page({"results": [{"username": "x"}], "next": None}, MID)
    assert json.dumps(parse_likes_page({"results": [{"uid": "u1", "username": "a"}], "next": ""}, MID)) \
        == '[["u1"], null]'
    with pytest.raises(BadInputError, match="not a user"):  # a model entry, or a user without a username
        parse_likes_page({"results": [{"uid": "u1"}], "next": None}, MID)
