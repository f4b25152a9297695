"""Sketchfab API client: pooled connections, retries with backoff, a shared rate limit.

The same code talks to api.sketchfab.com and to the local server. The token travels only
in the ``Authorization`` header; log lines and errors carry URLs, never headers.
"""

from __future__ import annotations

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
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from recsketch.errors import ApiError, BadInputError
from recsketch.ids import validate_model_id

log = logging.getLogger(__name__)

RETRY_STATUSES = {429, 500, 502, 503, 504}
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


class RateLimiter:
    """At most ``rate`` request starts per second across all threads (None: unlimited)."""

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


def pick_thumbnail(images: list[dict[str, Any]], target: int = 200) -> str | None:
    """The 200×200 image, else the one whose size is nearest to it."""
    best: tuple[int, str] | None = None
    for image in images or []:
        if not isinstance(image, dict):
            continue
        url, width, height = image.get("url"), image.get("width"), image.get("height")
        if not isinstance(url, str) or not isinstance(width, int) or not isinstance(height, int):
            continue
        distance = abs(width - target) + abs(height - target)
        if best is None or distance < best[0]:
            best = (distance, url)
    return best[1] if best else None


def parse_model(entry: object) -> ModelInfo:
    """Validate one ``ModelList`` JSON object; a bad one raises naming what is wrong."""
    if not isinstance(entry, dict):
        raise BadInputError(f"model entry is {type(entry).__name__}, expected an object")
    mid = validate_model_id(entry.get("uid"), source="model entry uid")
    name = entry.get("name")
    if not isinstance(name, str):
        raise BadInputError(f"model {mid}: name is {name!r}, expected a string")
    published_at = None
    raw_date = entry.get("publishedAt")
    if isinstance(raw_date, str) and raw_date:
        try:
            published_at = datetime.fromisoformat(raw_date.replace("Z", "+00:00"))
        except ValueError:
            raise BadInputError(f"model {mid}: publishedAt {raw_date!r} is not ISO 8601") from None
        if published_at.tzinfo is None:
            published_at = published_at.replace(tzinfo=UTC)
    like_count = entry.get("likeCount")
    thumbnails = entry.get("thumbnails") or {}
    images = thumbnails.get("images") if isinstance(thumbnails, dict) else None
    return ModelInfo(
        mid=mid,
        name=name,
        published_at=published_at,
        like_count=like_count if isinstance(like_count, int) else None,
        viewer_url=entry.get("viewerUrl") if isinstance(entry.get("viewerUrl"), str) else None,
        thumbnail_url=pick_thumbnail(images if isinstance(images, list) else []),
    )


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
    """The liker uids of one ``/i/likes`` page and the next page's URL."""
    results, next_url = parse_page(payload, f"likes of {mid}")
    uids = []
    for entry in results:
        uid = entry.get("uid") if isinstance(entry, dict) else None
        if not isinstance(uid, str) or not uid:
            raise ApiError(f"likes of {mid}: liker entry without a uid: {entry!r:.80}")
        uids.append(uid)
    return uids, next_url


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
        timeout: float = 30.0,
        rate_limit: float | None = None,
        pool_size: int = 16,
        thumbnail_hosts: tuple[str, ...] | None = None,
        allow_private_addresses: bool = False,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.likes_url = (likes_url or api_url).rstrip("/")
        # the API's own hosts were configured by the operator: they may be private (a local server)
        self.own_hosts = frozenset(h for h in (urlsplit(self.api_url).hostname, urlsplit(self.likes_url).hostname)
                                   if h)
        self.thumbnail_hosts = frozenset(thumbnail_hosts or ()) | self.own_hosts
        self.allow_private_addresses = allow_private_addresses
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.timeout = timeout
        self.stats = ClientStats()
        self._limiter = RateLimiter(rate_limit)
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["User-Agent"] = USER_AGENT
        if token:
            self._session.headers["Authorization"] = f"Token {token}"

    def close(self) -> None:
        self._session.close()

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))

    def get(self, url: str, params: dict[str, Any] | None = None, *, max_bytes: int | None = None,
            allow_redirects: bool = True) -> requests.Response:
        """GET with retries on 429, 5xx, connection errors, timeouts and truncated bodies.

        The body is read here (streamed, so ``max_bytes`` stops a huge one early) and is in
        ``response.content`` afterwards.
        """
        for attempt in range(self.retries + 1):
            self._limiter.wait()
            self.stats.add(requests=1)
            wait: float | None = None
            try:
                response = self._session.get(url, params=params, timeout=self.timeout, stream=True,
                                             allow_redirects=allow_redirects)
                _read_body(response, max_bytes)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as exc:
                problem = f"{type(exc).__name__}"
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                problem = f"HTTP {response.status_code}"
                if response.status_code == 429:
                    self.stats.add(throttled=1)
                    wait = _retry_after_seconds(response.headers.get("Retry-After"))
                    if wait is not None:
                        wait = min(wait, self.backoff_cap)
            if attempt == self.retries:
                raise ApiError(f"GET {url} failed after {self.retries + 1} attempts: {problem}")
            wait = self._backoff(attempt) if wait is None else wait
            self.stats.add(retries=1)
            log.debug("GET %s: %s, retry %d in %.2fs", url, problem, attempt + 1, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def get_json(self, url: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET a JSON object; a truncated or malformed body is retried like a 5xx."""
        for attempt in range(self.retries + 1):
            response = self.get(url, params)
            if response.status_code != 200:
                raise ApiError(f"GET {response.url}: HTTP {response.status_code}")
            try:
                payload = response.json()
            except ValueError:
                if attempt == self.retries:
                    raise ApiError(f"GET {response.url}: body is not JSON") from None
                self.stats.add(retries=1)
                time.sleep(self._backoff(attempt))
                continue
            if not isinstance(payload, dict):
                raise ApiError(f"GET {response.url}: expected a JSON object")
            return payload
        raise AssertionError("unreachable")

    def model_pages(
        self, published_since: datetime | None = None, count: int = 24, start_url: str | None = None
    ) -> Iterator[tuple[list[dict[str, Any]], str | None]]:
        """Yield (raw ``results``, next page URL) for each ``/v3/models`` page, newest first.

        ``start_url`` resumes at a ``next`` URL saved by an earlier, interrupted crawl.
        """
        params: dict[str, Any] | None = {"count": count, "sort_by": "-publishedAt"}
        if published_since is not None and params is not None:
            params["published_since"] = published_since.astimezone(UTC).isoformat()
        url: str | None = f"{self.api_url}/v3/models"
        if start_url:
            url, params = start_url, None
        while url:
            results, next_url = parse_page(self.get_json(url, params), f"GET {url}")
            yield results, next_url
            url, params = next_url, None

    def likers(self, mid: str) -> list[str]:
        """Every user who liked ``mid``, across all pages of ``/i/likes``."""
        validate_model_id(mid)
        uids: list[str] = []
        url: str | None = f"{self.likes_url}/i/likes"
        params: dict[str, Any] | None = {"model": mid, "count": 24, "offset": 0}
        while url:
            page, url = parse_likes_page(self.get_json(url, params), mid)
            uids += page
            params = None
        return uids

    def download(self, url: str, max_bytes: int) -> tuple[bytes, str]:
        """Fetch a thumbnail; returns (body, content type).

        Only http(s) URLs on the allowed hosts; redirects are refused (they could lead to
        another host), and a body above ``max_bytes`` is cut off and refused.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise BadInputError(f"thumbnail URL {url!r}: only http(s) is allowed")
        if parts.hostname not in self.thumbnail_hosts:
            raise BadInputError(f"thumbnail URL {url!r}: host {parts.hostname!r} is not allowed "
                                f"(allowed: {', '.join(sorted(self.thumbnail_hosts))})")
        if parts.hostname not in self.own_hosts and not self.allow_private_addresses:
            _refuse_private_address(url, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        response = self.get(url, max_bytes=max_bytes, allow_redirects=False)
        if response.is_redirect:
            raise BadInputError(f"GET {url}: redirect to {response.headers.get('Location')!r} refused")
        if response.status_code != 200:
            raise ApiError(f"GET {url}: HTTP {response.status_code}")
        return response.content, response.headers.get("Content-Type", "")


def _refuse_private_address(url: str, host: str, port: int) -> None:
    """A thumbnail host that resolves to a loopback, private, link-local or reserved address is
    refused (SSRF), unless RECSKETCH_ALLOW_PRIVATE_ADDRESSES is set or it is the API's own host."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError as exc:
        raise ApiError(f"thumbnail URL {url!r}: cannot resolve {host!r} ({exc})") from None
    for address in sorted(addresses):
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global:
            raise BadInputError(f"thumbnail URL {url!r}: {host!r} resolves to the non-public address {address}; "
                                "set RECSKETCH_ALLOW_PRIVATE_ADDRESSES=1 to allow it")


class BodyTooLarge(BadInputError):
    """A response body above the caller's byte limit."""


def _read_body(response: requests.Response, max_bytes: int | None) -> None:
    """Read a streamed body into ``response._content``, stopping past ``max_bytes``."""
    declared = response.headers.get("Content-Length")
    if max_bytes is not None and declared and declared.isdigit() and int(declared) > max_bytes:
        response.close()
        raise BodyTooLarge(f"GET {response.url}: {declared} bytes, above the {max_bytes} byte limit")
    chunks, size = [], 0
    for chunk in response.iter_content(64 * 1024):
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            response.close()
            raise BodyTooLarge(f"GET {response.url}: more than {max_bytes} bytes, above the limit")
        chunks.append(chunk)
    response._content = b"".join(chunks)
    response._content_consumed = True
