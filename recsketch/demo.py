"""A small demo catalogue in rec-a-sketch format, built from real photos that ship offline.

Each photo from ``skimage.data`` becomes a group of models (the photo, a crop, a mirror
image, a colour-shifted copy), so every model has true visual neighbours to find. Likes come
from a taste model (users who like some groups, plus a few likes drawn by popularity), so a
recommender that sees what users like can beat chance on them; every group model passes the
5/5 threshold, a few sparse models do not, and one model has no thumbnail, as happens on
Sketchfab.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from recsketch.features.photos import load_photo
from recsketch.psv import read_models, write_psv

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "colorwheel", "logo", "camera", "coins", "moon", "page", "brick", "text",
          "clock", "cell", "motorcycle")
VARIANTS = ("photo", "crop", "mirror", "recolour")
GROUPS_FILE = "groups.json"


def variant(image: Image.Image, kind: str, rng: random.Random) -> Image.Image:
    width, height = image.size
    if kind == "crop":
        scale = rng.uniform(0.7, 0.85)
        w, h = int(width * scale), int(height * scale)
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        image = image.crop((x, y, x + w, y + h))
    elif kind == "mirror":
        image = ImageOps.mirror(image)
    elif kind == "recolour":
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.4, 0.7))
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    return ImageOps.fit(image, (200, 200), Image.Resampling.BICUBIC)


def build_demo_catalog(folder: Path, photos: tuple[str, ...] = PHOTOS, seed: int = 0,
                       start: datetime = datetime(2026, 11, 25, tzinfo=UTC)) -> dict[str, str]:
    """Write the catalogue into ``folder``; returns mid -> group (also saved as groups.json)."""
    rng = random.Random(seed)
    folder = Path(folder)
    thumbs = folder / "model_thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    models: list[tuple[str, str, str]] = []
    groups: dict[str, str] = {}
    day = 0
    for photo in photos:
        image = load_photo(photo)
        for kind in VARIANTS:
            mid = f"{rng.getrandbits(128):032x}"
            published = start + timedelta(days=day % 3, hours=rng.randint(0, 23))
            day += 1
            variant(image, kind, rng).save(thumbs / f"{mid}_thumb200.jpg", quality=90)
            models.append((f"{photo.replace('_', ' ').title()} ({kind})", mid, published.isoformat()))
            groups[mid] = photo
    users = [f"user{n:03d}" for n in range(60)]
    names = {mid: name for name, mid, _ in models}
    likes: list[tuple[str, str, str]] = [(names[mid], mid, uid) for mid, uid in taste_model_likes(groups, users, rng)]
    for n in range(3):  # sparse models: too few likes, removed by the 5/5 threshold
        mid = f"{rng.getrandbits(128):032x}"
        name = f"Rarely liked model {n + 1}"
        variant(load_photo(photos[n]), "crop", rng).save(thumbs / f"{mid}_thumb200.jpg")
        models.append((name, mid, start.isoformat()))
        likes += [(name, mid, uid) for uid in rng.sample(users, 2)]
    no_thumb = f"{rng.getrandbits(128):032x}"  # listed, liked, but without a thumbnail
    models.append(("Model without a thumbnail", no_thumb, start.isoformat()))
    likes += [("Model without a thumbnail", no_thumb, uid) for uid in rng.sample(users, 10)]
    likes.append(likes[0])  # a duplicate row, as in the real data: must be counted once
    write_psv(folder / "model_urls.psv", ("name", "mid", "published_at"), models)
    write_psv(folder / "model_likes_anon.psv", ("modelname", "mid", "uid"), likes)
    (folder / GROUPS_FILE).write_text(json.dumps(groups, indent=1))
    return groups


def taste_model_likes(groups: Mapping[str, str], users: Sequence[str], rng: random.Random, favourites: int = 2,
                      favourite_likes: int | None = None, noise_likes: int = 2) -> list[tuple[str, str]]:
    """(mid, uid) likes of users with tastes: each user has ``favourites`` favourite groups (dealt
    in turn, so every group has as many fans as the others, give or take one) and likes
    ``favourite_likes`` of their models (None: all), plus ``noise_likes`` other models drawn by
    popularity (a Zipf law over the models in a random order): the structure real likes have,
    which uniform random likes lack."""
    by_group: dict[str, list[str]] = {}
    for mid, group in groups.items():
        by_group.setdefault(group, []).append(mid)
    names = sorted(by_group)
    deck: list[str] = []
    mids = sorted(groups)
    ranked = rng.sample(mids, len(mids))
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(ranked))))
    likes: list[tuple[str, str]] = []
    for uid in users:
        chosen: list[str] = []
        while len(chosen) < min(favourites, len(names)):
            if not deck:
                deck = rng.sample(names, len(names))
            group = deck.pop()
            if group not in chosen:
                chosen.append(group)
        liked: set[str] = set()
        for group in chosen:
            members = by_group[group]
            liked.update(members if favourite_likes is None else rng.sample(members, min(favourite_likes,
                                                                                          len(members))))
        target = len(liked) + min(noise_likes, len(mids) - len(liked))
        while len(liked) < target:
            liked.add(rng.choices(ranked, cum_weights=cumulative)[0])
        likes += [(mid, uid) for mid in sorted(liked)]
    return likes


def build_catalog_from_psv(folder: Path, source: Path, n_models: int, seed: int = 0, days: int = 3,
                           start: datetime = datetime(2026, 11, 20, tzinfo=UTC)) -> dict[str, set[str]]:
    """A catalogue with the real ids and names of ``source`` (legacy ids and quoted names
    included) and generated likes, dates and solid-colour thumbnails; for crawler tests and
    benchmarks (``n_models=0``: every model that can be written). Returns mid -> its likers,
    the ground truth a crawl must reproduce."""
    rng = random.Random(seed)
    # a name holding the dialect's quote character (a backslash) cannot be written back
    rows = [r for r in read_models(source).rows if "\\" not in r.name]
    n_models = n_models or len(rows)
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


def build_daily_catalog(folder: Path, days: int, models_per_day: int, n_users: int, seed: int = 0,
                        start: datetime = datetime(2026, 1, 1, tzinfo=UTC), likes_per_model: int = 8,
                        ) -> dict[str, list[tuple[str, datetime]]]:
    """A catalogue whose life can be replayed day by day (docs/contracts.md §1, ``liked_at``): models
    published over ``days``, each liked by ``likes_per_model`` users over the days after it
    appears (most likes in the first days, some weeks later). Thumbnails are small solid
    squares. Returns mid -> [(uid, liked_at)], the server's truth at any clock."""
    rng = random.Random(seed)
    thumbs = folder / "model_thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    users = [f"fan{n:04d}" for n in range(n_users)]
    models, likes, truth = [], [], {}
    for day in range(days):
        for n in range(models_per_day):
            mid = f"{rng.getrandbits(128):032x}"
            published = start + timedelta(days=day, seconds=rng.randrange(1800, 86400 - 60))
            models.append((f"model {day}-{n}", mid, published.isoformat()))
            Image.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3))).save(
                thumbs / f"{mid}_thumb200.jpg", quality=80)
            liked = [(uid, published + timedelta(hours=rng.expovariate(1 / 72)))
                     for uid in rng.sample(users, likes_per_model)]
            truth[mid] = liked
            likes += [(f"model {day}-{n}", mid, uid, at.isoformat()) for uid, at in liked]
    write_psv(folder / "model_urls.psv", ("name", "mid", "published_at"), models)
    write_psv(folder / "model_likes_anon.psv", ("modelname", "mid", "uid", "liked_at"), likes)
    return truth


def describe_demo_catalog(folder: Path) -> str:
    """What the demo catalogue holds, and why the pipeline's counts differ from the listing's."""
    groups = json.loads((Path(folder) / GROUPS_FILE).read_text())
    listed = len(read_models(Path(folder) / "model_urls.psv").rows)
    thumbs = {p.name[:32] for p in (Path(folder) / "model_thumbs").glob("*_thumb200.jpg")}
    extras = listed - len(groups)
    without = listed - len(thumbs)
    return (f"demo catalogue: {listed} models at {folder}: {len(set(groups.values()))} photos x {len(VARIANTS)} "
            f"variants ({', '.join(VARIANTS)}) = {len(groups)} models whose true neighbours are their own photo's "
            f"variants, plus {extras} planted extras: {extras - without} rarely liked (the 5/5 like threshold drops "
            f"them) and {without} without a thumbnail (listed and liked, never embedded)")
