"""A local Sketchfab-compatible API over a data folder in rec-a-sketch format (docs/contracts.md §1, §2).

The crawler cannot tell it from Sketchfab: cursor-paged ``/v3/models``, ``/v3/models/{uid}``,
offset-paged ``/i/likes`` and thumbnail URLs that point back here. Faults (429 with and
without ``Retry-After``, 5xx, latency) can be switched on to test the client's retries.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

from PIL import Image

from recsketch.errors import BadImageError, BadInputError
from recsketch.features.images import check_size
from recsketch.ids import is_model_id
from recsketch.psv import read_likes, read_models
from recsketch.timestamps import parse_utc

log = logging.getLogger(__name__)

MAX_COUNT = 24
# docs/contracts.md §1: a model without published_at is served with one fixed date.
DEFAULT_PUBLISHED_AT = datetime(2016, 6, 1, tzinfo=UTC)
# What the real API documents for /v3/models (docs/contracts.md §2); anything else is a 400.
SORT_KEYS = ("createdAt", "viewCount", "likedAt")
SORT_BY = frozenset(SORT_KEYS) | frozenset(f"-{key}" for key in SORT_KEYS)
# The five 16:9 thumbnails Sketchfab serves for every model, largest first.
THUMBNAIL_SIZES = ((1920, 1080), (1024, 576), (720, 405), (256, 144), (64, 36))
# A model is created some minutes before it is published (createdAt <= publishedAt).
MAX_DRAFT_S = 1800
# A synthetic thumbnail's letterbox, like the grey around a model in Sketchfab's renders.
LETTERBOX = (38, 38, 38)


@dataclass(frozen=True)
class Faults:
    """Failure injection for tests; rates are probabilities per API request."""

    rate_429: float = 0.0
    retry_after: float | None = None  # seconds sent in Retry-After with a 429; None: no header
    rate_5xx: float = 0.0
    rate_truncate: float = 0.0  # body cut off before its Content-Length, connection closed
    rate_bad_json: float = 0.0  # 200 with a syntactically broken JSON body
    latency_s: float = 0.0
    likes_as_models: bool = False  # /i/likes answers model entries instead of users (a changed API)
    unavailable_paths: frozenset[str] = frozenset()  # these exact API paths always answer 503
    seed: int = 0


@dataclass(frozen=True)
class CatalogModel:
    mid: str
    name: str
    published_at: datetime
    created_at: datetime
    likers: tuple[tuple[str, datetime | None], ...]  # (uid, liked_at), oldest like first
    thumbnail: Path | None
    thumbnail_version: str = ""  # changes when the file does, and with it the image uids

    def likers_at(self, now: datetime | None) -> list[str]:
        """The users whose like is visible at ``now`` (all of them without a clock)."""
        return [uid for uid, liked_at in self.likers if now is None or liked_at is None or liked_at <= now]

    def image_uid(self, width: int, height: int) -> str:
        return hashlib.sha1(f"{self.mid}:{width}x{height}:{self.thumbnail_version}".encode()).hexdigest()[:32]


def _created_at(mid: str, published_at: datetime) -> datetime:
    """A stable creation time up to MAX_DRAFT_S before publication (no column holds it)."""
    return published_at - timedelta(seconds=int(hashlib.sha1(mid.encode()).hexdigest()[:8], 16) % MAX_DRAFT_S)


def _thumbnail_version(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


class Catalog:
    """A data folder loaded once: models in creation order, their likers and thumbnails."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise BadInputError(f"{folder}: not a directory")
        self.folder = folder
        read = read_models(folder / "model_urls.psv")
        self.problems = list(read.problems)
        likers: dict[str, list[tuple[str, datetime | None]]] = {}
        likes_path = folder / "model_likes_anon.psv"
        if likes_path.exists():
            likes = read_likes(likes_path)
            self.problems += likes.problems
            for row in likes.rows:
                likers.setdefault(row.mid, []).append((row.uid, row.liked_at))
        models = []
        for row in read.rows:
            published = row.published_at or DEFAULT_PUBLISHED_AT
            dated = sorted(likers.get(row.mid, ()), key=lambda like: like[1] or DEFAULT_PUBLISHED_AT)
            models.append(self._model(row.mid, row.name, published, tuple(dated)))
        models.sort(key=lambda m: (m.created_at, m.mid))
        self.models = models
        self.by_mid = {m.mid: m for m in models}
        for problem in self.problems:
            log.warning("catalogue: %s", problem)

    def _model(self, mid: str, name: str, published: datetime,
               likers: tuple[tuple[str, datetime | None], ...]) -> CatalogModel:
        path = self.folder / "model_thumbs" / f"{mid}_thumb200.jpg"
        exists = path.is_file()
        return CatalogModel(mid=mid, name=name, published_at=published, created_at=_created_at(mid, published),
                            likers=likers, thumbnail=path if exists else None,
                            thumbnail_version=_thumbnail_version(path) if exists else "")

    def add_likes(self, mid: str, likes: list[tuple[str, datetime | None]]) -> None:
        """New likes for a model (tests and benchmarks change the catalogue while it is served)."""
        model = self.by_mid[mid]
        self._replace(replace(model, likers=model.likers + tuple(likes)))

    def remove(self, mid: str) -> None:
        """A model deleted from Sketchfab: gone from the listing, and its page answers 404."""
        self.models = [m for m in self.models if m.mid != mid]
        self.by_mid.pop(mid, None)

    def publish(self, model: CatalogModel) -> None:
        """A model (one this catalogue held, ``remove``d to hold it back) published now."""
        self.by_mid[model.mid] = model
        self.models = sorted([*self.models, model], key=lambda m: (m.created_at, m.mid))

    def replace_thumbnail(self, mid: str, image: bytes) -> None:
        """The model's thumbnail replaced on Sketchfab: a new file, so new image uids."""
        model = self.by_mid[mid]
        path = self.folder / "model_thumbs" / f"{mid}_thumb200.jpg"
        path.write_bytes(image)
        self._replace(replace(model, thumbnail=path, thumbnail_version=_thumbnail_version(path)))

    def keep_likers(self, mid: str, count: int) -> None:
        """Likes withdrawn: the model keeps its first ``count`` likers."""
        model = self.by_mid[mid]
        self._replace(replace(model, likers=model.likers[:count]))

    def _replace(self, model: CatalogModel) -> None:
        self.by_mid[model.mid] = model
        self.models = [model if m.mid == model.mid else m for m in self.models]


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    padded = cursor + "=" * (-len(cursor) % 4)
    text = base64.urlsafe_b64decode(padded.encode()).decode()
    if not text.startswith("o:"):
        raise ValueError(cursor)
    offset = int(text[2:])
    if offset < 0:
        raise ValueError(cursor)
    return offset


