"""Atomic writes: every file or object recsketch keeps appears whole or not at all.

On a local disk a file is written to a temp name beside the target and renamed over it, so
a reader (or a rerun after a kill) sees the old file or the complete new one; a write that
fails removes its temp file. A write-once file (:func:`create_bytes`) is linked into place,
which fails if the name exists. On an object store (``recsketch.storage.ObjectLocation``)
there is no rename: a whole object is one PUT, and write-once is a PUT with
``If-None-Match: *``; either way no reader ever sees part of an object.
"""

from __future__ import annotations

import errno
import io
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from recsketch.errors import StorageFull
from recsketch.storage import Location

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


def sweep_stale_temps(folder: Path) -> int:
    """Remove temp files that a killed process of this host left in ``folder``; returns how many.

    A SIGKILL skips the cleanup in :func:`atomic_write`; the target itself is intact (old or
    absent), only the temp file is garbage. Temps of live processes and of other hosts (a
    shared volume) are left alone.
    """
    removed = 0
    for tmp in folder.glob(f".*.{_HOST}.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


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
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"disk full while writing {path}: the partial file was removed and nothing "
                              "else changed; free space on that disk and rerun") from exc
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
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"disk full while writing {path}: the partial file was removed and nothing "
                              "else changed; free space on that disk and rerun") from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


def save_npz(path: Location, *, fsync: bool = False, **arrays: np.ndarray) -> None:
    if isinstance(path, Path):  # streamed to the temp file: no second copy in memory
        with atomic_write(path, fsync=fsync) as handle:
            np.savez(handle, allow_pickle=False, **arrays)
        return
    write_bytes(path, npz_bytes(**arrays))


def load_npz(path: Location) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (FileNotFoundError if absent; a damaged one raises what numpy raises)."""
    source: Path | io.BytesIO = path if isinstance(path, Path) else io.BytesIO(path.read_bytes())
    with np.load(source, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


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
    import shutil
    import tempfile

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
    import tempfile

    with tempfile.TemporaryDirectory(prefix="recsketch-") as scratch:
        yield Path(scratch) / name


def put_file(source: Path, path: Location) -> None:
    """Publish a complete local file as ``path``: renamed into place locally, one multipart upload
    (visible only once complete) to an object store."""
    if isinstance(path, Path):
        os.replace(source, path)
        return
    import shutil

    with source.open("rb") as handle, path.fs.open(path.path, "wb", block_size=64 << 20) as target:
        shutil.copyfileobj(handle, target, 16 << 20)
