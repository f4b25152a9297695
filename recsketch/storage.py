"""Where artefacts live and how they are written: a local folder or an object store, one interface.

``RECSKETCH_DATA_DIR`` is a path (or ``file://`` URL), or an object-store URL such as
``s3://bucket/prefix``. A local data dir gives :class:`pathlib.Path` locations; an object
store gives :class:`ObjectLocation`, which offers the path operations the stages use (``/``,
``name``, ``read_bytes``, ``exists``). Every write goes through this module, which is the only
place that tells the two apart:

- every file or object appears whole or not at all: locally a temp file beside the target is
  renamed over it (a killed process leaves only a temp file, swept later); on an object store
  a whole object is one PUT (or one multipart upload, visible only once complete);
- write-once (:func:`create_bytes`): locally a hard link, which fails if the name exists; on
  an object store a PUT with ``If-None-Match: *``;
- nothing lists a prefix: object-store listings can be stale (s3fs caches them, and another
  host may have written since), so a stage that needs a set of objects reads a manifest of
  their exact keys (see ``ChunkStore``). :func:`local_path` says when a location is a local
  file, for the few readers that may list or stat a local disk.

Why our own small type rather than ``ObjectStoragePath`` / ``universal_pathlib`` for the
object store: their ``exists`` is an ``info`` call that lists the prefix on a miss, and
their writes have no create-if-absent; ours is one HEAD and one conditional PUT. The
filesystem itself does come from Airflow's ``ObjectStoragePath`` with the connection
``settings.storage_conn_id`` inside Airflow tasks, and from fsspec with the standard AWS
variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``) outside.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import posixpath
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Union
from urllib.parse import urlsplit

import numpy as np

from recsketch.errors import ConfigError, RecsketchError, StorageFull

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


def local_path(location: Location) -> Path | None:
    """The location as a local file or folder, or None on an object store: for the readers that
    may list or stat a local disk (a folder without a manifest, a file to stream as a response)."""
    return location if isinstance(location, Path) else None


_HOST = socket.gethostname().replace(".", "_")


def _temp_name(path: Path, pid: int) -> Path:
    """Beside the target, named by host and process, so a sweep knows whose it is."""
    return path.with_name(f".{path.name}.{_HOST}.{pid}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temps(folder: Location) -> int:
    """Remove temp files that a killed process of this host left in ``folder``; returns how many.

    A SIGKILL skips the cleanup in :func:`atomic_write`; the target itself is intact (old or
    absent), only the temp file is garbage. Temps of live processes and of other hosts (a
    shared volume) are left alone.
    """
    if not isinstance(folder, Path) or not folder.is_dir():
        return 0  # an object store has no temp objects: a killed PUT leaves nothing visible
    removed = 0
    for tmp in folder.glob(f".*.{_HOST}.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _raise_if_disk_full(exc: BaseException, path: Path) -> None:
    """A full disk (or quota) is said as such, naming the file; nothing partial is left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StorageFull(f"disk full while writing {path}: the partial file was removed and nothing "
                          "else changed; free space on that disk and rerun") from exc


@contextmanager
def atomic_write(path: Path, *, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces ``path`` when the block ends without error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, os.getpid())
    try:
        with tmp.open("wb") as handle:
            yield handle
            if fsync:  # survive a power loss too, not only a killed process
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(exc, path)
        raise