def _iso(moment: datetime) -> str:
    """The API's timestamp format: microseconds, no zone (UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


def letterboxed(square: Path, width: int, height: int) -> bytes:
    """A 16:9 JPEG of the square thumbnail: scaled to the height, centred on a grey canvas.
    A file that is no image, or one past the decoding limits (``images.check_size``, from its
    header: a 179 Mpx file took 1.26 GB a request), is served as it is, for the crawler's own
    checks to refuse; a JPEG is decoded at the smallest scale that still covers the height."""
    try:
        with Image.open(square) as image:
            check_size(*image.size, str(square))
            image.draft("RGB", (height, height))  # JPEG: decoded at 1/2, 1/4 or 1/8 scale where that suffices
            picture = image.convert("RGB").resize((height, height), Image.Resampling.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError, BadImageError):
        return square.read_bytes()
    canvas = Image.new("RGB", (width, height), LETTERBOX)
    canvas.paste(picture, ((width - height) // 2, 0))
    out = io.BytesIO()
    canvas.save(out, "JPEG", quality=90)
    return out.getvalue()


class SketchfabHandler(BaseHTTPRequestHandler):
    server: SketchfabServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- plumbing ---------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """The server's own address: never the request's ``Host`` header, which a client could
        set to send the next crawler anywhere."""
        return self.server.url

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        truncate = self.server.faults.rate_truncate and self.server.roll() < self.server.faults.rate_truncate
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if truncate:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if truncate:  # promise the whole body, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        if self.server.faults.rate_bad_json and self.server.roll() < self.server.faults.rate_bad_json:
            body = body[: len(body) // 2]  # well-framed, but not JSON
        self._send(status, body, "application/json", headers)

    def _error(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        self._json(status, {"detail": detail}, headers)

    def _inject_fault(self) -> bool:
        faults = self.server.faults
        if urlsplit(self.path).path in faults.unavailable_paths:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "Service temporarily unavailable.")
            return True
        roll = self.server.roll()
        if roll < faults.rate_429:
            headers = {} if faults.retry_after is None else {"Retry-After": f"{faults.retry_after:g}"}
            self._error(HTTPStatus.TOO_MANY_REQUESTS, "Request was throttled.", headers)
            return True
        if roll < faults.rate_429 + faults.rate_5xx:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "Service temporarily unavailable.")
            return True
        return False

    # -- routes -----------------------------------------------------------------------
    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        self.server.count_request(self.headers.get("Authorization"), url.path)
        if self.server.faults.latency_s:
            time.sleep(self.server.faults.latency_s)
        if parts[:1] == ["thumbs"] and len(parts) == 2:
            return self._square_thumbnail(parts[1])
        if parts[:1] == ["models"] and len(parts) == 5 and parts[2] == "thumbnails":
            return self._thumbnail(parts[1], parts[3], parts[4])
        if self._inject_fault():
            return None
        if parts == ["v3", "models"]:
            return self._models(query)
        if parts[:2] == ["v3", "models"] and len(parts) == 3:
            model = self._visible(parts[2])
            if model is None:
                return self._error(HTTPStatus.NOT_FOUND, "Not found.")
            return self._json(HTTPStatus.OK, self._model_json(model))
        if parts == ["i", "likes"]:
            self.server.count_fetch(f"likes {query.get('model')} {query.get('offset', '0')}")
            return self._likes(query)
        return self._error(HTTPStatus.NOT_FOUND, "Not found.")

    do_HEAD = do_GET  # noqa: N815 (http.server naming)

    def do_POST(self) -> None:
        """``POST /_clock?now=ISO`` moves the server's clock; ``POST /_reload`` reads the folder
        again, so a replay can add, change and delete models without a restart (a model gone
        from the folder then answers 404). Neither is Sketchfab's."""
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if not self.server.test_controls:  # one unauthenticated POST /_clock emptied a crawl's listing
            return self._error(HTTPStatus.NOT_FOUND, "Not found.")
        if url.path == "/_reload":
            try:
                self.server.catalog = Catalog(self.server.catalog.folder)
            except BadInputError as exc:
                return self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return self._json(HTTPStatus.OK, {"models": len(self.server.catalog.models)})
        if url.path != "/_clock" or "now" not in query:
            return self._error(HTTPStatus.NOT_FOUND, "Not found.")
        try:
            self.server.now = parse_utc(query["now"])
        except ValueError:
            return self._error(HTTPStatus.BAD_REQUEST, "Invalid now.")
        return self._json(HTTPStatus.OK, {"now": _iso(self.server.now)})

    def _visible(self, mid: str) -> CatalogModel | None:
        model = self.server.catalog.by_mid.get(mid)
        now = self.server.now
        return model if model is not None and (now is None or model.published_at <= now) else None

    def _model_json(self, model: CatalogModel) -> dict:
        images = []
        if model.thumbnail is not None:
            base = self.server.thumbnail_url or self.base_url
            for width, height in THUMBNAIL_SIZES:
                uid = model.image_uid(width, height)
                images.append({"uid": uid, "url": f"{base}/models/{model.mid}/thumbnails/{uid}/{width}x{height}.jpeg",
                               "width": width, "height": height, "size": None})
        likers = model.likers_at(self.server.now)
        return {
            "uid": model.mid,
            "name": model.name,
            "likeCount": self.server.like_counts.get(model.mid, len(likers)),
            "createdAt": _iso(model.created_at),
            "publishedAt": _iso(model.published_at),
            "viewerUrl": f"https://sketchfab.com/3d-models/{model.mid}",
            "uri": f"{self.base_url}/v3/models/{model.mid}",
            "thumbnails": {"images": images},
        }

    def _models(self, query: dict[str, str]) -> None:
        try:
            count = int(query.get("count", MAX_COUNT))
        except ValueError:
            count = MAX_COUNT
        if not 1 <= count <= MAX_COUNT:
            count = MAX_COUNT
        try:
            offset = _decode_cursor(query["cursor"]) if query.get("cursor") else 0
        except (ValueError, UnicodeDecodeError):
            return self._error(HTTPStatus.BAD_REQUEST, "Invalid cursor.")
        sort_by = query.get("sort_by") or "-createdAt"
        if sort_by not in SORT_BY:
            return self._error(HTTPStatus.BAD_REQUEST,
                               f"Unsupported sort_by {sort_by!r}: one of {', '.join(sorted(SORT_BY))}.")
        now = self.server.now
        models = self.server.catalog.models  # createdAt ascending
        if now is not None:
            models = [m for m in models if m.published_at <= now]
        since = query.get("published_since")
        if since:
            try:
                moment = parse_utc(since)
            except ValueError:
                return self._error(HTTPStatus.BAD_REQUEST, "Invalid published_since: expected a date.")
            models = [m for m in models if m.published_at >= moment]
        key = sort_by.lstrip("-")
        if key == "viewCount":  # no views here: likes stand in for them
            models = sorted(models, key=lambda m: (len(m.likers_at(now)), m.mid))
        elif key == "likedAt":
            models = sorted(models, key=lambda m: (max((t for _, t in m.likers if t and (now is None or t <= now)),
                                                       default=DEFAULT_PUBLISHED_AT), m.mid))
        if sort_by.startswith("-"):
            models = models[::-1]
        page = models[offset : offset + count]
        has_next = offset + count < len(models)
        has_prev = offset > 0

        def link(target: int) -> str:
            params = {k: v for k, v in query.items() if k != "cursor"}
            params["count"] = str(count)
            params["cursor"] = _encode_cursor(target)
            return f"{self.base_url}/v3/models?{urlencode(params)}"

        next_cursor = _encode_cursor(offset + count) if has_next else None
        prev_cursor = _encode_cursor(max(0, offset - count)) if has_prev else None
        return self._json(HTTPStatus.OK, {
            "results": [self._model_json(m) for m in page],
            "next": link(offset + count) if has_next else None,
            "previous": link(max(0, offset - count)) if has_prev else None,
            "cursors": {"next": next_cursor, "previous": prev_cursor},
        })

    def _likes(self, query: dict[str, str]) -> None:
        mid = query.get("model", "")
        model = self._visible(mid)
        if model is None:
            return self._error(HTTPStatus.NOT_FOUND, "Not found.")
        try:
            count = min(max(int(query.get("count", MAX_COUNT)), 1), MAX_COUNT)
            offset = max(int(query.get("offset", 0)), 0)
        except ValueError:
            return self._error(HTTPStatus.BAD_REQUEST, "count and offset must be integers.")
        likers = model.likers_at(self.server.now)
        page = likers[offset : offset + count]
        has_next = offset + count < len(likers)
        next_url = None
        if has_next:
            params = urlencode({"model": mid, "count": count, "offset": offset + count})
            next_url = f"{self.base_url}/i/likes?{params}"
        if self.server.faults.likes_as_models:
            results = [self._model_json(model) for _ in page]
        else:
            results = [{"uid": uid, "username": uid} for uid in page]
        return self._json(HTTPStatus.OK, {"results": results, "next": next_url})

    def _square_thumbnail(self, filename: str) -> None:
        """The folder's own file (``/thumbs/{mid}_thumb200.jpg``), as rec-a-sketch stored it."""
        mid = filename.removesuffix("_thumb200.jpg")
        model = self._visible(mid) if is_model_id(mid) else None
        if model is None or model.thumbnail is None or filename != f"{mid}_thumb200.jpg":
            return self._error(HTTPStatus.NOT_FOUND, "Not found.")
        self.server.count_fetch(f"thumb {mid}")
        return self._send(HTTPStatus.OK, model.thumbnail.read_bytes(), "image/jpeg")

    def _thumbnail(self, mid: str, uid: str, filename: str) -> None:
        """One of the five 16:9 images, derived from the folder's square thumbnail."""
        model = self._visible(mid) if is_model_id(mid) else None
        size = filename.removesuffix(".jpeg").split("x")
        if model is None or model.thumbnail is None or len(size) != 2 or not all(p.isdigit() for p in size):
            return self._error(HTTPStatus.NOT_FOUND, "Not found.")
        width, height = int(size[0]), int(size[1])
        if (width, height) not in THUMBNAIL_SIZES or uid != model.image_uid(width, height):
            return self._error(HTTPStatus.NOT_FOUND, "Not found.")
        self.server.count_fetch(f"thumb {mid}")
        return self._send(HTTPStatus.OK, letterboxed(model.thumbnail, width, height), "image/jpeg")


class SketchfabServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, catalog: Catalog, address: tuple[str, int], faults: Faults = Faults(), *,
                 now: datetime | None = None, thumbnail_url: str | None = None, test_controls: bool = False,
                 public_url: str | None = None):
        super().__init__(address, SketchfabHandler)
        self.public_url = public_url.rstrip("/") if public_url else None  # what its links name, if not its address
        self.catalog = catalog
        self.test_controls = test_controls  # POST /_clock and /_reload answer only when started to allow them
        self.faults = faults
        self.now = now  # the server's clock: models and likes after it are hidden; None: show all
        self.thumbnail_url = thumbnail_url  # another host that serves the thumbnails, if any
        self.like_counts: dict[str, int] = {}  # likeCount served instead of the likers' number
        self._random = random.Random(faults.seed)
        self._lock = threading.Lock()
        self.requests_served = 0
        self.authorizations: set[str | None] = set()  # what clients sent, for tests
        self.arrivals: list[tuple[float, str, str | None]] = []  # (monotonic time, path, Authorization)
        self.fetches: Counter[str] = Counter()  # thumbnails ("thumb MID") and likes pages served, for tests

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up (killed crawler, timeout) is routine here, not a traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("client %s disconnected", client_address)
            return
        super().handle_error(request, client_address)

    def roll(self) -> float:
        with self._lock:
            return self._random.random()

    def count_request(self, authorization: str | None = None, path: str = "") -> None:
        with self._lock:
            self.requests_served += 1
            self.authorizations.add(authorization)
            self.arrivals.append((time.monotonic(), path, authorization))

    def count_fetch(self, what: str) -> None:
        with self._lock:
            self.fetches[what] += 1

    @property
    def url(self) -> str:
        """The base of every link it serves: ``public_url``, else its own address (a wildcard
        address named as 127.0.0.1)."""
        if self.public_url:
            return self.public_url
        host, port = self.server_address[:2]
        host = host if isinstance(host, str) else host.decode()
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def start_in_thread(folder: Path | Catalog, host: str = "127.0.0.1", port: int = 0,
                    faults: Faults = Faults(), *, now: datetime | None = None,
                    thumbnail_url: str | None = None, test_controls: bool = False) -> SketchfabServer:
    """Start a server on a background thread (tests, the demo); ``server.shutdown()`` stops it."""
    catalog = folder if isinstance(folder, Catalog) else Catalog(folder)
    server = SketchfabServer(catalog, (host, port), faults, now=now, thumbnail_url=thumbnail_url,
                             test_controls=test_controls)
    threading.Thread(target=server.serve_forever, name="sketchfab-server", daemon=True).start()
    return server
