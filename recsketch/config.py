"""One Settings object, read from the environment (``RECSKETCH_*``) and overridden by flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from recsketch.errors import ConfigError

SKETCHFAB_API_URL = "https://api.sketchfab.com"
SKETCHFAB_WEB_URL = "https://sketchfab.com"
BACKBONES = ("efficientnet_lite0", "vgg16")
SKETCHFAB_MEDIA_HOSTS = ("media.sketchfab.com",)
REAL_API_RATE_LIMIT = 10.0
PREPROCESSING = ("crop", "seed")
INPUT_SIZE = 224  # both backbones take 224×224 images


def _number(env: dict[str, str], name: str, cast: type, default: float | None, minimum: float):
    """A numeric variable; a value that is not a number or is below ``minimum`` names itself."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {'an integer' if cast is int else 'a number'}") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def _int(env: dict[str, str], name: str, default: int, minimum: int) -> int:
    return _number(env, name, int, default, minimum)


def _float(env: dict[str, str], name: str) -> float | None:
    return _number(env, name, float, None, 0)


SUPPORTED_DATABASES = ("postgresql", "sqlite")


def check_database_url(url: str) -> None:
    """Only PostgreSQL and SQLite can hold the recommendations (COPY and the atomic swap, or
    SQLite's one transaction); anything else is refused at start, naming the setting."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        raise ConfigError("the recommendations DB URL (RECSKETCH_DATABASE_URL or the recsketch_db connection) "
                          "is not a SQLAlchemy URL") from None
    if backend not in SUPPORTED_DATABASES:
        raise ConfigError(f"the recommendations DB is {backend!r} (RECSKETCH_DATABASE_URL or the recsketch_db "
                          f"connection): only {' and '.join(SUPPORTED_DATABASES)} are supported")


@dataclass(frozen=True)
class Settings:
    """Everything a stage needs to know about where things live and how to run."""

    data_dir: Path = Path("data")
    database_url: str | None = None
    sketchfab_url: str = SKETCHFAB_API_URL
    sketchfab_web_url: str | None = None
    sketchfab_token: str | None = field(default=None, repr=False)
    backbone: str = "efficientnet_lite0"
    vgg16_weights: str = "imagenet"
    vgg16_pooling: str = "flatten"
    vgg16_precision: str = "float32"
    lite0_precision: str = "float32"  # bfloat16: ~2.7x faster where the CPU has AVX512-BF16
    top_k: int = 10
    min_likes: int = 5
    chunk_size: int = 256
    batch_size: int | None = None  # None: the backbone's own fastest batch
    crawl_workers: int = 8
    http_retries: int = 5
    rate_limit: float | None = None  # requests/s shared by all threads; None: the default below
    thumbnail_hosts: tuple[str, ...] = ()  # beside the API's own hosts
    allow_private_addresses: bool = False  # thumbnail hosts may resolve to private/loopback addresses
    max_thumbnail_bytes: int = 5 * 1024 * 1024
    similarity_shard_rows: int = 50_000  # query rows per similarity shard (one mapped task each)
    pca_dim: int = 0  # reduce features to this many dimensions before top-k; 0: exact, no reduction
    likes_max_age_days: float = 7.0  # stored likers older than this are refetched
    retry_after_max_s: float = 300.0  # a longer Retry-After fails the crawl (it resumes on the next try)
    preprocess: str = "crop"  # crop: short side resized, centre crop; seed: stretched, nearest (Keras load_img)

    def __post_init__(self) -> None:
        """Choices are checked here, for flags and environment alike; each error names its setting."""
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone {self.backbone!r} is not one of {', '.join(BACKBONES)} "
                              "(RECSKETCH_BACKBONE / --backbone)")
        if self.vgg16_pooling not in ("flatten", "avg"):
            raise ConfigError(f"vgg16 pooling {self.vgg16_pooling!r} must be 'flatten' or 'avg' "
                              "(RECSKETCH_VGG16_POOLING)")
        for name in ("vgg16_precision", "lite0_precision"):
            value = getattr(self, name)
            if value not in ("float32", "bfloat16"):
                raise ConfigError(f"{name.replace('_', ' ', 1)} {value!r} must be 'float32' or 'bfloat16' "
                                  f"(RECSKETCH_{name.upper()})")
        for name in ("top_k", "chunk_size", "batch_size", "crawl_workers", "similarity_shard_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.preprocess not in PREPROCESSING:
            raise ConfigError(f"preprocess {self.preprocess!r} must be one of {', '.join(PREPROCESSING)} "
                              "(RECSKETCH_PREPROCESS)")
        if self.database_url:
            check_database_url(self.database_url)
        if self.min_likes < 0:
            raise ConfigError(f"min_likes={self.min_likes} must be at least 0")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        return cls(
            data_dir=Path(env.get("RECSKETCH_DATA_DIR") or "data"),
            database_url=env.get("RECSKETCH_DATABASE_URL") or None,
            sketchfab_url=(env.get("RECSKETCH_SKETCHFAB_URL") or SKETCHFAB_API_URL).rstrip("/"),
            sketchfab_web_url=(env.get("RECSKETCH_SKETCHFAB_WEB_URL") or "").rstrip("/") or None,
            sketchfab_token=env.get("RECSKETCH_SKETCHFAB_TOKEN") or None,
            backbone=env.get("RECSKETCH_BACKBONE") or "efficientnet_lite0",
            vgg16_weights=env.get("RECSKETCH_VGG16_WEIGHTS") or "imagenet",
            vgg16_pooling=env.get("RECSKETCH_VGG16_POOLING") or "flatten",
            vgg16_precision=env.get("RECSKETCH_VGG16_PRECISION") or "float32",
            lite0_precision=env.get("RECSKETCH_LITE0_PRECISION") or "float32",
            top_k=_int(env, "RECSKETCH_TOP_K", 10, 1),
            min_likes=_int(env, "RECSKETCH_MIN_LIKES", 5, 0),
            chunk_size=_int(env, "RECSKETCH_CHUNK_SIZE", 256, 1),
            batch_size=_int(env, "RECSKETCH_BATCH_SIZE", 0, 0) or None,
            crawl_workers=_int(env, "RECSKETCH_CRAWL_WORKERS", 8, 1),
            http_retries=_int(env, "RECSKETCH_HTTP_RETRIES", 5, 0),
            rate_limit=_float(env, "RECSKETCH_RATE_LIMIT"),
            thumbnail_hosts=tuple(h.strip() for h in (env.get("RECSKETCH_THUMBNAIL_HOSTS") or "").split(",")
                                  if h.strip()),
            allow_private_addresses=(env.get("RECSKETCH_ALLOW_PRIVATE_ADDRESSES") or "").lower() in ("1", "true",
                                                                                                   "yes"),
            max_thumbnail_bytes=_int(env, "RECSKETCH_MAX_THUMBNAIL_BYTES", 5 * 1024 * 1024, 1024),
            similarity_shard_rows=_int(env, "RECSKETCH_SIMILARITY_SHARD_ROWS", 50_000, 1),
            pca_dim=_int(env, "RECSKETCH_PCA_DIM", 0, 0),
            likes_max_age_days=_number(env, "RECSKETCH_LIKES_MAX_AGE_DAYS", float, 7.0, 0),
            retry_after_max_s=_number(env, "RECSKETCH_RETRY_AFTER_MAX_S", float, 300.0, 0),
            preprocess=env.get("RECSKETCH_PREPROCESS") or "crop",
        )

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given fields replaced; ``None`` values are ignored."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def resolved_database_url(self) -> str:
        """The recommendations DB; by default an SQLite file inside the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'recsketch.sqlite').resolve()}"

    @property
    def likes_base_url(self) -> str:
        """Where ``/i/likes`` lives: sketchfab.com for the real API, else the API host itself."""
        if self.sketchfab_web_url:
            return self.sketchfab_web_url
        if self.sketchfab_url == SKETCHFAB_API_URL:
            return SKETCHFAB_WEB_URL
        return self.sketchfab_url

    @property
    def effective_rate_limit(self) -> float | None:
        """Requests/s: 10 against the real Sketchfab API unless set; 0 means unlimited."""
        if self.rate_limit is None:
            return REAL_API_RATE_LIMIT if self.sketchfab_url == SKETCHFAB_API_URL else None
        return self.rate_limit or None

    @property
    def allowed_thumbnail_hosts(self) -> tuple[str, ...]:
        if self.thumbnail_hosts:
            return self.thumbnail_hosts
        return SKETCHFAB_MEDIA_HOSTS if self.sketchfab_url == SKETCHFAB_API_URL else ()

    @property
    def thumbs_dir(self) -> Path:
        return self.data_dir / "thumbs"

    @property
    def features_dir(self) -> Path:
        return self.data_dir / "features"

    def run_dir(self, run_id: str) -> Path:
        return self.data_dir / "runs" / run_id
