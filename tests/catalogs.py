"""Test catalogues in rec-a-sketch format built from the real model_urls.psv."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from PIL import Image

from recsketch.psv import read_models, write_psv

REAL_CATALOGUE = Path(__file__).parents[2] / "shared" / "data" / "model_urls.psv"


def build_real_catalog(folder: Path, n_models: int, seed: int = 0, days: int = 3,
                       start: datetime = datetime(2026, 11, 20, tzinfo=UTC)) -> dict[str, set[str]]:
    """Real ids and names (legacy ids and quoted names included); generated likes, dates and
    thumbnails. Returns mid -> its likers, the ground truth a crawl must reproduce."""
    rng = random.Random(seed)
    rows = read_models(REAL_CATALOGUE).rows
    legacy = [r for r in rows if len(r.mid) != 32][:5]
    quoted = [r for r in rows if "|" in r.name or "\n" in r.name][:5]
    rest = rng.sample([r for r in rows if r not in legacy + quoted], n_models - len(legacy) - len(quoted))
    chosen = legacy + quoted + rest
    thumbs = folder / "model_thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    users = [f"user{n:04d}" for n in range(max(50, n_models // 2))]
    likers: dict[str, set[str]] = {}
    for index, row in enumerate(chosen):
        if index % 17 != 5:  # a few models have no thumbnail, as on Sketchfab
            colour = tuple(rng.randrange(256) for _ in range(3))
            Image.new("RGB", (200, 200), colour).save(thumbs / f"{row.mid}_thumb200.jpg", quality=80)
        count = min(len(users), int(rng.paretovariate(1.2) * 2))  # a few popular models, many sparse
        likers[row.mid] = set(rng.sample(users, count))
    write_psv(folder / "model_urls.psv", ("name", "mid", "published_at"),
              [(r.name, r.mid, (start + timedelta(seconds=rng.randrange(days * 86400))).isoformat())
               for r in chosen])
    write_psv(folder / "model_likes_anon.psv", ("modelname", "mid", "uid"),
              [(r.name, r.mid, uid) for r in chosen for uid in sorted(likers[r.mid])])
    return likers
