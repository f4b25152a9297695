"""Sketchfab API client: pooled connections, one retry layer, a rate limit shared by workers.

The same code talks to api.sketchfab.com and to the local server. The token travels only
in the ``Authorization`` header of requests to the API's own hosts: never to a thumbnail
host, never along a redirect. Log lines and errors carry URLs, never headers.
"""

from __future__ import annotations

import contextlib
import email.utils
import ipaddress
import logging
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

from recsketch.errors import ApiError, BadInputError, PermanentApiError, RetryAfterTooLong
from recsketch.ids import printable, uid_problem, validate_model_id
from recsketch.timestamps import parse_utc

log = logging.getLogger(__name__)

RETRY_STATUSES = {429, 500, 502, 503, 504}
MAX_REDIRECTS = 5
MAX_JSON_BYTES = 16 * 2**20  # an API answer, after decompression: a page of 24 models is ~100 KB
MAX_MODEL_PAGES = 2_000_000  # listing pages one crawl reads (Sketchfab's catalogue: ~100 k at 24 a page)
MAX_LIKES_PAGES = 20_000  # likers pages of one model (~480 k likers)
USER_AGENT = "recsketch/0.1 (+https://github.com/recsketch)"


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    throttled: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "retries": self.retries, "throttled_429": self.throttled}


@dataclass(frozen=True)
class ModelInfo:
    """One entry of ``/v3/models``, validated."""

    mid: str
    name: str
    published_at: datetime | None
    like_count: int | None
    viewer_url: str | None
    thumbnail_url: str | None
    created_at: datetime | None = None


class Limiter(Protocol):
    def wait(self) -> None: ...


