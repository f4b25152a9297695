"""The recommendations gallery: a small FastAPI app that the Airflow UI plugin mounts.

For a model picked by its id or its Sketchfab URL it shows the thumbnail and the live run's
top-N similar models as a grid with names, scores and links, as the seed's notebook did.
Every route takes an ``authenticate`` dependency: inside Airflow that is Airflow's own
``get_user`` (JWT header or the UI's session cookie), so nobody reaches the pages, the JSON
or the thumbnails without logging in to Airflow. HTML is built with escaping only; the DB is
queried with bound parameters only; a model id is validated before it becomes a path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import cached_property
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, HTMLResponse, Response
from sqlalchemy import select
from sqlalchemy.engine import Engine

from recsketch.config import Settings
from recsketch.crawl import thumbnail_path
from recsketch.db import store
from recsketch.db.schema import models, runs
from recsketch.errors import InvalidModelId, RecsketchError, UnknownModel
from recsketch.ids import is_model_id, validate_model_id

MAX_TOP_K = 100
SKETCHFAB_HOSTS = ("sketchfab.com", "www.sketchfab.com")


def model_id_from_input(text: str) -> str:
    """A model id from what a user typed: the id itself or a Sketchfab model URL."""
    text = text.strip()
    if is_model_id(text):
        return text
    try:
        parts = urlsplit(text if "://" in text else "https://" + text)
        host = parts.hostname
    except ValueError:  # e.g. an unbalanced "[" reads as a broken IPv6 host
        host = None
    if host in SKETCHFAB_HOSTS:
        segments = [s for s in parts.path.split("/") if s]
        # /3d-models/<slug>-<mid>, /models/<mid>, /models/<mid>/embed
        for segment in reversed(segments):
            candidate = segment.rsplit("-", 1)[-1]
            if is_model_id(candidate):
                return candidate
    raise InvalidModelId(f"{text[:200]!r} is neither a Sketchfab model id nor a sketchfab.com model URL")


class Gallery:
    """Reads for the pages: the live run, one model, its recommendations."""

    def __init__(self, settings_factory: Callable[[], Settings]) -> None:
        self._settings_factory = settings_factory

    @cached_property
    def settings(self) -> Settings:
        return self._settings_factory()

    @cached_property
    def engine(self) -> Engine:
        return store.connect(self.settings.resolved_database_url, read_only=True)

    def model(self, mid: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(models.c.name, models.c.viewer_url)
                               .where(models.c.mid == mid)).mappings().first()
        return dict(row) if row else None

    def recent_runs(self, limit: int = 5) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(runs).order_by(runs.c.loaded_at.desc()).limit(limit)).mappings().all()
        return [dict(r) for r in rows]

    def sample_models(self, limit: int = 12) -> list[dict]:
        """Models of the live run, to start browsing from."""
        return store.models_with_recommendations(self.engine, limit)

    def similar(self, mid: str, top_k: int) -> list[dict]:
        return store.similar(self.engine, mid, top_k, links=True)


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #1a202c; }}
 form {{ margin-bottom: 1rem; }} input[name=q] {{ width: 32rem; padding: .4rem; }}
 .query {{ display: flex; gap: 1rem; align-items: center; margin-bottom: 1rem; }}
 .grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 1rem; }}
 figure {{ margin: 0; border: 1px solid #e2e8f0; border-radius: 6px; padding: .5rem; }}
 figure img {{ width: 200px; height: 200px; object-fit: cover; display: block; }}
 figcaption {{ font-size: .85rem; overflow-wrap: anywhere; }} .score {{ color: #4a5568; }}
 .error {{ color: #c53030; }} table {{ border-collapse: collapse; }} td, th {{ padding: .2rem .6rem; }}
</style></head><body>{body}</body></html>"""


def _thumb(mid: str, name: str, size: int = 200) -> str:
    return (f'<img src="thumbs/{quote(mid)}.jpg" alt="{escape(name)}" width="{size}" height="{size}" '
            f'loading="lazy" data-mid="{escape(mid)}">')


def _link(mid: str, label: str) -> str:
    return f'<a href="?q={quote(mid)}">{escape(label)}</a>'


