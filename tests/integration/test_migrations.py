"""Schema migrations: a database made by the first release upgrades to head with every row,
a database behind the code is refused by the stages, readers run no DDL, and the migrations
build exactly the schema the code uses."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from recsketch.db import migrate, store
from recsketch.db.schema import metadata
from recsketch.errors import SchemaBehind

REPO = Path(__file__).parents[2]
A, B, C = "a" * 32, "b" * 32, "c" * 32


def first_release_schema() -> types.ModuleType:
    """recsketch/db/schema.py as first committed, from git history."""
    try:
        first = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "recsketch/db/schema.py"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.split()[-1]
        source = subprocess.run(["git", "show", f"{first}:recsketch/db/schema.py"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError, IndexError):
        pytest.skip("no git history here to take the first release's schema from")
    module = types.ModuleType("schema_as_first_released")
    exec(compile(source, "schema_as_first_released.py", "exec"), module.__dict__)
    return module


def test_a_database_of_the_first_release_upgrades_with_every_row(db_url: str) -> None:
    engine = store.engine_for(db_url)
    first_release_schema().create_schema(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO models (mid, name, like_count, thumbnail_status, likes_complete) "
                          "VALUES (:mid, :name, 5, 'ok', true)"),
                     [{"mid": mid, "name": f"model {mid[0]}"} for mid in (A, B, C)])
        conn.execute(text("INSERT INTO likes (mid, uid) VALUES (:mid, :uid)"),
                     [{"mid": mid, "uid": f"u{n}"} for mid in (A, B, C) for n in range(5)])
        conn.execute(text("INSERT INTO runs (run_id, backbone, top_k, n_models, loaded_at, is_live) "
                          "VALUES ('old-run', 'vgg16', 2, 3, CURRENT_TIMESTAMP, true)"))
        conn.execute(text("INSERT INTO recommendations (run_id, mid, rank, similar_mid, score, backbone) "
                          "VALUES ('old-run', :mid, :rank, :other, 0.5, 'vgg16')"),
                     [{"mid": m, "rank": r + 1, "other": o} for m in (A, B, C)
                      for r, o in enumerate(x for x in (A, B, C) if x != m)])
    with pytest.raises(SchemaBehind, match=r"made before migrations.*needs 0005: run `recsketch db upgrade`"):
        store.connect(db_url)  # a stage refuses it, and says what to run
    assert migrate.upgrade(engine) == (None, migrate.head())
    upgraded = store.connect(db_url)
    with upgraded.connect() as conn:
        counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in
                  ("models", "likes", "runs", "recommendations")}
        assert conn.execute(text("SELECT count(*) FROM models WHERE likes_fetched_at IS NULL")).scalar() == 3
    assert counts == {"models": 3, "likes": 15, "runs": 1, "recommendations": 6}
    assert [r["mid"] for r in store.similar(upgraded, A)] == [B, C]  # the view serves the old run
    assert store.read_likes(upgraded) and store.models_with_thumbnails(upgraded) == dict.fromkeys((A, B, C))


def test_a_stage_refuses_a_database_behind_the_code(db_url: str) -> None:
    engine = store.engine_for(db_url)
    migrate.upgrade(engine, "0002")
    with pytest.raises(SchemaBehind, match=r"at schema revision 0002, this code needs 0005"):
        store.connect(db_url)
    with pytest.raises(SchemaBehind):
        store.connect(db_url, read_only=True)
    assert migrate.current(engine) == "0002"  # nothing was changed by the refusals


def test_readers_run_no_ddl(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    with pytest.raises(SchemaBehind, match="is empty: run the pipeline"):
        store.connect(url, read_only=True)
    assert inspect(store.engine_for(url)).get_table_names() == []
    store.connect(url)  # a writer creates the schema in an empty database
    assert migrate.current(store.engine_for(url)) == migrate.head()


def test_the_migrations_build_exactly_the_schema_the_code_uses(db_url: str) -> None:
    engine = store.engine_for(db_url)
    migrate.upgrade(engine)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    assert differences == []


def test_db_commands(tmp_path: Path) -> None:
    env = {**os.environ, "RECSKETCH_DATA_DIR": str(tmp_path)}

    def db(action: str) -> str:
        done = subprocess.run([sys.executable, "-m", "recsketch.cli", "db", action], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    head = migrate.head()
    assert db("current") == f"schema: none (this code needs {head})"
    assert db("upgrade") == f"schema: none -> {head} (head {head})"
    assert db("current") == f"schema: {head} (this code needs {head})"
