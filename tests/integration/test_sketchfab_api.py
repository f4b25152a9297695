"""The local server speaks DESIGN §4 and the client pages, retries and validates over real HTTP."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from PIL import Image

from recsketch.errors import ApiError, BadInputError, PermanentApiError, RetryAfterTooLong
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
    created = [m["createdAt"] for m in requests.get(f"{sketchfab.url}/v3/models", timeout=10).json()["results"]]
    assert created == sorted(created, reverse=True)  # the default order: newest first
    oldest = requests.get(f"{sketchfab.url}/v3/models", params={"sort_by": "createdAt"}, timeout=10).json()
    assert [m["createdAt"] for m in oldest["results"]] == sorted(m["createdAt"] for m in oldest["results"])
    assert all(m["createdAt"] <= m["publishedAt"] for m in oldest["results"])
    assert all(len(m["publishedAt"]) == 26 and "+" not in m["publishedAt"] for m in oldest["results"])  # no zone


def test_count_above_24_falls_back_to_24(sketchfab) -> None:
    body = requests.get(f"{sketchfab.url}/v3/models", params={"count": 100}, timeout=10).json()
    assert len(body["results"]) == 24


def test_published_since_filters_by_date_and_datetime(sketchfab) -> None:
    everything = requests.get(f"{sketchfab.url}/v3/models", params={"count": 24}, timeout=10).json()
    newest = max(m["publishedAt"] for m in everything["results"])
    recent = requests.get(f"{sketchfab.url}/v3/models", params={"published_since": newest}, timeout=10).json()
    assert [m["publishedAt"] >= newest for m in recent["results"]] == [True] * len(recent["results"])
    assert 1 <= len(recent["results"]) < 24
    day = newest[:10]  # documented as a date
    that_day = requests.get(f"{sketchfab.url}/v3/models", params={"published_since": day}, timeout=10).json()
    assert len(that_day["results"]) > len(recent["results"])
    assert all(m["publishedAt"] >= day for m in that_day["results"])
    bad = requests.get(f"{sketchfab.url}/v3/models", params={"published_since": "yesterday"}, timeout=10)
    assert bad.status_code == 400


@pytest.mark.parametrize("sort_by", ["-publishedAt", "publishedAt", "name", "-likeCount"])
def test_undocumented_sort_by_is_refused(sketchfab, sort_by: str) -> None:
    response = requests.get(f"{sketchfab.url}/v3/models", params={"sort_by": sort_by}, timeout=10)
    assert response.status_code == 400 and "sort_by" in response.json()["detail"]


@pytest.mark.parametrize("sort_by", ["createdAt", "-createdAt", "viewCount", "-viewCount", "likedAt", "-likedAt"])
def test_documented_sort_by_is_served(sketchfab, sort_by: str) -> None:
    assert requests.get(f"{sketchfab.url}/v3/models", params={"sort_by": sort_by}, timeout=10).status_code == 200


def test_a_permanent_error_fails_at_once(serve, demo_catalog: Path) -> None:
    server = serve(demo_catalog)
    client = SketchfabClient(server.url, retries=5, backoff_base=0.001)
    with pytest.raises(PermanentApiError, match="HTTP 400"):
        client.get_json(f"{server.url}/v3/models", {"sort_by": "-publishedAt"})
    assert server.requests_served == 1


def _likers(catalog: Path) -> dict[str, set[str]]:
    """Each model's likers as the catalogue's PSV lists them (the demo's come from a taste model)."""
    from recsketch.psv import read_likes

    truth: dict[str, set[str]] = {}
    for like in read_likes(catalog / "model_likes_anon.psv").rows:
        truth.setdefault(like.mid, set()).add(like.uid)
    return truth


def test_one_model_likes_and_thumbnail(sketchfab, demo_catalog: Path, demo_groups) -> None:
    mid = sorted(demo_groups)[0]
    truth = _likers(demo_catalog)[mid]
    model = requests.get(f"{sketchfab.url}/v3/models/{mid}", timeout=10).json()
    assert model["uid"] == mid and model["likeCount"] == len(truth) >= 5
    images = model["thumbnails"]["images"]
    assert [(i["width"], i["height"]) for i in images] == [(1920, 1080), (1024, 576), (720, 405), (256, 144), (64, 36)]
    assert all(i["size"] is None and len(i["uid"]) == 32 for i in images) and len({i["uid"] for i in images}) == 5
    thumb = requests.get(images[2]["url"], timeout=10)
    assert thumb.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (720, 405)
    assert requests.get(images[2]["url"].replace(images[2]["uid"], "0" * 32), timeout=10).status_code == 404
    assert requests.get(f"{sketchfab.url}/v3/models/{'f' * 32}", timeout=10).status_code == 404
    first = requests.get(f"{sketchfab.url}/i/likes", params={"model": mid, "count": 4}, timeout=10).json()
    assert len(first["results"]) == 4 and "offset=4" in first["next"]
    client = SketchfabClient(sketchfab.url)
    assert set(client.likers(mid)) == truth


def test_client_survives_429_and_5xx(serve, demo_catalog: Path, demo_groups) -> None:
    faulty = serve(demo_catalog, Faults(rate_429=0.25, retry_after=0.01, rate_5xx=0.25, seed=3))
    client = SketchfabClient(faulty.url, retries=12, backoff_base=0.005)
    mids = [m["uid"] for page, _ in client.model_pages() for m in page]
    assert len(mids) == len(demo_groups) + 4
    likers = {mid: client.likers(mid) for mid in mids}
    truth = _likers(demo_catalog)
    assert all(set(likers[mid]) == truth[mid] for mid in demo_groups)  # nothing lost to the faults
    pages = 4 + sum(-(-len(likers[mid]) // 24) for mid in mids if likers[mid])  # likers come 24 a page
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


def test_retry_after_is_honoured_in_full_above_the_backoff_cap(serve, demo_catalog: Path) -> None:
    throttled = serve(demo_catalog, Faults(rate_429=0.5, retry_after=0.3, seed=1))
    client = SketchfabClient(throttled.url, retries=20, backoff_base=0.0, backoff_cap=0.01, retry_after_max=1)
    started = time.monotonic()
    next(client.model_pages())
    assert client.stats.throttled >= 1
    assert time.monotonic() - started >= 0.3 * client.stats.throttled


def test_retry_after_above_the_ceiling_fails_at_once(serve, demo_catalog: Path) -> None:
    throttled = serve(demo_catalog, Faults(rate_429=1.0, retry_after=3600))
    client = SketchfabClient(throttled.url, retries=5, retry_after_max=60)
    with pytest.raises(RetryAfterTooLong, match=r"wait 3600 s .*RECSKETCH_RETRY_AFTER_MAX_S"):
        next(client.model_pages())
    assert throttled.requests_served == 1


def test_one_retry_layer_bad_json(serve, demo_catalog: Path) -> None:
    broken = serve(demo_catalog, Faults(rate_bad_json=1.0))
    client = SketchfabClient(broken.url, retries=2, backoff_base=0.001)
    with pytest.raises(ApiError, match="after 3 attempts: body is not JSON"):
        next(client.model_pages())
    assert broken.requests_served == 3  # retries + 1 requests for the URL, not (retries + 1)²


def test_model_entries_are_never_stored_as_likers(serve, demo_catalog: Path, demo_groups) -> None:
    changed = serve(demo_catalog, Faults(likes_as_models=True))
    with pytest.raises(BadInputError, match="not a user"):
        SketchfabClient(changed.url).likers(sorted(demo_groups)[0])


def test_the_clock_hides_later_models_and_likes(tmp_path: Path, serve) -> None:
    from recsketch.psv import write_psv
    a, b = "a" * 32, "b" * 32
    write_psv(tmp_path / "model_urls.psv", ("name", "mid", "published_at"),
              [("A", a, "2026-01-01T10:00:00"), ("B", b, "2026-01-03T10:00:00")])
    write_psv(tmp_path / "model_likes_anon.psv", ("modelname", "mid", "uid", "liked_at"),
              [("A", a, "u1", "2026-01-01T12:00:00"), ("A", a, "u2", "2026-01-02T12:00:00"), ("B", b, "u1", "")])
    locked = serve(tmp_path, now=datetime(2026, 1, 2, tzinfo=UTC))  # started without --test-controls
    assert requests.post(f"{locked.url}/_clock", params={"now": "2000-01-01"}, timeout=10).status_code == 404
    assert requests.post(f"{locked.url}/_reload", timeout=10).status_code == 404
    server = serve(tmp_path, now=datetime(2026, 1, 2, tzinfo=UTC), test_controls=True)
    client = SketchfabClient(server.url)
    listed = [m for page, _ in client.model_pages() for m in page]
    assert [(m["uid"], m["likeCount"]) for m in listed] == [(a, 1)]
    assert client.likers(a) == ["u1"]
    assert requests.get(f"{server.url}/v3/models/{b}", timeout=10).status_code == 404
    assert requests.post(f"{server.url}/_clock", params={"now": "2026-01-04"}, timeout=10).status_code == 200
    assert sorted(client.likers(a)) == ["u1", "u2"]
    assert [m["uid"] for page, _ in client.model_pages() for m in page] == [a, b]
    server.like_counts[a] = 40  # the listing may disagree with the likers list
    assert next(client.model_pages())[0][0]["likeCount"] == 40


def test_retry_after_parsing() -> None:
    assert _retry_after_seconds("3") == 3.0
    assert _retry_after_seconds(None) is None and _retry_after_seconds("soon") is None
    assert 0 <= _retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_thumbnail_choice_and_model_validation() -> None:
    sixteen_nine = [{"uid": str(w), "url": f"{w}", "width": w, "height": h, "size": None}
                    for w, h in ((1920, 1080), (1024, 576), (720, 405), (256, 144), (64, 36))]
    assert pick_thumbnail(sixteen_nine, 224) == "720"  # the smallest whose short side covers the input
    assert pick_thumbnail(sixteen_nine, 500) == "1024"
    assert pick_thumbnail(sixteen_nine[3:], 224) == "256"  # nothing big enough: the largest
    assert pick_thumbnail([{"url": "sq", "width": 200, "height": 200}], 224) == "sq"  # a rec-a-sketch folder
    assert pick_thumbnail([{"url": "x", "width": "200", "height": 200}, "junk"]) is None
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


def test_reload_reads_the_folder_again_a_removed_model_answers_404_and_a_new_thumbnail_new_uids(
        demo_catalog: Path, tmp_path: Path) -> None:
    import shutil

    from recsketch.psv import read_models, write_psv
    from recsketch.sketchfab.server import start_in_thread

    folder = tmp_path / "catalog"
    shutil.copytree(demo_catalog, folder)
    server = start_in_thread(folder, test_controls=True)
    try:
        rows = read_models(folder / "model_urls.psv").rows
        gone, redrawn = rows[0].mid, rows[1].mid
        before = requests.get(f"{server.url}/v3/models/{redrawn}", timeout=10).json()
        assert requests.get(f"{server.url}/v3/models/{gone}", timeout=10).status_code == 200
        write_psv(folder / "model_urls.psv", ("name", "mid", "published_at"),
                  [(r.name, r.mid, r.published_at.isoformat()) for r in rows[1:]])
        Image.new("RGB", (200, 200), (255, 0, 0)).save(folder / "model_thumbs" / f"{redrawn}_thumb200.jpg")
        assert requests.get(f"{server.url}/v3/models/{gone}", timeout=10).status_code == 200  # not until reloaded
        reloaded = requests.post(f"{server.url}/_reload", timeout=10)
        assert reloaded.status_code == 200 and reloaded.json() == {"models": len(rows) - 1}
        assert requests.get(f"{server.url}/v3/models/{gone}", timeout=10).status_code == 404
        listed = {entry["uid"] for page, _ in SketchfabClient(server.url).model_pages() for entry in page}
        assert gone not in listed and redrawn in listed
        after = requests.get(f"{server.url}/v3/models/{redrawn}", timeout=10).json()
        uids = lambda model: {image["uid"] for image in model["thumbnails"]["images"]}  # noqa: E731
        assert uids(before).isdisjoint(uids(after))
    finally:
        server.shutdown()
        server.server_close()
