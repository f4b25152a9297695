"""Settings from Airflow Connections, with the environment as the fallback."""

from __future__ import annotations

import json

import pytest
import yaml

from recsketch.errors import ConfigError
from recsketch.hooks import RecsketchDbHook, SketchfabHook, airflow_settings
from tests.integration.test_stack import COMPOSE


def test_without_connections_the_environment_decides(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_SKETCHFAB_DEFAULT", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_RECSKETCH_DB", raising=False)
    monkeypatch.setenv("RECSKETCH_SKETCHFAB_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("RECSKETCH_SKETCHFAB_TOKEN", "env-token")
    monkeypatch.setenv("RECSKETCH_DATABASE_URL", f"sqlite:///{tmp_path}/x.sqlite")
    settings = airflow_settings(top_k=3)
    assert (settings.sketchfab_url, settings.sketchfab_token, settings.top_k) == ("http://127.0.0.1:9", "env-token", 3)
    assert settings.database_url == f"sqlite:///{tmp_path}/x.sqlite"


def test_connections_win_over_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("RECSKETCH_SKETCHFAB_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("RECSKETCH_DATABASE_URL", "sqlite:///ignored.sqlite")
    monkeypatch.setenv("AIRFLOW_CONN_SKETCHFAB_DEFAULT", json.dumps(
        {"conn_type": "http", "host": "api.example.org", "schema": "https", "password": "conn-token",
         "extra": {"web_url": "https://www.example.org/"}}))
    monkeypatch.setenv("AIRFLOW_CONN_RECSKETCH_DB", "postgres://airflow:p%40ss@db.internal:5433/recsketch")
    settings = airflow_settings()
    assert settings.sketchfab_url == "https://api.example.org" and settings.sketchfab_token == "conn-token"
    assert settings.likes_base_url == "https://www.example.org"
    assert settings.database_url == "postgresql+psycopg2://airflow:p%40ss@db.internal:5433/recsketch"
    assert "conn-token" not in repr(settings)


def test_a_mysql_connection_is_refused_at_start(monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_RECSKETCH_DB", "mysql://u:p@db.internal:3306/recsketch")
    with pytest.raises(ConfigError, match="type 'mysql' is not one of postgres, postgresql, sqlite"):
        airflow_settings()
    monkeypatch.setenv("AIRFLOW_CONN_RECSKETCH_DB", json.dumps(
        {"conn_type": "postgres", "extra": {"sqlalchemy_url": "mysql+pymysql://u@db/recs"}}))
    with pytest.raises(ConfigError, match=r"recsketch_db connection.*only postgresql and sqlite"):
        airflow_settings()


def test_the_compose_files_connections_parse(monkeypatch) -> None:
    """The stack's AIRFLOW_CONN_* values, with its variables filled in, give the right settings."""
    env = yaml.safe_load(COMPOSE.read_text())["x-airflow-common"]["environment"]
    filled = {name: value.replace("${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}", "pw")
              .replace("${RECSKETCH_SKETCHFAB_URL:-https://api.sketchfab.com}", "https://api.sketchfab.com")
              .replace("${RECSKETCH_SKETCHFAB_TOKEN:-}", "tok")
              .replace("${RECSKETCH_S3_ACCESS_KEY:?set RECSKETCH_S3_ACCESS_KEY}", "key")
              .replace("${RECSKETCH_S3_SECRET_KEY:?set RECSKETCH_S3_SECRET_KEY}", "secret")
              .replace("${RECSKETCH_S3_ENDPOINT:-http://seaweedfs:8333}", "http://seaweedfs:8333")
              for name, value in env.items() if name.startswith("AIRFLOW_CONN_")}
    assert set(filled) == {"AIRFLOW_CONN_RECSKETCH_DB", "AIRFLOW_CONN_SKETCHFAB_DEFAULT",
                           "AIRFLOW_CONN_RECSKETCH_STORAGE"}
    for name, value in filled.items():
        monkeypatch.setenv(name, value)
    assert RecsketchDbHook().sqlalchemy_url() == "postgresql+psycopg2://airflow:pw@postgres:5432/recsketch"
    assert SketchfabHook().settings_overrides() == {"sketchfab_url": "https://api.sketchfab.com",
                                                    "sketchfab_token": "tok"}
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    storage = S3Hook(aws_conn_id="recsketch_storage").conn_config  # what ObjectStoragePath's s3 filesystem reads
    assert (storage.aws_access_key_id, storage.aws_secret_access_key) == ("key", "secret")
    assert storage.get_service_endpoint_url("s3") == "http://seaweedfs:8333"


def test_a_connection_of_the_wrong_kind_is_named(monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_RECSKETCH_DB", json.dumps({"conn_type": "mongo", "host": "x"}))
    with pytest.raises(ConfigError, match="recsketch_db: type 'mongo'"):
        RecsketchDbHook().sqlalchemy_url()
    monkeypatch.setenv("AIRFLOW_CONN_SKETCHFAB_DEFAULT", json.dumps({"conn_type": "http", "host": "h",
                                                                     "schema": "ftp"}))
    with pytest.raises(ConfigError, match="scheme 'ftp'"):
        SketchfabHook().settings_overrides()
