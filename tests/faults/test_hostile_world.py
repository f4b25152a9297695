"""A hostile world (issue 37): pictures crafted to exhaust memory or crash a decoder are
quarantined with a named reason, within a bounded peak RSS, and the rest of the batch goes on."""

from __future__ import annotations

import contextlib
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
    ordinary = tmp_path / "ordinary.png"
    ordinary.write_bytes(png(400, 300))
    baseline_error, baseline = peak_rss_decoding(ordinary)  # the interpreter and the imports, as this machine has them
    assert baseline_error == "ok"
    assert rss < baseline + 50, (rss, baseline)  # nothing of the strip's pixels was allocated


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


class _Hostile:
    """An API on 127.0.0.1 that answers what each test plans: ``routes`` maps a path (with its
    query) to a function that writes the answer; anything else is a 404. Every request is kept."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.routes: dict[str, object] = {}
        self.requests: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append(self.path)
                route = owner.routes.get(self.path) or owner.routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client stopped reading
                    route(self)  # type: ignore[operator]

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _json(payload: object, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    body = json.dumps(payload).encode()

    def write(handler) -> None:  # type: ignore[no-untyped-def]
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)
    return write


@pytest.fixture
def hostile():  # type: ignore[no-untyped-def]
    servers = [_Hostile(), _Hostile()]  # the API, and a canary that fails the test if it is ever asked
    yield servers
    for server in servers:
        server.close()


def test_pagination_that_loops_or_leaves_the_api_stops_with_one_clear_error(hostile) -> None:  # type: ignore[no-untyped-def]
    from recsketch.errors import PermanentApiError
    from recsketch.sketchfab.client import SketchfabClient

    api, canary = hostile
    client = SketchfabClient(api.url, retries=0)
    listing = "/v3/models?count=24&sort_by=createdAt"
    api.routes[listing] = _json({"results": [], "next": f"{api.url}/v3/models?cursor=1"})
    api.routes["/v3/models?cursor=1"] = _json({"results": [], "next": f"{api.url}/v3/models?cursor=1"})
    with pytest.raises(PermanentApiError, match=r"was already read \(2 pages in\): the pagination loops"):
        list(client.model_pages())
    assert len(api.requests) == 2  # it was 653 requests in 30 s, and never ended
    for target in (f"{canary.url}/v3/models?cursor=2", "file:///etc/passwd", f"https://{api.url[7:]}/v3/models"):
        api.routes[listing] = _json({"results": [], "next": target})
        with pytest.raises(PermanentApiError, match=r"outside the API's origins.*not followed"):
            list(client.model_pages())
    mid = "a" * 32
    api.routes["/i/likes"] = _json({"results": [{"uid": "u1", "username": "u1"}], "next": f"{api.url}/i/likes?again"})
    api.routes["/i/likes?again"] = _json({"results": [], "next": f"{api.url}/i/likes?again"})
    with pytest.raises(PermanentApiError, match=rf"the likers of {mid}: the next page .* already read"):
        client.likers(mid)

    def redirect(handler) -> None:  # type: ignore[no-untyped-def]
        handler.send_response(302)
        handler.send_header("Location", f"{canary.url}/v3/models")
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    api.routes[listing] = redirect
    with pytest.raises(PermanentApiError, match=r"a redirect to .* outside the API's origins"):
        list(client.model_pages())
    assert canary.requests == []  # the canary was never asked


def test_unbounded_answers_are_cut_at_their_limits(hostile) -> None:  # type: ignore[no-untyped-def]
    import resource
    import time
    import zlib

    import requests

    from recsketch.errors import ApiError
    from recsketch.sketchfab.client import MAX_JSON_BYTES, BodyTooLarge, SketchfabClient

    api, _ = hostile

    def endless(handler) -> None:  # type: ignore[no-untyped-def]
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.end_headers()  # no length: read until the server hangs up, which it never does
        block = b"[" * 65536
        for _ in range(40_000):  # 2.6 GB if nobody stopped reading
            handler.wfile.write(block)

    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip: ~200 KB that inflates to 200 MB, made a MB at a time
    megabyte = b" " * 2**20
    bomb = b"".join([deflate.compress(megabyte) for _ in range(200)] + [deflate.flush()])

    def inflating(handler) -> None:  # type: ignore[no-untyped-def]
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Encoding", "gzip")
        handler.send_header("Content-Length", str(len(bomb)))
        handler.end_headers()
        handler.wfile.write(bomb)

    def drip(handler) -> None:  # type: ignore[no-untyped-def]
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        for _ in range(1000):
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.2)

    client = SketchfabClient(api.url, retries=0, deadline=1.5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for path, route in (("/endless", endless), ("/bomb", inflating)):
        api.routes[path] = route
        with pytest.raises(BodyTooLarge, match=f"more than {MAX_JSON_BYTES} bytes"):
            client.get_json(f"{api.url}{path}")
    api.routes["/drip"] = drip
    started = time.monotonic()
    with pytest.raises(ApiError, match="failed after 1 attempts: Timeout"):
        client.get_json(f"{api.url}/drip")
    assert time.monotonic() - started < 5  # the deadline, not the server, ended it
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    assert grown < 100, grown  # a 16 MiB cap and its chunks: never the 2.6 GB or the 200 MB
    assert isinstance(requests.Timeout("x"), requests.RequestException)


def test_hostile_model_data_is_quarantined_and_the_crawl_goes_on(hostile, tmp_path: Path, db_url: str) -> None:  # type: ignore[no-untyped-def]
    """A lone surrogate or a NUL in a name, a likeCount of 10^30, a liker uid over 64 characters:
    each was a traceback that stopped the crawl (and the rerun hit the same page)."""
    from recsketch.config import Settings
    from recsketch.db import store
    from recsketch.stages.crawl import crawl_stage

    api, _ = hostile
    good, surrogate, huge, nul = "a" * 32, "b" * 32, "c" * 32, "d" * 32
    thumb = io.BytesIO()
    Image.new("RGB", (400, 300), (10, 200, 30)).save(thumb, "JPEG")

    def entry(mid: str, name: str, likes: int = 5) -> dict:
        return {"uid": mid, "name": name, "likeCount": likes, "viewerUrl": f"https://sketchfab.com/3d-models/{mid}",
                "publishedAt": "2026-01-01T00:00:00", "createdAt": "2026-01-01T00:00:00",
                "thumbnails": {"images": [{"url": f"{api.url}/t/{mid}.jpg", "width": 400, "height": 300}]}}

    page = json.dumps({"results": [entry(good, "fine"), entry(surrogate, "x"), entry(huge, "big", 0),
                                   entry(nul, "nul\x00name")], "next": None})
    page = page.replace('"name": "x"', '"name": "bad \\ud800 name"')
    page = page.replace('"likeCount": 0', '"likeCount": 1' + "0" * 30)

    def listing(handler) -> None:  # type: ignore[no-untyped-def]
        body = page.encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    api.routes["/v3/models"] = listing
    api.routes["/i/likes"] = _json({"results": [{"uid": f"u{n}", "username": f"u{n}"} for n in range(5)]
                                    + [{"uid": "x" * 65, "username": "long"}], "next": None})
    api.routes[f"/t/{good}.jpg"] = _json(None)  # replaced below: the picture's bytes

    def picture(handler) -> None:  # type: ignore[no-untyped-def]
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(thumb.getvalue())))
        handler.end_headers()
        handler.wfile.write(thumb.getvalue())
    api.routes[f"/t/{good}.jpg"] = picture
    settings = Settings(data_dir=tmp_path / "data", sketchfab_url=api.url, database_url=db_url, http_retries=0)
    stats = crawl_stage(settings, tmp_path / "run", progress=lambda _: None)
    assert stats["models"] == 1 and stats["bad_model_entries"] == 3 and stats["thumbnails_ok"] == 1
    engine = store.connect(db_url)
    assert store.stored_model_ids(engine) == {good}
    assert sorted(uid for _, uid in store.read_likes(engine)) == [f"u{n}" for n in range(5)]
    from recsketch.contracts import CrawlReport

    problems = " ".join(CrawlReport.read(tmp_path / "run")["problems"])  # each named
    assert "lone surrogate" in problems and "NUL character" in problems and "likeCount 1e+30" in problems


def test_the_local_server_bounds_its_decoding_and_names_only_its_own_address(tmp_path: Path) -> None:
    """It decoded 179 Mpx thumbnails whole (1.26 GB for one request) and reflected the Host
    header into its next and thumbnail links (issue 37 part 9)."""
    import resource

    import requests

    from recsketch.psv import write_psv
    from recsketch.sketchfab.server import start_in_thread

    mid = "e" * 32
    (tmp_path / "model_thumbs").mkdir()
    big = tmp_path / "model_thumbs" / f"{mid}_thumb200.jpg"
    subprocess.run([sys.executable, "-c", "import sys\nfrom PIL import Image\n"
                    "Image.new('L', (20000, 9000), 128).save(sys.argv[1], 'PNG')", str(big)], check=True)
    write_psv(tmp_path / "model_urls.psv", ("name", "mid"),
              [("Huge", mid)] + [(f"m{i}", f"{i:032x}") for i in range(30)])
    write_psv(tmp_path / "model_likes_anon.psv", ("modelname", "mid", "uid"), [])
    server = start_in_thread(tmp_path)
    try:
        listing = requests.get(f"{server.url}/v3/models", params={"count": 24}, headers={"Host": "evil.example:1"},
                               timeout=30).json()
        assert listing["next"].startswith(server.url) and "evil" not in json.dumps(listing)
        huge = requests.get(f"{server.url}/v3/models/{mid}", headers={"Host": "evil.example:1"}, timeout=30).json()
        url = max(huge["thumbnails"]["images"], key=lambda image: image["width"])["url"]
        assert url.startswith(server.url)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        answer = requests.get(url, timeout=60)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
        assert answer.status_code == 200 and answer.content == big.read_bytes()  # served as it is, not decoded
        assert grown < 100, grown
    finally:
        server.shutdown()
        server.server_close()


def test_every_careless_invocation_gets_one_line_and_exit_2_and_readers_create_nothing(tmp_path: Path,
                                                                                      demo_catalog: Path) -> None:
    """Issue 37 part 10: each of these was a traceback (or created a data dir)."""
    import os

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    mid = "a" * 32
    cases = [  # (environment, arguments, what the line says)
        ({"RECSKETCH_DATA_DIR": str(a_file)}, ["similar", mid], "is empty: run the pipeline first"),
        ({"RECSKETCH_DATA_DIR": str(a_file / "under")}, ["show"], "is empty: run the pipeline first"),
        ({"RECSKETCH_DATA_DIR": str(a_file / "under")}, ["crawl", "--run-id", "x"], "Not a directory"),
        ({"RECSKETCH_DATA_DIR": str(tmp_path / "missing")}, ["similar", mid], "is empty"),
        ({"RECSKETCH_DATA_DIR": str(tmp_path / "missing")}, ["similar", mid, "--top-k", "9" * 23],
         "must be between 1 and 1,000,000"),
        ({"RECSKETCH_SKETCHFAB_URL": "file:///etc"}, ["crawl", "--run-id", "x"], "is not an http(s) URL"),
        ({"RECSKETCH_SKETCHFAB_URL": "example.com"}, ["crawl", "--run-id", "x"], "is not an http(s) URL"),
        ({"RECSKETCH_SKETCHFAB_URL": "http://[::1"}, ["crawl", "--run-id", "x"], "is not a URL"),
        ({}, ["serve-sketchfab", str(tmp_path), "--port", "99999"], "is no TCP port"),
        ({}, ["demo-catalog", str(a_file)], "Not a directory"),
    ]
    for env, args, says in cases:
        environment = {**os.environ, "RECSKETCH_DATA_DIR": str(tmp_path / "data"), **env}
        done = subprocess.run([sys.executable, "-m", "recsketch.cli", *args], env=environment, capture_output=True,
                              text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and says in lines[-1] and "Traceback" not in done.stderr, (args, done.stderr)
        if not args[0].startswith("serve") and "--top-k" not in args:  # argparse's own: usage, then the line
            assert len(lines) == 1, (args, done.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no reader created anything
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "recsketch.cli", "serve-sketchfab", str(demo_catalog), "--port",
                               str(port)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"recsketch: cannot listen on 127.0.0.1:{port}: Address already in use"]
