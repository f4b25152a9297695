"""Days replayed through the local server, each with every kind of change (new models, a replaced
thumbnail, a deletion, a model whose likes fall below the threshold): every day, what the
daily run serves (visual and hybrid, worked forward from the day before) equals what a fresh
full run over the same catalogue serves. ``RECSKETCH_REPLAY_DAYS`` (default 4; ``make faults``
runs 30) sets how many days."""

from __future__ import annotations

import functools
import io
import os
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from recsketch.config import Settings
from recsketch.contracts import run_folder_keys
from recsketch.db import store
from recsketch.db.schema import recommendations
from recsketch.sketchfab.server import Catalog, start_in_thread
from recsketch.stages import evaluate as evaluate_stage_module
from recsketch.stages import run_pipeline

DAYS = int(os.environ.get("RECSKETCH_REPLAY_DAYS", "4"))


def served_lists(settings: Settings) -> dict[tuple[str, str], list[tuple[str, float]]]:
    """(method, model) -> its served list of (similar model, score), of the live run."""
    engine = store.connect(settings.resolved_database_url)
    try:
        live = store.live_run(engine)
        assert live is not None
        with engine.connect() as conn:
            rows = conn.execute(select(recommendations).where(recommendations.c.run_id == live["run_id"])
                                .order_by(recommendations.c.method, recommendations.c.mid, recommendations.c.rank))
            lists: dict[tuple[str, str], list[tuple[str, float]]] = {}
            for row in rows:
                lists.setdefault((row.method, row.mid), []).append((row.similar_mid, float(row.score)))
        return lists
    finally:
        engine.dispose()


def assert_same_service(daily: dict, fresh: dict, day: int) -> None:
    assert daily.keys() == fresh.keys(), (day, sorted(set(daily) ^ set(fresh))[:5])
    for key, expected in fresh.items():
        got = daily[key]
        assert [s for _, s in got] == [pytest_approx(s) for _, s in expected], (day, key, got, expected)
        ties = {round(s, 5) for _, s in expected}
        if len(ties) == len(expected):  # no two equal scores: the same models in the same order
            assert [m for m, _ in got] == [m for m, _ in expected], (day, key, got, expected)
        else:
            assert {m for m, _ in got} <= {m for m, _ in expected} | {m for m, s in got
                                                                       if round(s, 5) == round(expected[-1][1], 5)}


def assert_compacted(settings: Settings, kept: list[str], deleted: str | None) -> None:
    """After the day's cleanup: no chunk in the manifest is COMPACT_SHARE unneeded or more, the
    deleted model's thumbnail file and index line are gone."""
    from recsketch.compaction import COMPACT_SHARE, needed_entries
    from recsketch.features.chunks import ChunkStore
    from recsketch.features.keys import backbone_key

    engine = store.connect(settings.resolved_database_url)
    try:
        needed = needed_entries(settings, engine, kept)
    finally:
        engine.dispose()
    manifest = ChunkStore(settings.features_dir, backbone_key(settings)).manifest()
    assert manifest
    for chunk_id, entries in manifest.items():
        assert sum(entry not in needed for entry in entries) < COMPACT_SHARE * len(entries), (chunk_id, entries)
    if deleted is not None:
        assert not (settings.thumbs_dir / f"{deleted}.jpg").exists()
        index = settings.thumbs_dir / "index.tsv"
        assert deleted not in {line.split("\t")[0] for line in index.read_text().splitlines()}


def _the(choices: object, *_: object, **__: object) -> object:
    return choices


def pytest_approx(value: float):  # type: ignore[no-untyped-def]
    import pytest

    return pytest.approx(value, abs=1e-5)


def test_every_replayed_day_serves_what_a_fresh_full_run_serves(demo_catalog: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "catalog"
    shutil.copytree(demo_catalog, folder)
    catalog = Catalog(folder)
    rng = random.Random(23)
    pool = sorted(m.mid for m in catalog.models if m.thumbnail is not None and len(m.likers) >= 5)
    rng.shuffle(pool)
    held_back = [catalog.by_mid[mid] for mid in pool[: 2 * DAYS]]  # published one day after another
    for model in held_back:
        catalog.remove(model.mid)
    server = start_in_thread(catalog)
    modes = []
    try:
        # ALS refitted every day, as a fresh full run fits it (a fit kept across days: test_incremental_hybrid)
        base = dict(sketchfab_url=server.url, runtime="torch", top_k=3, http_retries=1, gate_min_ratio=0.0,
                    als_refit_drift=0.0)
        daily = Settings(data_dir=tmp_path / "data", keep_runs=2, **base)  # runs collected, chunks compacted
        for day in range(1, DAYS + 1):
            if day > 1:
                for model in held_back[2 * (day - 2): 2 * (day - 1)]:
                    catalog.publish(model)  # new models
                listed = sorted(m.mid for m in catalog.models if m.thumbnail is not None)
                changed, deleted, dropped = rng.sample(listed, 3)
                picture = io.BytesIO()
                Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3))).save(picture, "JPEG")
                catalog.replace_thumbnail(changed, picture.getvalue())  # a replaced thumbnail
                catalog.remove(deleted)  # deleted from Sketchfab
                catalog.keep_likers(dropped, 2)  # its likes withdrawn: below the threshold
            served = evaluate_stage_module.served_choices(daily)  # what the day's evaluate keeps unless beaten
            summary = run_pipeline(daily, f"day-{day}", progress=lambda _: None)
            modes.append((summary["similarity"]["mode"], summary["hybrid"]["mode"]))
            folder = daily.run_dir(f"day-{day}")  # retention finds each file of an incremental day by name
            assert {p.name for p in folder.iterdir()} <= {key.name for key in run_folder_keys(folder)}
            kept = sorted(p.name for p in (tmp_path / "data" / "runs").iterdir())
            assert kept == sorted(f"day-{d}" for d in range(max(1, day - daily.keep_runs + 1), day + 1)), kept
            assert_compacted(daily, kept, deleted if day > 1 else None)
            fresh = Settings(data_dir=tmp_path / f"fresh-{day}", database_url=f"sqlite:///{tmp_path}/fresh-{day}.db",
                             **base)
            with monkeypatch.context() as choices:  # a fresh data dir has no live run: the daily run's choices
                choices.setattr(evaluate_stage_module, "served_choices", functools.partial(_the, served))
                run_pipeline(fresh, "fresh", progress=lambda _: None)
            assert_same_service(served_lists(daily), served_lists(fresh), day)
    finally:
        server.shutdown()
        server.server_close()
    assert modes[0][0] == "full"
    for visual, hybrid in modes[1:]:
        assert visual.startswith("incremental (") and " new x " in visual, modes  # worked forward
        assert "1 changed" in visual and "gone" in visual, modes  # every kind of change included
        assert hybrid.startswith("bounded"), modes