def render_gallery(gallery: Gallery, q: str | None, top_k: int) -> tuple[int, str]:
    """The page for query ``q`` (status, HTML); without ``q``, the live run and models to try."""
    value = escape(q or "")
    form = (f'<h1>recsketch: more like this</h1><form method="get"><input name="q" value="{value}" '
            f'placeholder="model id or https://sketchfab.com/3d-models/..." aria-label="model id or URL"> '
            f'<input name="top_k" type="number" min="1" max="{MAX_TOP_K}" value="{top_k}" aria-label="top N"> '
            '<button type="submit">Show similar models</button></form>')
    live = store.live_run(gallery.engine)
    if live is None:
        return 200, _page("recsketch", form + '<p class="error">No recommendations are loaded yet: '
                          "run the recsketch DAGs first.</p>")
    run_line = (f'<p class="run">Live run <code>{escape(live["run_id"])}</code>: {escape(live["backbone"])}, '
                f'top-{live["top_k"]} for {live["n_models"]} models, loaded {escape(str(live["loaded_at"]))[:19]}'
                "</p>")
    if not q:
        picks = "".join(f"<figure>{_thumb(m['mid'], m['name'])}<figcaption>{_link(m['mid'], m['name'])}"
                        "</figcaption></figure>" for m in gallery.sample_models())
        history = "".join(f"<tr><td><code>{escape(r['run_id'])}</code></td><td>{escape(r['backbone'])}</td>"
                          f"<td>{r['n_models']}</td><td>{escape(str(r['loaded_at']))[:19]}</td></tr>"
                          for r in gallery.recent_runs())
        return 200, _page("recsketch", form + run_line + f'<h2>Pick a model</h2><div class="grid">{picks}</div>'
                          "<h2>Recent loads</h2><table><tr><th>run</th><th>backbone</th><th>models</th>"
                          f"<th>loaded</th></tr>{history}</table>")
    try:
        mid = model_id_from_input(q)
        results = gallery.similar(mid, top_k)
    except InvalidModelId as exc:
        return 400, _page("recsketch", form + f'<p class="error">{escape(str(exc))}</p>')
    except UnknownModel as exc:
        return 404, _page("recsketch", form + run_line + f'<p class="error">{escape(str(exc))}</p>')
    model = gallery.model(mid) or {"name": mid, "viewer_url": None}
    title = escape(model["name"])
    if model.get("viewer_url"):
        title = f'<a href="{escape(model["viewer_url"])}" target="_blank" rel="noopener">{title}</a>'
    query = (f'<div class="query">{_thumb(mid, model["name"])}<div><h2>{title}</h2>'
             f'<code>{escape(mid)}</code></div></div>')
    cells = []
    for r in results:
        sketchfab = (f' · <a href="{escape(r["viewer_url"])}" target="_blank" rel="noopener">Sketchfab</a>'
                     if r.get("viewer_url") else "")
        cells.append(f'<figure class="rec" data-rank="{r["rank"]}">{_thumb(r["mid"], r["name"] or r["mid"])}'
                     f'<figcaption>{r["rank"]}. {_link(r["mid"], r["name"] or r["mid"])}{sketchfab}<br>'
                     f'<span class="score">score {r["score"]:.3f}</span></figcaption></figure>')
    return 200, _page(f"recsketch: {model['name']}", form + run_line + query
                      + f'<h2>Top {len(results)} similar models</h2><div class="grid">{"".join(cells)}</div>')


def create_app(settings_factory: Callable[[], Settings], authenticate: Callable[..., Any]) -> FastAPI:
    """The gallery app; ``authenticate`` guards every route (Airflow's ``get_user`` in the plugin)."""
    gallery = Gallery(settings_factory)
    app = FastAPI(title="recsketch gallery", dependencies=[Depends(authenticate)], docs_url=None,
                  redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def page(q: str | None = Query(None, max_length=500),
                   top_k: int = Query(10, ge=1, le=MAX_TOP_K)) -> HTMLResponse:
        status, html = await asyncio.to_thread(render_gallery, gallery, q, top_k)
        return HTMLResponse(html, status_code=status)

    @app.get("/api/similar/{mid}")
    async def similar(mid: str, top_k: int = Query(10, ge=1, le=MAX_TOP_K)) -> list[dict]:
        """The same JSON as ``recsketch similar --json``, plus each model's Sketchfab link."""
        try:
            return await asyncio.to_thread(gallery.similar, validate_model_id(mid, source="path"), top_k)
        except InvalidModelId as exc:
            raise HTTPException(400, str(exc)) from None
        except UnknownModel as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/thumbs/{name}")
    async def thumbnail(name: str) -> Response:
        mid = name.removesuffix(".jpg")
        try:
            path = thumbnail_path(gallery.settings, validate_model_id(mid, source="thumbnail name"))
        except InvalidModelId as exc:
            raise HTTPException(400, str(exc)) from None
        headers = {"Cache-Control": "private, max-age=3600"}
        if isinstance(path, Path):
            if not path.is_file():
                raise HTTPException(404, f"no thumbnail stored for {mid}")
            return FileResponse(path, media_type="image/jpeg", headers=headers)
        try:  # an object store: one GET, off the event loop
            body = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise HTTPException(404, f"no thumbnail stored for {mid}") from None
        return Response(body, media_type="image/jpeg", headers=headers)

    @app.exception_handler(RecsketchError)
    async def recsketch_error(_request: Any, exc: RecsketchError) -> HTMLResponse:
        return HTMLResponse(_page("recsketch", f'<p class="error">{escape(str(exc))}</p>'), status_code=500)

    return app
