"""A local Sketchfab-compatible API over a data folder in rec-a-sketch format (DESIGN §3, §4).

The crawler cannot tell it from Sketchfab: cursor-paged ``/v3/models``, ``/v3/models/{uid}``,
offset-paged ``/i/likes`` and thumbnail URLs that point back here. Faults (429 with and
without ``Retry-After``, 5xx, latency) can be switched on to test the client's retries.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

from recsketch.errors import BadInputError
from recsketch.ids import is_model_id
from recsketch.psv import read_likes, read_models

log = logging.getLogger(__name__)

MAX_COUNT = 24
# DESIGN §3: a model without published_at is served with one fixed date.
DEFAULT_PUBLISHED_AT = datetime(2016, 6, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Faults:
    """Failure injection for tests; rates are probabilities per API request."""

    rate_429: float = 0.0
    retry_after: float | None = None  # seconds sent in Retry-After with a 429; None: no header
    rate_5xx: float = 0.0
    rate_truncate: float = 0.0  # body cut off before its Content-Length, connection closed
    rate_bad_json: float = 0.0  # 200 with a syntactically broken JSON body
    latency_s: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class CatalogModel:
    mid: str
    name: str
    published_at: datetime
    likers: tuple[str, ...]
    thumbnail: Path | None


class Catalog:
    """A data folder loaded once: models newest first, their likers and thumbnails."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise BadInputError(f"{folder}: not a directory")
        read = read_models(folder / "model_urls.psv")
        self.problems = list(read.problems)
        likers: dict[str, list[str]] = {}
        likes_path = folder / "model_likes_anon.psv"
        if likes_path.exists():
            likes = read_likes(likes_path)
            self.problems += likes.problems
            for row in likes.rows:
                likers.setdefault(row.mid, []).append(row.uid)
        thumbs = folder / "model_thumbs"
        models = []
        for row in read.rows:
            path = thumbs / f"{row.mid}_thumb200.jpg"
            models.append(CatalogModel(
                mid=row.mid,
                name=row.name,
                published_at=row.published_at or DEFAULT_PUBLISHED_AT,
                likers=tuple(likers.get(row.mid, ())),
                thumbnail=path if path.is_file() else None,
            ))
        models.sort(key=lambda m: (-m.published_at.timestamp(), m.mid))
        self.models = models
        self.by_mid = {m.mid: m for m in models}
        for problem in self.problems:
            log.warning("catalogue: %s", problem)


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
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")


class SketchfabHandler(BaseHTTPRequestHandler):
    server: SketchfabServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- plumbing ---------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
        return f"http://{host}"

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
        self.server.count_request(self.headers.get("Authorization"))
        if self.server.faults.latency_s:
            time.sleep(self.server.faults.latency_s)
        if parts[:1] == ["thumbs"] and len(parts) == 2:
            self.server.count_fetch(parts[1])
            return self._thumbnail(parts[1])
        if self._inject_fault():
            return None
        if parts == ["v3", "models"]:
            return self._models(query)
        if parts[:2] == ["v3", "models"] and len(parts) == 3:
            model = self.server.catalog.by_mid.get(parts[2])
            if model is None:
                return self._error(HTTPStatus.NOT_FOUND, "Not found.")
            return self._json(HTTPStatus.OK, self._model_json(model))
        if parts == ["i", "likes"]:
            self.server.count_fetch(f"likes {query.get('model')} {query.get('offset', '0')}")
            return self._likes(query)
        return self._error(HTTPStatus.NOT_FOUND, "Not found.")

    do_HEAD = do_GET  # noqa: N815 (http.server naming)

    def _model_json(self, model: CatalogModel) -> dict:
        images = []
        if model.thumbnail is not None:
            images.append({
                "url": f"{self.base_url}/thumbs/{model.mid}_thumb200.jpg",
                "width": 200,
                "height": 200,
                "size": model.thumbnail.stat().st_size,
            })
        return {
            "uid": model.mid,
            "name": model.name,
            "likeCount": len(model.likers),
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
        sort_by = query.get("sort_by") or "-publishedAt"
        if sort_by not in ("-publishedAt", "publishedAt"):
            return self._error(HTTPStatus.BAD_REQUEST, f"Unsupported sort_by {sort_by!r}.")
        models = self.server.catalog.models
        if sort_by == "publishedAt":
            models = models[::-1]
        since = query.get("published_since")
        if since:
            try:
                moment = datetime.fromisoformat(since.replace("Z", "+00:00"))
            except ValueError:
                return self._error(HTTPStatus.BAD_REQUEST, "Invalid published_since.")
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            models = [m for m in models if m.published_at >= moment]
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
        model = self.server.catalog.by_mid.get(mid)
        if model is None:
            return self._error(HTTPStatus.NOT_FOUND, "Not found.")
        try:
            count = min(max(int(query.get("count", MAX_COUNT)), 1), MAX_COUNT)
            offset = max(int(query.get("offset", 0)), 0)
        except ValueError:
            return self._error(HTTPStatus.BAD_REQUEST, "count and offset must be integers.")
        page = model.likers[offset : offset + count]
        has_next = offset + count < len(model.likers)
        next_url = None
        if has_next:
            params = urlencode({"model": mid, "count": count, "offset": offset + count})
            next_url = f"{self.base_url}/i/likes?{params}"
        return self._json(HTTPStatus.OK, {
            "results": [{"uid": uid, "username": uid} for uid in page],
            "next": next_url,
        })

    def _thumbnail(self, filename: str) -> None:
        mid = filename.removesuffix("_thumb200.jpg")
        model = self.server.catalog.by_mid.get(mid) if is_model_id(mid) else None
        if model is None or model.thumbnail is None or filename != f"{mid}_thumb200.jpg":
            return self._error(HTTPStatus.NOT_FOUND, "Not found.")
        return self._send(HTTPStatus.OK, model.thumbnail.read_bytes(), "image/jpeg")


class SketchfabServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, catalog: Catalog, address: tuple[str, int], faults: Faults = Faults()):
        super().__init__(address, SketchfabHandler)
        self.catalog = catalog
        self.faults = faults
        self._random = random.Random(faults.seed)
        self._lock = threading.Lock()
        self.requests_served = 0
        self.authorizations: set[str | None] = set()  # what clients sent, for tests
        self.fetches: Counter[str] = Counter()  # thumbnail files and likes pages served, for tests

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        """A client that hangs up (killed crawler, timeout) is routine here, not a traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("client %s disconnected", client_address)
            return
        super().handle_error(request, client_address)

    def roll(self) -> float:
        with self._lock:
            return self._random.random()

    def count_request(self, authorization: str | None = None) -> None:
        with self._lock:
            self.requests_served += 1
            self.authorizations.add(authorization)

    def count_fetch(self, what: str) -> None:
        with self._lock:
            self.fetches[what] += 1

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def start_in_thread(folder: Path, host: str = "127.0.0.1", port: int = 0,
                    faults: Faults = Faults()) -> SketchfabServer:
    """Start a server on a background thread (tests, the demo); ``server.shutdown()`` stops it."""
    server = SketchfabServer(Catalog(folder), (host, port), faults)
    threading.Thread(target=server.serve_forever, name="sketchfab-server", daemon=True).start()
    return server
