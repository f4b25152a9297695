"""Atomic file writes: every file recsketch keeps appears whole or not at all.

Written to a temp name beside the target and renamed over it, so a reader (or a rerun after
a kill) sees the old file or the complete new one; a write that fails removes its temp file.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from recsketch.errors import StorageFull

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


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path) as handle:
        handle.write(data)


def save_npz(path: Path, *, fsync: bool = False, **arrays: np.ndarray) -> None:
    with atomic_write(path, fsync=fsync) as handle:
        np.savez(handle, allow_pickle=False, **arrays)


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as handle:
        np.save(handle, array)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


