"""The local server speaks DESIGN §4 and the client pages, retries and validates over real HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from recsketch.errors import ApiError, BadInputError
from recsketch.sketchfab.client import SketchfabClient, _retry_after_seconds, parse_model, pick_thumbnail
from recsketch.sketchfab.server import Faults


def test_models_paging_covers_the_catalogue_once(sketchfab, demo_groups) -> None:
    url, seen, pages = f"{sketchfab.url}/v3/models?count=10", [], 0
    while url:
        body = requests.get(url, timeout=10).json()
        assert set(body) >= {"results", "next", "previous", "cursors"}
        assert len(body["results"]) <= 10
        for model in body["results"]:
            assert set(model) >= {"uid", "name", "likeCount", "publishedAt", "viewerUrl", "thumbnails"}
        seen += [m["uid"] for m in body["results"]]
        assert (body["previous"] is None) == (pages == 0)
        url, pages = body["next"], pages + 1
    assert len(seen) == len(set(seen)) == len(demo_groups) + 4  # + 3 sparse + 1 without thumbnail
    published = [m["publishedAt"] for m in requests.get(f"{sketchfab.url}/v3/models", timeout=10).json()["results"]]
    assert published == sorted(published, reverse=True)


def test_count_above_24_falls_back_to_24(sketchfab) -> None:
    body = requests.get(f"{sketchfab.url}/v3/models", params={"count": 100}, timeout=10).json()
    assert len(body["results"]) == 24


def test_published_since_filters(sketchfab) -> None:
    everything = requests.get(f"{sketchfab.url}/v3/models", params={"count": 24}, timeout=10).json()
    newest = everything["results"][0]["publishedAt"]
    recent = requests.get(f"{sketchfab.url}/v3/models", params={"published_since": newest}, timeout=10).json()
    assert [m["publishedAt"] >= newest for m in recent["results"]] == [True] * len(recent["results"])
    assert 1 <= len(recent["results"]) < 24


def test_one_model_likes_and_thumbnail(sketchfab, demo_catalog: Path, demo_groups) -> None:
    mid = sorted(demo_groups)[0]
    model = requests.get(f"{sketchfab.url}/v3/models/{mid}", timeout=10).json()
    assert model["uid"] == mid and model["likeCount"] == 10
    image = model["thumbnails"]["images"][0]
    assert (image["width"], image["height"]) == (200, 200)
    thumb = requests.get(image["url"], timeout=10)
    assert thumb.headers["Content-Type"] == "image/jpeg"
    assert thumb.content == (demo_catalog / "model_thumbs" / f"{mid}_thumb200.jpg").read_bytes()
    assert requests.get(f"{sketchfab.url}/v3/models/{'f' * 32}", timeout=10).status_code == 404
    first = requests.get(f"{sketchfab.url}/i/likes", params={"model": mid, "count": 4}, timeout=10).json()
    assert len(first["results"]) == 4 and "offset=4" in first["next"]
    client = SketchfabClient(sketchfab.url)
    assert len(set(client.likers(mid))) == 10


def test_client_survives_429_and_5xx(serve, demo_catalog: Path, demo_groups) -> None:
    faulty = serve(demo_catalog, Faults(rate_429=0.25, retry_after=0.01, rate_5xx=0.25, seed=3))
    client = SketchfabClient(faulty.url, retries=12, backoff_base=0.005)
    mids = [m["uid"] for page, _ in client.model_pages() for m in page]
    assert len(mids) == len(demo_groups) + 4
    likers = {mid: client.likers(mid) for mid in mids}
    assert all(len(likers[mid]) == 10 for mid in demo_groups)  # nothing lost to the faults
    pages = 4 + sum(1 for mid in mids if len(likers[mid]) > 0)  # every model's likers fit one page
    assert client.stats.requests == pages + client.stats.retries
    assert client.stats.retries >= 20 and client.stats.throttled > 0


def test_client_gives_up_with_a_clear_error_and_no_token(serve, demo_catalog: Path) -> None:
    down = serve(demo_catalog, Faults(rate_5xx=1.0))
    client = SketchfabClient(down.url, token="s3cret-token", retries=2, backoff_base=0.001)
    with pytest.raises(ApiError, match=r"failed after 3 attempts: HTTP 503") as caught:
        next(client.model_pages())
    assert "s3cret" not in str(caught.value)
    assert down.requests_served == 3


def test_retry_after_is_honoured(serve, demo_catalog: Path) -> None:
    throttled = serve(demo_catalog, Faults(rate_429=0.5, retry_after=0.2, seed=1))
    client = SketchfabClient(throttled.url, retries=20, backoff_base=0.0)
    started = time.monotonic()
    list(client.model_pages())
    assert client.stats.throttled > 0
    assert time.monotonic() - started >= 0.2 * client.stats.throttled * 0.9


def test_retry_after_parsing() -> None:
    assert _retry_after_seconds("3") == 3.0
    assert _retry_after_seconds(None) is None and _retry_after_seconds("soon") is None
    assert 0 <= _retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_thumbnail_choice_and_model_validation() -> None:
    images = [{"url": "a", "width": 1024, "height": 768}, {"url": "b", "width": 256, "height": 256},
              {"url": "c", "width": 64, "height": 64}]
    assert pick_thumbnail(images) == "b"
    assert pick_thumbnail([*images, {"url": "d", "width": 200, "height": 200}]) == "d"
    assert pick_thumbnail([]) is None
    with pytest.raises(BadInputError, match="not a Sketchfab model id"):
        parse_model({"uid": "../x", "name": "n"})
    with pytest.raises(BadInputError, match="name"):
        parse_model({"uid": "a" * 32, "name": None})
    with pytest.raises(BadInputError, match="expected an object"):
        parse_model(["not", "a", "dict"])


def test_non_http_thumbnail_urls_are_refused() -> None:
    with pytest.raises(BadInputError, match="only http"):
        SketchfabClient("http://127.0.0.1:9").download("file:///etc/passwd", 1000)
