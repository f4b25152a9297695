"""One Settings object, read from the environment (``RECSKETCH_*``) and overridden by flags,
Connections and run conf, in that order of precedence (docs/contracts.md §4)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails

from recsketch.errors import ConfigError

if TYPE_CHECKING:
    from recsketch.storage import Location

SKETCHFAB_API_URL = "https://api.sketchfab.com"
SKETCHFAB_WEB_URL = "https://sketchfab.com"
BACKBONES = ("efficientnet_lite0", "vgg16")  # the Backbone literal below, for flags and docs
SKETCHFAB_MEDIA_HOSTS = ("media.sketchfab.com",)
REAL_API_RATE_LIMIT = 10.0
INPUT_SIZE = 224  # both backbones take 224×224 images


def _explain(error: ErrorDetails, from_env: set[str]) -> str:
    """One line naming the setting (and its variable) and what is wrong with the value."""
    field = str(error["loc"][0]) if error["loc"] else "settings"
    name = f"RECSKETCH_{field.upper()}" if field in from_env else field
    value, kind, ctx = error.get("input"), error["type"], error.get("ctx") or {}
    if kind in ("greater_than_equal", "greater_than"):
        return f"{name}={value} must be at least {ctx.get('ge', ctx.get('gt')):g}"
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return f"{name}={value!r} is not an integer"
    if kind in ("float_parsing", "float_type"):
        return f"{name}={value!r} is not a number"
    if kind == "literal_error":
        choices = ", ".join(_choices(field))
        return f"{field.replace('_', ' ', 1)} {value!r} is not one of {choices} ({name})"
    if kind == "extra_forbidden":
        return f"{field} is not a setting"
    return f"{name}={value!r}: {error['msg']}"


def _choices(field: str) -> tuple[str, ...]:
    annotation = Settings.model_fields[field].annotation
    return tuple(str(choice) for arg in (annotation, *get_args(annotation)) for choice in get_args(arg)
                 if isinstance(choice, str))


SUPPORTED_DATABASES = ("postgresql", "sqlite")


POSTGRES_DRIVER = "psycopg2"  # the driver whose COPY (copy_expert) the loads and the import use


def normalise_database_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` as users type them, with the driver the project uses
    (SQLAlchemy 2.1 picks psycopg 3 for a bare ``postgresql://``, which has no ``copy_expert``)."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return f"postgresql+{POSTGRES_DRIVER}://" + url.removeprefix(bare)
    return url


def check_database_url(url: str) -> None:
    """Only PostgreSQL (through psycopg2) and SQLite can hold the recommendations (COPY and the
    atomic swap, or SQLite's one transaction); anything else is refused at start, naming the
    setting."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(normalise_database_url(url))
        backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    except ArgumentError:
        raise ConfigError("the recommendations DB URL (RECSKETCH_DATABASE_URL or the recsketch_db connection) "
                          "is not a SQLAlchemy URL") from None
    if backend not in SUPPORTED_DATABASES:
        raise ConfigError(f"the recommendations DB is {backend!r} (RECSKETCH_DATABASE_URL or the recsketch_db "
                          f"connection): only {' and '.join(SUPPORTED_DATABASES)} are supported")
    if backend == "postgresql" and driver != POSTGRES_DRIVER:
        raise ConfigError(f"the recommendations DB URL names the driver {driver!r} (RECSKETCH_DATABASE_URL or the "
                          f"recsketch_db connection): use postgresql:// or postgresql+{POSTGRES_DRIVER}://")


Backbone = Literal["efficientnet_lite0", "vgg16"]
Precision = Literal["float32", "bfloat16"]


class Settings(BaseModel):
    """Everything a stage needs to know about where things live and how to run.

    The one place settings are validated, whichever way they arrive (environment, flag,
    Airflow Connection or run conf): every error names the setting, and the environment
    variable when that is where the value came from.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path | str = Path("data")  # a folder, or an object-store URL (s3://bucket/prefix)
    storage_conn_id: str | None = None  # inside Airflow: the object store's connection (recsketch.storage)
    database_url: str | None = None
    sketchfab_url: str = SKETCHFAB_API_URL
    sketchfab_web_url: str | None = None
    sketchfab_token: str | None = Field(default=None, repr=False)
    backbone: Backbone = "efficientnet_lite0"
    vgg16_weights: str = "imagenet"
    vgg16_pooling: Literal["flatten", "avg"] = "flatten"
    vgg16_precision: Precision = "float32"
    lite0_precision: Precision = "float32"  # bfloat16: ~2.7x faster where the CPU has AVX512-BF16
    runtime: Literal["auto", "onnxruntime", "openvino", "torch", "tensorflow"] = "auto"  # inference runtime
    top_k: int = Field(10, ge=1, le=10_000)
    neighbour_depth: int = Field(100, ge=1)  # exact visual neighbours kept per model: the hybrid's bound, deletions
    hybrid_exact: bool = False  # hybrid rows the bound cannot settle: computed in full (True) or measured (False)
    hybrid_likes: Literal["auto", "als", "itemknn"] = "auto"  # the hybrid's likes half; auto: the one validating best
    als_refit_drift: float = Field(0.05, ge=0)  # refit ALS once this share of the fit's likes changed; else fold in
    als_refit_days: float = Field(7.0, ge=0)  # and once the fit is this many days old
    min_likes: int = Field(5, ge=0)
    chunk_size: int = Field(256, ge=1)
    batch_size: int | None = Field(None, ge=1)  # None: the backbone's own fastest batch
    crawl_workers: int = Field(8, ge=1)
    http_retries: int = Field(5, ge=0)
    rate_limit: float | None = Field(None, ge=0)  # requests/s for the deployment; None: the default below
    thumbnail_hosts: tuple[str, ...] = ()  # beside the API's own hosts
    allow_private_addresses: bool = False  # thumbnail hosts may resolve to private/loopback addresses
    max_thumbnail_bytes: int = Field(5 * 1024 * 1024, ge=1024)
    similarity_shard_rows: int = Field(50_000, ge=1)  # query rows per similarity shard (one mapped task each)
    max_mapped_tasks: int = Field(256, ge=1)  # extract and similarity tasks per run, whatever the catalogue size
    threads: int | None = Field(None, ge=1)  # CPU threads per task; None: cores / worker concurrency
    pca_dim: int = Field(0, ge=0)  # reduce features to this many dimensions before top-k; 0: exact
    likes_max_age_days: float = Field(7.0, ge=0)  # stored likers older than this are refetched
    retry_after_max_s: float = Field(300.0, ge=0)  # a longer Retry-After fails the crawl (it resumes later)
    preprocess: Literal["crop", "seed"] = "crop"  # crop: short side, centre crop; seed: stretched (load_img)
    gate_min_ratio: float = Field(0.9, ge=0)  # load refuses a method below this x a kept run's (95 %); 0: off
    gate_min_ndcg: float = Field(0.0, ge=0)  # and below this served NDCG@10 (0: no absolute floor)
    gate_min_users: int = Field(30, ge=0)  # with fewer held-out users the gate warns and loads
    max_deletion_share: float = Field(0.05, ge=0, le=1)  # a crawl that would delete more of the catalogue deletes none
    eval_max_users: int = Field(10_000, ge=1)  # users the evaluate stage ranks for (sampled)
    keep_runs: int = Field(7, ge=1)  # run folders of each kind retention keeps (recsketch gc), beside live/in flight
    compaction_grace_s: float = Field(3600.0, ge=0)  # a retired chunk file outlives any reader of the manifest

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir(cls, value: object) -> object:
        """A URL of an object store stays a string; any other value is a local Path."""
        from recsketch.storage import is_object_store_url, local_path_of

        if is_object_store_url(value):
            return str(value).rstrip("/")
        return local_path_of(value) if isinstance(value, str) else value

    @field_validator("sketchfab_url", "sketchfab_web_url")
    @classmethod
    def _http_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        """An http(s) URL with a host, without a trailing slash (``file:///etc``, ``example.com``
        and ``http://[::1`` were tracebacks in the crawl)."""
        if not value:
            return value
        from urllib.parse import urlsplit

        name = f"RECSKETCH_{str(info.field_name).upper()}"
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018  (a malformed port raises here)
        except ValueError as exc:
            raise ConfigError(f"{name}={value!r} is not a URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{name}={value!r} is not an http(s) URL with a host (e.g. http://127.0.0.1:8765)")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _database_driver(cls, value: str | None) -> str | None:
        return normalise_database_url(value) if value else value

    @model_validator(mode="after")
    def _supported_database(self) -> Settings:
        if self.database_url:
            check_database_url(self.database_url)
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``RECSKETCH_<FIELD>`` variables (an empty one counts as unset)."""
        source = os.environ if env is None else env
        values: dict[str, object] = {}
        for name in cls.model_fields:
            if name == "storage_conn_id":  # an Airflow connection: only tasks use it (hooks.airflow_settings)
                continue
            raw = source.get(f"RECSKETCH_{name.upper()}")
            if raw is None or raw == "":
                continue
            if name == "thumbnail_hosts":
                values[name] = tuple(h.strip() for h in raw.split(",") if h.strip())
            elif name == "allow_private_addresses":
                values[name] = raw.strip().lower() in ("1", "true", "yes")
            elif name == "batch_size" and raw.strip() == "0":
                continue  # 0: the backbone's own batch, as documented
            else:
                values[name] = raw
        return cls._validated(values, from_env=set(values))

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given fields replaced (validated like the rest); ``None`` is ignored."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return self._validated({**self.model_dump(), **given}, from_env=set())

    @classmethod
    def _validated(cls, values: dict[str, object], from_env: set[str]) -> Settings:
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(_explain(exc.errors()[0], from_env)) from None

    @property
    def resolved_database_url(self) -> str:
        """The recommendations DB; by default an SQLite file inside the data dir."""
        if self.database_url:
            return self.database_url
        from recsketch.storage import is_object_store_url

        if is_object_store_url(self.data_dir):
            raise ConfigError(f"RECSKETCH_DATA_DIR is an object store ({self.data_dir}) and the default "
                              "recommendations DB is an SQLite file inside it: set RECSKETCH_DATABASE_URL "
                              "(or the recsketch_db connection) to a PostgreSQL URL")
        return f"sqlite:///{(Path(self.data_dir) / 'recsketch.sqlite').resolve()}"

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
    def effective_threads(self) -> int:
        """Threads one task may use: RECSKETCH_THREADS, else this host's cores shared by the tasks
        a worker runs at once (``AIRFLOW__CELERY__WORKER_CONCURRENCY``; 1 outside Celery)."""
        if self.threads:
            return self.threads
        raw = os.environ.get("AIRFLOW__CELERY__WORKER_CONCURRENCY", "")
        concurrency = int(raw) if raw.strip().isdigit() and int(raw) > 0 else 1
        return max(1, (os.cpu_count() or 1) // concurrency)

    @property
    def allowed_thumbnail_hosts(self) -> tuple[str, ...]:
        if self.thumbnail_hosts:
            return self.thumbnail_hosts
        return SKETCHFAB_MEDIA_HOSTS if self.sketchfab_url == SKETCHFAB_API_URL else ()

    @property
    def data_root(self) -> Location:
        """The data dir as a Location: a Path, or an object-store key prefix."""
        from recsketch.storage import location

        return location(self.data_dir, self.storage_conn_id)

    @property
    def thumbs_dir(self) -> Location:
        return self.data_root / "thumbs"

    @property
    def features_dir(self) -> Location:
        return self.data_root / "features"

    def run_dir(self, run_id: str) -> Location:
        return self.data_root / "runs" / run_id