class RateLimiter:
    """At most ``rate`` request starts per second across the threads of this process (None:
    unlimited). ``recsketch.ratelimit.SharedRateLimiter`` shares one budget across processes."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds, from either delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def pick_thumbnail(images: list[Any], min_side: int = 224) -> str | None:
    """The smallest image whose short side is at least ``min_side`` (the backbone's input), else
    the largest: enough pixels to embed without upscaling, no more bytes than that needs.

    Sketchfab lists five 16:9 sizes (1920×1080 … 64×36): for a 224-px input that is 720×405.
    A folder's square 200×200 thumbnail, the only one, is taken as it is.
    """
    sized = []
    for image in images or []:
        if not isinstance(image, dict):
            continue
        url, width, height = image.get("url"), image.get("width"), image.get("height")
        if isinstance(url, str) and isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
            sized.append((min(width, height), width * height, url))
    if not sized:
        return None
    enough = [entry for entry in sized if entry[0] >= min_side]
    return min(enough)[2] if enough else max(sized)[2]


def _timestamp(entry: dict[str, Any], key: str, mid: str) -> datetime | None:
    """An API timestamp (``2021-03-18T09:36:25.430631``, no zone: UTC) or None when absent."""
    raw = entry.get(key)
    if not isinstance(raw, str) or not raw:
        return None
    try:
        return parse_utc(raw)
    except ValueError:
        raise BadInputError(f"model {mid}: {key} {raw!r} is not ISO 8601") from None


def parse_model(entry: object, thumbnail_min_side: int = 224) -> ModelInfo:
    """Validate one ``ModelList`` JSON object; a bad one raises naming what is wrong."""
    if not isinstance(entry, dict):
        raise BadInputError(f"model entry is {type(entry).__name__}, expected an object")
    mid = validate_model_id(entry.get("uid"), source="model entry uid")
    name = entry.get("name")
    if not isinstance(name, str):
        raise BadInputError(f"model {mid}: name is {name!r}, expected a string")
    if problem := _unstorable(name):
        raise BadInputError(f"model {mid}: its name {problem}: quarantined")
    like_count = entry.get("likeCount")
    if isinstance(like_count, int) and not isinstance(like_count, bool) and not 0 <= like_count < 2**31:
        raise BadInputError(f"model {mid}: likeCount {like_count:.3g} is no count of likes: quarantined")
    thumbnails = entry.get("thumbnails") or {}
    images = thumbnails.get("images") if isinstance(thumbnails, dict) else None
    return ModelInfo(
        mid=mid,
        name=name,
        published_at=_timestamp(entry, "publishedAt", mid),
        like_count=like_count if isinstance(like_count, int) and not isinstance(like_count, bool) else None,
        viewer_url=entry.get("viewerUrl") if isinstance(entry.get("viewerUrl"), str) \
        and not _unstorable(entry["viewerUrl"]) else None,
        thumbnail_url=pick_thumbnail(images if isinstance(images, list) else [], thumbnail_min_side),
        created_at=_timestamp(entry, "createdAt", mid),
    )


MAX_NAME_LENGTH = 10_000  # a model name longer than this is no name


def _unstorable(text: str) -> str | None:
    """Why a text from the API cannot be stored (PostgreSQL's text holds no NUL; UTF-8 holds no
    lone surrogate), or None."""
    if "\x00" in text:
        return "holds a NUL character"
    if any("\ud800" <= c <= "\udfff" for c in text):
        return "holds a lone surrogate (not Unicode text)"
    if len(text) > MAX_NAME_LENGTH:
        return f"is {len(text):,} characters long"
    return None


def parse_page(payload: object, source: str) -> tuple[list[Any], str | None]:
    """A paged answer's ``results`` list and ``next`` URL (None on the last page)."""
    if not isinstance(payload, dict):
        raise ApiError(f"{source}: expected a JSON object, got {type(payload).__name__}")
    results = payload.get("results")
    if not isinstance(results, list):
        raise ApiError(f"{source}: 'results' is missing or not a list")
    next_url = payload.get("next")
    return results, next_url if isinstance(next_url, str) and next_url else None


def parse_likes_page(payload: object, mid: str) -> tuple[list[str], str | None]:
    """The liker uids of one ``/i/likes`` page and the next page's URL.

    ``/i/likes`` is internal and may change: every entry must be user-shaped (a ``uid`` and a
    ``username``, no ``viewerUrl``), else the whole answer is refused, so that model entries
    are never stored as likers.
    """
    results, next_url = parse_page(payload, f"likes of {mid}")
    uids = []
    for entry in results:
        if not isinstance(entry, dict):
            raise BadInputError(f"likes of {mid}: liker entry is {type(entry).__name__}, expected a user object")
        uid, username = entry.get("uid"), entry.get("username")
        if "viewerUrl" in entry or not isinstance(username, str):
            raise BadInputError(f"likes of {mid}: an entry is not a user (has viewerUrl or lacks username): "
                                f"{sorted(entry)[:8]}")
        if not isinstance(uid, str) or not uid:
            raise BadInputError(f"likes of {mid}: liker entry without a uid: {entry!r:.80}")
        if (problem := uid_problem(uid) or _unstorable(uid)) is not None:
            log.warning("likes of %s: a liker quarantined: %s", mid, printable(problem))
            continue
        uids.append(uid)
    return uids, next_url


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL; a malformed port is None (no origin of ours has one)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return parts.scheme, (parts.hostname or ""), None
    return parts.scheme, (parts.hostname or ""), port or (443 if parts.scheme == "https" else 80)


def _allowed_origin(entry: str) -> tuple[str, str, int | None]:
    """An allowed thumbnail host: ``scheme://host[:port]``, or a bare host name for https on 443."""
    return _origin(entry) if "://" in entry else ("https", entry.lower(), 443)


def _named(origin: tuple[str, str, int | None]) -> str:
    return f"{origin[0]}://{origin[1]}:{origin[2]}"


class SketchfabClient:
    """Thread-safe client for the parts of the Sketchfab API that recsketch uses."""

    def __init__(
        self,
        api_url: str,
        likes_url: str | None = None,
        token: str | None = None,
        *,
        retries: int = 5,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        retry_after_max: float = 300.0,
        timeout: float = 30.0,
        deadline: float = 120.0,
        rate_limit: float | None = None,
        limiter: Limiter | None = None,
        pool_size: int = 16,
        thumbnail_hosts: tuple[str, ...] | None = None,
        thumbnail_min_side: int = 224,
        allow_private_addresses: bool = False,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.likes_url = (likes_url or api_url).rstrip("/")
        # the API's own hosts were configured by the operator: they may be private (a local server)
        self._api_origins = frozenset(_origin(u) for u in (self.api_url, self.likes_url))
        # thumbnails: from the API's own origins, or the allowed hosts' (scheme, host and port all match)
        self.thumbnail_origins = frozenset(_allowed_origin(h) for h in thumbnail_hosts or ()) | self._api_origins
        self.thumbnail_min_side = thumbnail_min_side
        self.allow_private_addresses = allow_private_addresses
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_max = retry_after_max
        self.timeout = timeout
        self.deadline = deadline  # a whole request, however slowly its body drips in
        self.stats = ClientStats()
        self._limiter: Limiter = limiter or RateLimiter(rate_limit)
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["User-Agent"] = USER_AGENT
        self._session.trust_env = False  # no ~/.netrc credentials or proxies slipping into requests
        # the token is never a session header: it is added per request, to the API's origins only
        self._token = token

    def close(self) -> None:
        self._session.close()

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))

    def _headers(self, url: str, hop: int, authorize: bool) -> dict[str, str]:
        """The token for the API's own origins on the first hop; nothing anywhere else."""
        if authorize and self._token and hop == 0 and _origin(url) in self._api_origins:
            return {"Authorization": f"Token {self._token}"}
        return {}

    def _send(self, url: str, params: dict[str, Any] | None, max_bytes: int | None,
              follow_redirects: bool, authorize: bool) -> requests.Response:
        """One request, redirects followed here (without the token) when allowed."""
        for hop in range(MAX_REDIRECTS + 1):
            response = self._session.get(url, params=params, timeout=self.timeout, stream=True,
                                         allow_redirects=False, headers=self._headers(url, hop, authorize))
            if not (follow_redirects and response.is_redirect and response.headers.get("Location")):
                _read_body(response, max_bytes, self.deadline)
                return response
            response.close()
            target = urljoin(response.url, response.headers["Location"])
            if _origin(target) not in self._api_origins:  # a listing answer comes from the API, or not at all
                raise PermanentApiError(f"GET {url}: a redirect to {target[:200]!r}, outside the API's origins "
                                        f"({', '.join(sorted(map(_named, self._api_origins)))}), refused")
            url, params = target, None
        raise ApiError(f"GET {url}: more than {MAX_REDIRECTS} redirects")

    def get(self, url: str, params: dict[str, Any] | None = None, *, max_bytes: int | None = None,
            allow_redirects: bool = True, authorize: bool = True) -> requests.Response:
        """GET with retries; see ``_request``."""
        return self._request(url, params, max_bytes, allow_redirects, authorize, expect_json=False)[0]

    def _request(self, url: str, params: dict[str, Any] | None, max_bytes: int | None, allow_redirects: bool,
                 authorize: bool, expect_json: bool) -> tuple[requests.Response, Any]:
        """GET with retries on 429, 5xx, connection errors, timeouts, truncated bodies and (with
        ``expect_json``) bodies that are not JSON: one retry layer, at most ``retries + 1``
        requests for a URL.

        ``Retry-After`` is honoured in full up to ``retry_after_max`` seconds; a longer wait
        raises RetryAfterTooLong at once. The body is read here (streamed, so ``max_bytes``
        stops a huge one early) and is in ``response.content`` afterwards; with
        ``expect_json`` the parsed body of a 200 comes back beside the response.
        """
        for attempt in range(self.retries + 1):
            self._limiter.wait()
            self.stats.add(requests=1)
            wait: float | None = None
            try:
                response = self._send(url, params, max_bytes, allow_redirects, authorize)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as exc:
                problem = f"{type(exc).__name__}"
            else:
                if response.status_code == 429:
                    problem = "HTTP 429"
                    self.stats.add(throttled=1)
                    wait = _retry_after_seconds(response.headers.get("Retry-After"))
                    if wait is not None and wait > self.retry_after_max:
                        raise RetryAfterTooLong(
                            f"GET {url}: the API asked to wait {wait:.0f} s (Retry-After), above the "
                            f"{self.retry_after_max:g} s allowed (RECSKETCH_RETRY_AFTER_MAX_S); "
                            "the next try resumes where this one stopped")
                elif response.status_code in RETRY_STATUSES:
                    problem = f"HTTP {response.status_code}"
                elif expect_json and response.status_code == 200:
                    try:
                        return response, response.json()
                    except ValueError:
                        problem = "body is not JSON"
                else:
                    return response, None
            if attempt == self.retries:
                raise ApiError(f"GET {url} failed after {self.retries + 1} attempts: {problem}")
            wait = self._backoff(attempt) if wait is None else wait
            self.stats.add(retries=1)
            log.debug("GET %s: %s, retry %d in %.2fs", url, problem, attempt + 1, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def get_json(self, url: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET a JSON object of at most MAX_JSON_BYTES (decompressed). A 4xx other than 429 is
        permanent (PermanentApiError, no retry)."""
        response, payload = self._request(url, params, MAX_JSON_BYTES, True, True, expect_json=True)
        if 400 <= response.status_code < 500:
            raise PermanentApiError(f"GET {response.url}: HTTP {response.status_code} {_detail(response)}")
        if response.status_code != 200:
            raise ApiError(f"GET {response.url}: HTTP {response.status_code}")
        if not isinstance(payload, dict):
            raise ApiError(f"GET {response.url}: expected a JSON object")
        return payload

    def model_pages(
        self, published_since: datetime | None = None, count: int = 24, start_url: str | None = None
    ) -> Iterator[tuple[list[dict[str, Any]], str | None]]:
        """Yield (raw ``results``, next page URL) for each ``/v3/models`` page, oldest first.

        Documented parameters only: ``sort_by=createdAt`` (ascending: new models land at the
        end, so a saved ``next`` URL stays valid) and ``published_since`` as a date (the
        caller drops what falls before a window that starts mid-day, and stops reading once
        ``createdAt`` passes the window's end, since ``createdAt`` <= ``publishedAt``).
        ``start_url`` resumes at a ``next`` URL saved by an earlier, interrupted crawl.
        """
        params: dict[str, Any] | None = {"count": count, "sort_by": "createdAt"}
        if published_since is not None and params is not None:
            params["published_since"] = published_since.astimezone(UTC).date().isoformat()
        url: str | None = f"{self.api_url}/v3/models"
        if start_url:
            url, params = self._next_link(f"{self.api_url}/v3/models", start_url, "the saved listing position"), None
        pages = _Pagination(f"the listing {self.api_url}/v3/models", MAX_MODEL_PAGES)
        while url:
            pages.read(url)
            results, next_url = parse_page(self.get_json(url, params), f"GET {url}")
            next_url = self._next_link(url, next_url, "the listing's next page") if next_url else None
            yield results, next_url
            url, params = next_url, None

    def _next_link(self, current: str, link: str, what: str) -> str:
        """A ``next`` link (or a saved one), followed only to the API's own origins."""
        if _origin(link) not in self._api_origins:
            raise PermanentApiError(f"GET {current}: {what} {link[:200]!r} is outside the API's origins "
                                    f"({', '.join(sorted(map(_named, self._api_origins)))}): not followed")
        return link

    def model_exists(self, mid: str) -> bool:
        """Whether ``GET /v3/models/{uid}`` finds the model: False on 404 (deleted), True on 200.
        Anything else (5xx after the retries, a timeout, another 4xx) raises: a transient error
        is never read as a deletion."""
        validate_model_id(mid)
        response, _ = self._request(f"{self.api_url}/v3/models/{mid}", None, MAX_JSON_BYTES, True, True,
                                    expect_json=True)
        if response.status_code == 404:
            return False
        if response.status_code == 200:
            return True
        raise ApiError(f"GET {response.url}: HTTP {response.status_code} {_detail(response)}")

    def likers(self, mid: str) -> list[str]:
        """Every user who liked ``mid``, across all pages of ``/i/likes``."""
        validate_model_id(mid)
        uids: list[str] = []
        url: str | None = f"{self.likes_url}/i/likes"
        params: dict[str, Any] | None = {"model": mid, "count": 24, "offset": 0}
        pages = _Pagination(f"the likers of {mid}", MAX_LIKES_PAGES)
        while url:
            pages.read(url)
            page, next_url = parse_likes_page(self.get_json(url, params), mid)
            uids += page
            url = self._next_link(url, next_url, f"the likers of {mid}'s next page") if next_url else None
            params = None
        return uids

    def download(self, url: str, max_bytes: int) -> tuple[bytes, str]:
        """Fetch a thumbnail; returns (body, content type).

        Only http(s) URLs on the allowed hosts, never with the token; redirects are refused
        (they could lead to another host), and a body above ``max_bytes`` is cut off and refused.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise BadInputError(f"thumbnail URL {url!r}: only http(s) is allowed")
        origin = _origin(url)
        if origin not in self.thumbnail_origins:
            raise BadInputError(f"thumbnail URL {url!r}: host {parts.hostname!r} is not allowed as {_named(origin)} "
                                f"(allowed: {', '.join(sorted(map(_named, self.thumbnail_origins)))})")
        if origin not in self._api_origins and not self.allow_private_addresses:
            _refuse_private_address(url, origin[1], origin[2] or 443)
        response = self.get(url, max_bytes=max_bytes, allow_redirects=False, authorize=False)
        if response.is_redirect:
            raise BadInputError(f"GET {url}: redirect to {response.headers.get('Location')!r} refused")
        if response.status_code != 200:
            raise ApiError(f"GET {url}: HTTP {response.status_code}")
        return response.content, response.headers.get("Content-Type", "")


def _detail(response: requests.Response) -> str:
    """The API's own one-line reason, if it gave one."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return ""
    return f"({detail})" if isinstance(detail, str) else ""


def _refuse_private_address(url: str, host: str, port: int) -> None:
    """A thumbnail host that resolves to a loopback, private, link-local or reserved address is
    refused (SSRF), unless RECSKETCH_ALLOW_PRIVATE_ADDRESSES is set or it is the API's own host."""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError as exc:
        raise ApiError(f"thumbnail URL {url!r}: cannot resolve {host!r} ({exc})") from None
    for address in sorted(addresses):
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global:
            raise BadInputError(f"thumbnail URL {url!r}: {host!r} resolves to the non-public address {address}; "
                                "set RECSKETCH_ALLOW_PRIVATE_ADDRESSES=1 to allow it")


class BodyTooLarge(BadInputError):
    """A response body above the caller's byte limit."""


class _Pagination:
    """The pages of one paged answer read so far: a ``next`` link seen before (a loop) or more
    than ``budget`` pages stop it with a clear error instead of reading for ever."""

    def __init__(self, what: str, budget: int) -> None:
        self.what, self.budget, self.seen = what, budget, set[str]()

    def read(self, url: str) -> None:
        if url in self.seen:
            raise PermanentApiError(f"{self.what}: the next page {url[:200]!r} was already read "
                                    f"({len(self.seen)} pages in): the pagination loops, stopped")
        if len(self.seen) >= self.budget:
            raise PermanentApiError(f"{self.what}: more than {self.budget} pages, stopped")
        self.seen.add(url)


def _read_body(response: requests.Response, max_bytes: int | None, deadline: float | None = None) -> None:
    """Read a streamed body into ``response._content``, stopping past ``max_bytes`` (counted
    after decompression: a gzip bomb stops there too) or past ``deadline`` seconds in all (a
    body that drips a byte at a time would hold the request for as long as the server likes:
    the socket is shut and the request counts as timed out)."""
    declared = response.headers.get("Content-Length")
    if max_bytes is not None and declared and declared.isdigit() and int(declared) > max_bytes:
        response.close()
        raise BodyTooLarge(f"GET {response.url}: {declared} bytes, above the {max_bytes} byte limit")
    expired = threading.Event()

    def cut() -> None:  # a blocked read returns only when its socket is shut
        expired.set()
        raw = getattr(getattr(getattr(response.raw, "_fp", None), "fp", None), "raw", None)
        sock = getattr(raw, "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(deadline, cut) if deadline else None
    if watchdog is not None:
        watchdog.daemon = True
        watchdog.start()
    chunks, size = [], 0
    try:
        for chunk in response.iter_content(64 * 1024):
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                response.close()
                raise BodyTooLarge(f"GET {response.url}: more than {max_bytes} bytes, above the limit")
            chunks.append(chunk)
    except (requests.RequestException, OSError):
        if expired.is_set():
            response.close()
            raise requests.Timeout(f"GET {response.url}: the answer took more than {deadline:g} s") from None
        raise
    finally:
        if watchdog is not None:
            watchdog.cancel()
    if expired.is_set():
        raise requests.Timeout(f"GET {response.url}: the answer took more than {deadline:g} s")
    response._content = b"".join(chunks)
    response._content_consumed = True
