"""Issue 14: `recsketch import DIR` loads a rec-a-sketch folder into the catalogue without HTTP,
reporting bad rows the way the crawler reports bad input, and the pipeline runs on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select

from recsketch.cli import main
from recsketch.config import Settings
from recsketch.db import store
from recsketch.db.schema import likes, models
from recsketch.importer import import_folder
from recsketch.stages import similarity_stage
from recsketch.stages.common import run_dir
from recsketch.stages.extract import extract_stage, plan_stage
from recsketch.stages.load import load_stage
from recsketch.stages.threshold import threshold_stage


def damaged_copy(demo_catalog: Path, tmp_path: Path) -> tuple[Path, str, str]:
    folder = tmp_path / "catalog"
    shutil.copytree(demo_catalog, folder)
    with (folder / "model_urls.psv").open("a") as handle:
        handle.write("a broken row|not-a-model-id|2020-01-01T00:00:00\n")
        handle.write("too few fields\n")
    with (folder / "model_likes_anon.psv").open("a") as handle:
        handle.write(f"ghost|{'f' * 32}|someone\n")  # a like of a model the folder does not list
        handle.write("bad|also-not-an-id|someone\n")
    thumbs = sorted((folder / "model_thumbs").glob("*_thumb200.jpg"))
    corrupt = thumbs[0].name.removesuffix("_thumb200.jpg")
    thumbs[0].write_bytes(b"this is not a jpeg")
    missing = thumbs[1].name.removesuffix("_thumb200.jpg")
    thumbs[1].unlink()
    return folder, corrupt, missing


def test_import_reports_bad_input_and_the_pipeline_runs_on_it(demo_catalog: Path, demo_groups: dict[str, str],
                                                              tmp_path: Path, pg_url: str) -> None:
    folder, corrupt, missing = damaged_copy(demo_catalog, tmp_path)
    settings = Settings(data_dir=tmp_path / "data", database_url=pg_url)
    stats = import_folder(settings, folder, progress=lambda _: None)
    listed = sum(1 for _ in (demo_catalog / "model_urls.psv").open()) - 1
    assert stats.models == listed and stats.bad_rows == 3 and stats.likes_of_unknown_models == 1
    assert stats.thumbnails_failed == 1 and stats.thumbnails_missing >= 1
    problems = "\n".join(stats.problems)
    assert "model_urls.psv:" in problems and "not-a-model-id" in problems and "1 fields, expected 3" in problems
    assert "also-not-an-id" in problems
    assert f"thumbnail of {corrupt}" in problems
    engine = store.connect(pg_url)
    with engine.connect() as conn:
        statuses = dict(conn.execute(select(models.c.mid, models.c.thumbnail_status)).all())
        n_likes = conn.execute(select(func.count()).select_from(likes)).scalar_one()
    assert statuses[corrupt] == "failed" and statuses[missing] == "missing"
    assert n_likes == stats.likes > 0

    again = import_folder(settings, folder, progress=lambda _: None)  # a rerun changes nothing
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(likes)).scalar_one() == n_likes
    assert again.models == stats.models

    folder_run = run_dir(settings, "imported")
    threshold_stage(settings, folder_run)
    for task in plan_stage(settings, folder_run):
        extract_stage(settings, folder_run, task)
    similarity_stage(settings, folder_run)
    load_stage(settings, folder_run, "imported")
    served = [mid for mid in demo_groups if mid not in (corrupt, missing) and statuses.get(mid) == "ok"]
    right = [demo_groups[store.similar(engine, mid, 1)[0]["mid"]] == demo_groups[mid] for mid in served]
    assert len(served) > 60 and sum(right) >= 0.9 * len(served)


def test_the_import_command_prints_its_summary(demo_catalog: Path, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RECSKETCH_DATA_DIR", str(tmp_path / "data"))
    assert main(["import", str(demo_catalog)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["models"] > 70 and summary["bad_rows"] == 0 and summary["thumbnails_ok"] > 70
    assert main(["import", str(tmp_path / "nowhere")]) == 1
    assert "nowhere is not a folder" in capsys.readouterr().err


def _write_folder(folder: Path, models: int, likes: list[tuple[str, str]]) -> list[str]:
    from recsketch.psv import write_psv

    mids = [f"{i:032x}" for i in range(models)]
    (folder / "model_thumbs").mkdir(parents=True, exist_ok=True)
    write_psv(folder / "model_urls.psv", ("name", "mid"), [(f"model {i}", mid) for i, mid in enumerate(mids)])
    write_psv(folder / "model_likes_anon.psv", ("modelname", "mid", "uid"), [("m", mid, uid) for mid, uid in likes])
    return mids



@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_likes_are_counted_deduplicated_and_replaced_on_a_rerun(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "catalog"
    a, b, c = (f"{i:032x}" for i in range(3))
    likes_file = [(a, "u1"), (a, "u2"), (a, "u1"), (b, "u3"), ("f" * 32, "u9")]  # a duplicate, an unlisted model
    _write_folder(folder, 3, likes_file)
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url)
    stats = import_folder(settings, folder, progress=lambda _: None)
    assert (stats.models, stats.likes, stats.duplicates, stats.likes_of_unknown_models) == (3, 3, 1, 1)
    engine = store.connect(db_url)
    with engine.connect() as conn:
        counts = dict(conn.execute(select(models.c.mid, models.c.like_count)).all())
        complete = set(conn.execute(select(models.c.mid).where(models.c.likes_complete)).scalars())
    assert counts == {a: 2, b: 1, c: 0} and complete == {a, b, c}
    assert sorted(store.read_likes(engine)) == [(a, "u1"), (a, "u2"), (b, "u3")]
    _write_folder(folder, 3, [(a, "u2"), (c, "u4")])  # the dump changed: a lost u1, b lost its like
    import_folder(settings, folder, progress=lambda _: None)
    assert sorted(store.read_likes(engine)) == [(a, "u2"), (c, "u4")]
    with engine.connect() as conn:
        assert dict(conn.execute(select(models.c.mid, models.c.like_count)).all()) == {a: 1, b: 0, c: 1}


def test_importing_likes_holds_a_block_not_the_file(tmp_path: Path, pg_url: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """200 k likes streamed in blocks of 20 k: the traced peak stays far below what reading the
    whole file (a LikeRow per like and a set of pairs) allocates."""
    import tracemalloc

    from recsketch import importer
    from recsketch.psv import read_likes

    folder = tmp_path / "catalog"
    mids = _write_folder(folder, 2_000, [(f"{i % 2_000:032x}", f"user{i // 2_000}") for i in range(200_000)])
    settings = Settings(data_dir=tmp_path / "data", database_url=pg_url)
    store.connect(pg_url)
    monkeypatch.setattr(importer, "LIKES_BLOCK", 20_000)
    tracemalloc.start()
    try:
        stats = import_folder(settings, folder, progress=lambda _: None)
        streamed = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        read_likes(folder / "model_likes_anon.psv")
        whole = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats.likes == 200_000 and stats.models == len(mids)
    assert streamed < whole / 4, f"streamed import peak {streamed / 1e6:.1f} MB, whole file {whole / 1e6:.1f} MB"


def test_a_postgresql_url_as_users_type_it_imports_whole_and_a_failed_import_changes_nothing(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``postgresql://`` (SQLAlchemy 2.1 gives it psycopg 3, without copy_expert: it stored the
    models, then died before the likes) works; an import that fails half-way leaves the catalogue
    as it was; a liker the DB cannot hold costs its row (issue 37)."""
    from sqlalchemy.engine import make_url

    import recsketch.importer as importer

    typed = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    assert typed.startswith("postgresql://")
    folder = tmp_path / "catalog"
    a, b = (f"{i:032x}" for i in range(2))
    _write_folder(folder, 2, [(a, "u1"), (a, "x" * 65), (b, "u2"), (b, "bell\x07")])
    settings = Settings(data_dir=tmp_path / "data", database_url=typed)
    assert settings.resolved_database_url.startswith("postgresql+psycopg2://")
    stats = import_folder(settings, folder, progress=lambda _: None)
    assert (stats.models, stats.likes, stats.bad_rows) == (2, 2, 2)
    assert any("65 characters, over the 64" in p for p in stats.problems)
    assert any("control characters" in p for p in stats.problems)
    engine = store.connect(pg_url)
    before = sorted(store.read_likes(engine))
    assert before == [(a, "u1"), (b, "u2")]
    _write_folder(folder, 3, [(a, "u3"), (f"{2:032x}", "u4")])  # a third model, other likes

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the disk filled up")

    monkeypatch.setattr(importer, "_import_likes", broken)
    with pytest.raises(RuntimeError, match="disk filled"):
        import_folder(settings, folder, progress=lambda _: None)
    with engine.connect() as conn:  # the third model's upsert went back with the rest
        assert conn.execute(select(func.count()).select_from(models)).scalar_one() == 2
    assert sorted(store.read_likes(engine)) == before


def test_other_postgresql_drivers_are_refused_in_one_line() -> None:
    from recsketch.errors import ConfigError

    with pytest.raises(ConfigError, match=r"names the driver 'psycopg'.*use postgresql://"):
        Settings(database_url="postgresql+psycopg://u@127.0.0.1/x")
    assert Settings(database_url="postgres://u@127.0.0.1/x").database_url == "postgresql+psycopg2://u@127.0.0.1/x"
