"""Atomic file writes: every file recsketch keeps appears whole or not at all.

Written to a temp name beside the target and renamed over it, so a reader (or a rerun after
a kill) sees the old file or the complete new one; a write that fails removes its temp file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np


@contextmanager
def atomic_write(path: Path, *, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces ``path`` when the block ends without error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            yield handle
            if fsync:  # survive a power loss too, not only a killed process
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path) as handle:
        handle.write(data)


def save_npz(path: Path, *, fsync: bool = False, **arrays: np.ndarray) -> None:
    with atomic_write(path, fsync=fsync) as handle:
        np.savez(handle, **arrays)


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as handle:
        np.save(handle, array)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


