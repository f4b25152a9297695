"""Shared fixtures: the demo catalogue, the local Sketchfab server over real HTTP, and a
throwaway PostgreSQL database per test session."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Airflow reads its home when first imported: point it at a private folder for the tests.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="recsketch-airflow-"))
os.environ.setdefault("AIRFLOW_HOME", str(_AIRFLOW_HOME))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(Path(__file__).parents[1] / "dags"))
for _name in [n for n in os.environ if n.startswith("RECSKETCH_") and not n.startswith("RECSKETCH_TEST_")]:
    del os.environ[_name]  # the tests choose every setting themselves (RECSKETCH_TEST_* tune the tests)

from recsketch.config import Settings  # noqa: E402
from recsketch.demo import GROUPS_FILE, build_demo_catalog  # noqa: E402
from recsketch.sketchfab.server import Catalog, Faults, SketchfabServer, start_in_thread  # noqa: E402

PG_ADMIN_URL = os.environ.get("RECSKETCH_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("catalog")
    build_demo_catalog(folder)
    return folder


@pytest.fixture(scope="session")
def demo_groups(demo_catalog: Path) -> dict[str, str]:
    import json

    return json.loads((demo_catalog / GROUPS_FILE).read_text())


@pytest.fixture
def sketchfab(demo_catalog: Path) -> Iterator[SketchfabServer]:
    server = start_in_thread(demo_catalog)
    yield server
    server.shutdown()
    server.server_close()


def _serving() -> Iterator:  # type: ignore[type-arg]
    """A ``start(folder, faults)`` that starts servers; all are stopped when the generator ends."""
    servers: list[SketchfabServer] = []

    def start(folder: Path | Catalog, faults: Faults | None = None, **options: object) -> SketchfabServer:
        server = start_in_thread(folder, faults=faults or Faults(), **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def serve():  # type: ignore[no-untyped-def]
    """Start servers with chosen folders and faults; all are stopped after the test."""
    yield from _serving()


@pytest.fixture(scope="module")
def module_serve():  # type: ignore[no-untyped-def]
    """``serve`` for module-scoped fixtures."""
    yield from _serving()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database created for this test session and dropped after it."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"recsketch_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - environment problem, reported clearly
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not usable: {exc}")
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """The session database, emptied before each test that uses it."""
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_database)
    with engine.begin() as conn:  # every table, view and the schema revision
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    yield pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'recsketch.sqlite'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def settings_for(tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(server: SketchfabServer | None = None, **overrides: object) -> Settings:
        base = Settings(data_dir=tmp_path / "data", sketchfab_url=server.url if server else "http://127.0.0.1:9")
        return base.with_overrides(**overrides)

    return make


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator:  # type: ignore[type-arg]
    """A real S3-compatible store for the session: SeaweedFS on 127.0.0.1 (started here, or the one
    `.ci/run` started, named by RECSKETCH_TEST_S3_ENDPOINT), its AWS_* variables in the environment."""
    from tools.object_store import ACCESS_KEY, BUCKET, SECRET_KEY, ObjectStore

    endpoint = os.environ.get("RECSKETCH_TEST_S3_ENDPOINT")
    store = ObjectStore(tmp_path_factory.mktemp("seaweedfs"))
    if endpoint:
        store.endpoint = endpoint
        if not store.ready():
            pytest.fail(f"RECSKETCH_TEST_S3_ENDPOINT={endpoint} does not serve bucket {BUCKET} "
                        f"with key {ACCESS_KEY}/{SECRET_KEY}")
    else:
        store.start()
    saved = {name: os.environ.get(name) for name in store.env}
    os.environ.update(store.env)
    yield store
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if not endpoint:
        store.stop()


@pytest.fixture
def s3_data_dir(object_store, request: pytest.FixtureRequest) -> str:  # type: ignore[no-untyped-def]
    """A fresh ``s3://`` data dir (a prefix of its own) in the session's object store."""
    return object_store.url(f"tests/{request.node.name[:60]}-{uuid.uuid4().hex[:8]}")