def write_bytes(path: Location, data: bytes, *, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` whole (rename locally, one PUT on an object store)."""
    if not isinstance(path, Path):
        path.write_bytes(data)
        return
    with atomic_write(path, fsync=fsync) as handle:
        handle.write(data)


def create_bytes(path: Location, data: bytes, *, fsync: bool = False) -> bool:
    """Write-once: store ``data`` at ``path`` unless something is there; True if this call wrote it.

    Locally the complete temp file is hard-linked to the name (``link`` fails if the name
    exists, atomically); on an object store it is a conditional PUT.
    """
    if not isinstance(path, Path):
        return path.create(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, os.getpid())
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        _raise_if_disk_full(exc, path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


def save_npz(path: Location, *, fsync: bool = False, **arrays: np.ndarray) -> None:
    save_arrays(path, arrays, fsync=fsync)


def save_arrays(path: Location, arrays: Mapping[str, np.ndarray], *, fsync: bool = False) -> None:
    """An ``.npz`` of ``arrays`` written atomically (:func:`save_npz` with the names in a mapping)."""
    if isinstance(path, Path):  # streamed to the temp file: no second copy in memory
        with atomic_write(path, fsync=fsync) as handle:
            np.savez(handle, allow_pickle=False, **arrays)
        return
    write_bytes(path, npz_bytes(**arrays))


def load_npz(path: Location, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, or those ``names`` (a local file reads only theirs);
    FileNotFoundError if absent, KeyError for a name it lacks; a damaged one raises what numpy raises."""
    source: Path | io.BytesIO = path if isinstance(path, Path) else io.BytesIO(path.read_bytes())
    with np.load(source, allow_pickle=False) as data:
        return {name: data[name] for name in (data.files if names is None else names)}


def text_array(values: list[str]) -> np.ndarray:
    """Strings as UTF-8 bytes (``S``): a 32-character id takes 32 bytes, not the 128 of numpy's
    ``<U32``. ``texts`` reads either kind back."""
    array = np.array(values, dtype=str)
    try:
        return array.astype(np.bytes_)  # ASCII (every Sketchfab uid): numpy encodes it at C speed
    except UnicodeEncodeError:
        return np.array([value.encode() for value in values], dtype=np.bytes_)


def texts(array: np.ndarray) -> list[str]:
    """The strings of ``text_array``'s bytes, or of a ``<U`` array an older release wrote."""
    if array.dtype.kind == "S":
        return [value.decode() for value in array.tolist()]
    return [str(value) for value in array.tolist()]


def save_npy(path: Location, array: np.ndarray) -> None:
    """Streamed to the file (locally: temp file, renamed) or to the object (a multipart upload that
    appears only once complete): never a second copy of a large array in memory."""
    if isinstance(path, Path):
        with atomic_write(path) as handle:
            np.save(handle, array, allow_pickle=False)
        return
    with path.fs.open(path.path, "wb", block_size=64 << 20) as handle:
        np.save(handle, array, allow_pickle=False)


def load_npy(path: Location) -> np.ndarray:
    if isinstance(path, Path):
        return np.load(path, allow_pickle=False)
    return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)


@contextmanager
def local_copy(path: Location) -> Iterator[Path]:
    """``path`` as a local file for the block: itself on a local disk, else a copy in local
    scratch (the task's own temp dir), streamed down and removed afterwards."""
    if isinstance(path, Path):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        yield path
        return

    with tempfile.TemporaryDirectory(prefix="recsketch-") as scratch:
        target = Path(scratch) / path.name
        try:
            with path.fs.open(path.path, "rb") as source, target.open("wb") as handle:
                shutil.copyfileobj(source, handle, 16 << 20)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist") from None
        yield target


def write_text(path: Location, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))





@contextmanager
def scratch_file(folder: Location, name: str) -> Iterator[Path]:
    """A local file to build something in before :func:`put_file` publishes it: beside the
    target folder locally (a temp name a sweep removes if the process is killed), else in the
    task's own temp dir. Removed when the block ends, unless it was published."""
    if isinstance(folder, Path):
        folder.mkdir(parents=True, exist_ok=True)
        path = _temp_name(folder / name, os.getpid())
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)
        return

    with tempfile.TemporaryDirectory(prefix="recsketch-") as scratch:
        yield Path(scratch) / name


def put_file(source: Path, path: Location) -> None:
    """Publish a complete local file as ``path``: renamed into place locally, one multipart upload
    (visible only once complete) to an object store."""
    if isinstance(path, Path):
        os.replace(source, path)
        return

    with source.open("rb") as handle, path.fs.open(path.path, "wb", block_size=64 << 20) as target:
        shutil.copyfileobj(handle, target, 16 << 20)
