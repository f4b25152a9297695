"""Airflow UI plugin: the recsketch recommendations gallery.

Mounts :mod:`recsketch.gallery` on the api-server at ``/recsketch`` and adds a nav entry
("Browse" → "Similar models") that shows it inside the UI. Every route requires an Airflow
login (``get_user``: the UI's session cookie or a bearer JWT). Settings come from the
``recsketch_db`` connection (or ``RECSKETCH_DATABASE_URL``) and ``RECSKETCH_DATA_DIR``.
"""

from __future__ import annotations

from typing import ClassVar

from airflow.api_fastapi.core_api.security import get_user
from airflow.plugins_manager import AirflowPlugin

from recsketch.gallery import create_app
from recsketch.hooks import airflow_settings

URL_PREFIX = "/recsketch"

gallery_app = create_app(airflow_settings, authenticate=get_user)


class RecsketchGalleryPlugin(AirflowPlugin):
    name = "recsketch_gallery"
    fastapi_apps: ClassVar[list[dict]] = [{"app": gallery_app, "url_prefix": URL_PREFIX, "name": "recsketch gallery"}]
    external_views: ClassVar[list[dict]] = [{
        "name": "Similar models",
        "href": URL_PREFIX.lstrip("/") + "/",  # relative: works behind a proxy's sub-path
        "destination": "nav",
        "category": "browse",
        "url_route": "recsketch-gallery",
    }]
