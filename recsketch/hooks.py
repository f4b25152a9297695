"""Airflow hooks for recsketch's two connections, and Settings built from them.

``sketchfab_default`` (HTTP: host = API base URL, password = API token, extra ``web_url``)
and ``recsketch_db`` (a database connection: the recommendations DB) are the Airflow way to
configure a deployment; ``recsketch_storage`` (an AWS connection: login, password and
``endpoint_url`` in extra) reaches an object-store data dir through ``ObjectStoragePath``.
Where a connection is not defined, the environment (``RECSKETCH_*``) stays in charge,
exactly as for ``recsketch run``. Only the DAG's tasks and the UI plugin
import this module: the library and the CLI never need Airflow.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from airflow.sdk import BaseHook
from sqlalchemy.engine import URL

from recsketch.config import Settings
from recsketch.errors import ConfigError
from recsketch.storage import is_object_store_url

log = logging.getLogger(__name__)

SKETCHFAB_CONN_ID = "sketchfab_default"
RECSKETCH_DB_CONN_ID = "recsketch_db"
STORAGE_CONN_ID = "recsketch_storage"  # the object store's connection (RECSKETCH_STORAGE_CONN_ID)

# Airflow connection types -> SQLAlchemy drivers
# the recommendations store writes PostgreSQL (COPY, the atomic swap) or SQLite, nothing else
_DRIVERS = {"postgres": "postgresql+psycopg2", "postgresql": "postgresql+psycopg2", "sqlite": "sqlite"}


class _OptionalConnectionHook(BaseHook):
    """A hook whose connection may be absent: the environment then stays in charge."""

    conn_name_attr = "conn_id"
    default_conn_name = ""

    def __init__(self, conn_id: str | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id or self.default_conn_name

    def connection(self) -> Any | None:
        """The connection, or None when it is not defined."""
        try:
            return self.get_connection(self.conn_id)
        except Exception as exc:  # AirflowNotFoundException moved between modules across Airflow 3 releases
            if type(exc).__name__ != "AirflowNotFoundException":
                raise
            return None


class SketchfabHook(_OptionalConnectionHook):
    """The Sketchfab API's base URL and token, from the ``sketchfab_default`` connection."""

    default_conn_name = SKETCHFAB_CONN_ID
    conn_type = "http"
    hook_name = "Sketchfab API"

    def settings_overrides(self) -> dict[str, Any]:
        """Fields for :class:`Settings`; empty when the connection is not defined."""
        conn = self.connection()
        if conn is None:
            return {}
        overrides: dict[str, Any] = {"sketchfab_token": conn.password or None}
        if conn.host:
            overrides["sketchfab_url"] = sketchfab_url_of(conn.host, conn.schema, conn.port)
        extra = conn.extra_dejson or {}
        if extra.get("web_url"):
            overrides["sketchfab_web_url"] = str(extra["web_url"]).rstrip("/")
        return overrides


def sketchfab_url_of(host: str, scheme: str | None, port: int | None) -> str:
    """``https://api.sketchfab.com`` from a connection's host (a full URL or a bare host name)."""
    if "://" in host:
        return host.rstrip("/")
    if scheme and scheme not in ("http", "https"):
        raise ConfigError(f"connection {SKETCHFAB_CONN_ID}: scheme {scheme!r} must be http or https")
    return f"{scheme or 'https'}://{host}{f':{port}' if port else ''}"


class RecsketchDbHook(_OptionalConnectionHook):
    """The recommendations DB's SQLAlchemy URL, from the ``recsketch_db`` connection."""

    default_conn_name = RECSKETCH_DB_CONN_ID
    conn_type = "postgres"
    hook_name = "recsketch recommendations DB"

    def sqlalchemy_url(self) -> str | None:
        """The URL (password included: never log it), or None when the connection is not defined."""
        conn = self.connection()
        if conn is None:
            return None
        extra = conn.extra_dejson or {}
        if extra.get("sqlalchemy_url"):
            return str(extra["sqlalchemy_url"])
        driver = _DRIVERS.get(conn.conn_type or "")
        if driver is None:
            raise ConfigError(f"connection {self.conn_id}: type {conn.conn_type!r} is not one of "
                              f"{', '.join(sorted(_DRIVERS))}")
        if driver == "sqlite":
            return f"sqlite:///{conn.host}"
        url = URL.create(driver, username=conn.login or None, password=conn.password or None,
                         host=conn.host or None, port=conn.port or None, database=conn.schema or None)
        return url.render_as_string(hide_password=False)


def airflow_settings(**overrides: Any) -> Settings:
    """Settings for a task or the plugin: environment, then Connections, then ``overrides``."""
    settings = Settings.from_env()
    sketchfab = SketchfabHook().settings_overrides()
    database_url = RecsketchDbHook().sqlalchemy_url()
    log.info("settings: Sketchfab API %s (%s), recommendations DB from %s", sketchfab.get("sketchfab_url",
             settings.sketchfab_url), "connection " + SKETCHFAB_CONN_ID if sketchfab else "environment",
             "connection " + RECSKETCH_DB_CONN_ID if database_url else "environment")
    storage_conn_id = os.environ.get("RECSKETCH_STORAGE_CONN_ID") or STORAGE_CONN_ID
    settings = settings.with_overrides(**sketchfab, database_url=database_url, storage_conn_id=storage_conn_id)
    if is_object_store_url(settings.data_dir):
        log.info("settings: artefacts in %s through ObjectStoragePath (connection %s)", settings.data_dir,
                 storage_conn_id)
    return settings.with_overrides(**overrides)
