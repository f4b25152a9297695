"""Where artefacts live: a local folder or an object store, behind one small path type.

``RECSKETCH_DATA_DIR`` is a path (or ``file://`` URL), or an object-store URL such as
``s3://bucket/prefix``. A local data dir gives :class:`pathlib.Path` locations; an object
store gives :class:`ObjectLocation`, which offers the few path operations the stages use
(``/``, ``name``, ``read_bytes``, ``exists``) plus the two writes an object store can do
atomically: a whole object in one PUT, and a create-if-absent PUT (``If-None-Match: *``).

Nothing here lists a prefix: object-store listings can be stale (s3fs caches them, and
another host may have written since), so a stage that needs a set of objects reads a
manifest of their exact keys (see ``ChunkStore``).

The filesystem comes from Airflow's ``ObjectStoragePath`` with the connection
``settings.storage_conn_id`` inside Airflow tasks, and from fsspec with the standard AWS
variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``) outside.
"""

from __future__ import annotations

import functools
import posixpath
from pathlib import Path
from typing import Any, Union
from urllib.parse import urlsplit

from recsketch.errors import ConfigError, RecsketchError

OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "abfs", "az", "memory")


def is_object_store_url(value: object) -> bool:
    return isinstance(value, str) and urlsplit(value).scheme in OBJECT_STORE_SCHEMES


def local_path_of(value: str) -> Path:
    """A plain path or a ``file://`` URL as a Path; any other scheme is refused, named."""
    scheme = urlsplit(value).scheme
    if scheme == "file":
        return Path(urlsplit(value).path)
    if scheme and len(scheme) > 1:  # "C:" on Windows is a drive, not a scheme
        raise ConfigError(f"RECSKETCH_DATA_DIR={value!r}: scheme {scheme!r} is not supported "
                          f"(a path, file://, or one of {', '.join(s + '://' for s in OBJECT_STORE_SCHEMES)})")
    return Path(value)


class ObjectLocation:
    """One key in an object store (``protocol://bucket/key``): the path operations the stages use."""

    def __init__(self, fs: Any, path: str, protocol: str) -> None:
        self.fs = fs
        self.path = path.strip("/")
        self.protocol = protocol

    def __truediv__(self, name: str | Path) -> ObjectLocation:
        return ObjectLocation(self.fs, posixpath.join(self.path, str(name)), self.protocol)

    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"

    def __repr__(self) -> str:
        return f"ObjectLocation({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectLocation) and (self.protocol, self.path) == (other.protocol, other.path)

    def __hash__(self) -> int:
        return hash((self.protocol, self.path))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> ObjectLocation:
        return ObjectLocation(self.fs, posixpath.dirname(self.path), self.protocol)

    def read_bytes(self) -> bytes:
        try:
            return bytes(self.fs.cat_file(self.path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self} does not exist") from None

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def exists(self) -> bool:
        """One HEAD request of the key (s3fs's ``info`` would list the prefix on a miss)."""
        try:
            if hasattr(self.fs, "call_s3"):
                bucket, _, key = self.path.partition("/")
                self.fs.call_s3("head_object", Bucket=bucket, Key=key)
            else:
                self.fs.info(self.path, refresh=True)
        except FileNotFoundError:
            return False
        return True

    is_file = exists

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: a key's prefix exists once an object is under it."""

    def write_bytes(self, data: bytes) -> None:
        """One PUT: readers see the previous object or this one whole, never part of it."""
        self.fs.pipe_file(self.path, data)

    def create(self, data: bytes) -> bool:
        """Write-once: PUT with ``If-None-Match: *``; False (nothing written) if the key exists."""
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise


def _precondition_failed(exc: BaseException) -> bool:
    """s3fs turns HTTP 412 into OSError(EINVAL); the botocore error it wraps says which."""
    cause = exc.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code in ("PreconditionFailed", "412") or "pre-condition" in str(exc).lower()


Location = Union[Path, ObjectLocation]  # noqa: UP007 (a runtime alias, used in isinstance-free annotations)


@functools.lru_cache(maxsize=8)
def _filesystem(protocol: str, conn_id: str | None) -> Any:
    """One filesystem per (protocol, connection) and process, with no listings cache."""
    if conn_id:  # inside Airflow: the connection holds the credentials and endpoint
        from airflow.sdk import ObjectStoragePath

        return ObjectStoragePath(f"{protocol}://recsketch-probe", conn_id=conn_id).fs
    import fsspec

    try:
        return fsspec.filesystem(protocol, use_listings_cache=False, skip_instance_cache=True)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"RECSKETCH_DATA_DIR is a {protocol}:// URL but its filesystem is not available "
                          f"({exc}): install s3fs (pip install 'recsketch[s3]')") from None


def location(data_dir: Path | str, conn_id: str | None = None) -> Location:
    """The data dir as a Location: a Path for local folders, an ObjectLocation for object stores."""
    if isinstance(data_dir, Path):
        return data_dir
    if not is_object_store_url(data_dir):
        return local_path_of(data_dir)
    parts = urlsplit(data_dir)
    if not parts.netloc:
        raise ConfigError(f"RECSKETCH_DATA_DIR={data_dir!r} names no bucket")
    return ObjectLocation(_filesystem(parts.scheme, conn_id), f"{parts.netloc}{parts.path}", parts.scheme)


def read_many(paths: list[Location]) -> list[bytes | Exception]:
    """The bytes of each location (or the exception reading it raised), fetched concurrently
    from an object store (one batch of GETs), one by one from a local disk."""
    results: list[bytes | Exception] = []
    remote = [p for p in paths if isinstance(p, ObjectLocation)]
    fetched: dict[str, Any] = {}
    if remote:
        fetched = remote[0].fs.cat([p.path for p in remote], on_error="return")
        if len(remote) == 1 and not isinstance(fetched, dict):
            fetched = {remote[0].path: fetched}
    for path in paths:
        if isinstance(path, ObjectLocation):
            value = fetched.get(path.path, FileNotFoundError(str(path)))
            if isinstance(value, FileNotFoundError) or (isinstance(value, Exception)
                                                        and "not found" in str(value).lower()):
                results.append(FileNotFoundError(f"{path} does not exist"))
            elif isinstance(value, Exception):
                results.append(RecsketchError(f"{path}: {value}"))
            else:
                results.append(bytes(value))
        else:
            try:
                results.append(path.read_bytes())
            except OSError as exc:
                results.append(exc)
    return results
