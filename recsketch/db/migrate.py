"""Schema migrations (Alembic): where a database stands, and bringing it to the code's revision.

``recsketch db upgrade`` applies the revisions under ``recsketch/db/migrations/versions``;
stages check the revision before they write and refuse a database behind the code, naming
the command to run. An empty database is the one exception: a writing stage creates the
schema in it (that is creation, not migration). A database made before migrations existed
(tables, no revision) is taken as the first release; the later revisions skip what it
already has.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from recsketch.errors import SchemaBehind

MIGRATIONS = Path(__file__).with_name("migrations")
FIRST_RELEASE = "0001"
LOCK_ID = 727274  # pg_advisory_xact_lock: one migrator at a time


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.cache
def head() -> str:
    """The revision this code needs (read from the shipped revisions once per process)."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None  # the package ships its revisions
    return revision


def current(engine: Engine) -> str | None:
    """The database's revision: None when it has none (empty, or made before migrations)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _is_empty(conn: Connection) -> bool:
    return not inspect(conn).get_table_names()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Apply the migrations up to ``revision``; returns (before, after). Serialised on
    PostgreSQL by an advisory lock, on SQLite by its write lock; either way all of it commits
    or none (a killed migrator leaves the database as it was)."""
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": LOCK_ID})
                else:  # pysqlite runs DDL outside any transaction unless one is begun by hand: a
                    # migrator killed half-way would leave half a schema. IMMEDIATE also takes
                    # the write lock, so racing migrators wait for each other.
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                before = MigrationContext.configure(conn).get_current_revision()
                if before is None and not _is_empty(conn):
                    command.stamp(_config(conn), FIRST_RELEASE)  # made before migrations existed
                command.upgrade(_config(conn), revision)
                return before, MigrationContext.configure(conn).get_current_revision()
        except DBAPIError as exc:
            if "already exists" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def check(engine: Engine, *, initialise: bool) -> None:
    """Refuse a database behind the code. With ``initialise`` (writing stages), an empty one
    gets the whole schema; readers never run DDL."""
    revision, needed = current(engine), head()
    if revision == needed:
        return
    if revision is None:
        with engine.connect() as conn:
            empty = _is_empty(conn)
        if empty and initialise:
            upgrade(engine)
            return
        if empty:
            raise SchemaBehind(f"the recommendations DB at {engine.url!r} is empty: run the pipeline "
                               "(or `recsketch db upgrade`) first")
    raise SchemaBehind(f"the recommendations DB at {engine.url!r} is at schema revision "
                       f"{revision or 'none (made before migrations)'}, this code needs {needed}: "
                       "run `recsketch db upgrade`")
