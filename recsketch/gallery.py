"""The recommendations gallery: a small FastAPI app that the Airflow UI plugin mounts.

For a model picked by its id or its Sketchfab URL it shows the thumbnail and the live run's
top-N similar models as a grid with names, scores and links, as the seed's notebook did, by
the pictures (visual) or by pictures and likes together (hybrid). The front page shows each
recent run's offline metrics (``run_metrics``) and their trend as an inline SVG chart, drawn
on the server: no script, no chart library.
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
from typing import Any, Literal
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
from recsketch.ids import is_model_id, validate_model_id, viewer_url
from recsketch.storage import local_path

MAX_TOP_K = 100
METHODS = ("visual", "hybrid")
TREND = (("visual", "#2b6cb0"), ("hybrid", "#2f855a"), ("cf", "#b7791f"), ("popularity", "#718096"))
TREND_METRIC = "ndcg@10"
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

    def similar(self, mid: str, top_k: int, method: str = "visual") -> list[dict]:
        """The live run's list, each model's Sketchfab page a link we trust (``ids.viewer_url``)."""
        return [{**row, "viewer_url": viewer_url(row.get("viewer_url"), row["mid"])}
                for row in store.similar(self.engine, mid, top_k, links=True, method=method)]

    def metrics(self, limit: int = 30) -> list[dict]:
        return store.metrics_history(self.engine, limit)


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
 td.num {{ text-align: right; font-variant-numeric: tabular-nums; }} .live {{ font-weight: 600; }}
 svg.trend text {{ font-size: 11px; fill: #4a5568; }}
</style></head><body>{body}</body></html>"""


def _thumb(mid: str, name: str, size: int = 200) -> str:
    return (f'<img src="thumbs/{quote(mid)}.jpg" alt="{escape(name)}" width="{size}" height="{size}" '
            f'loading="lazy" data-mid="{escape(mid)}">')


IMAGE_TYPES = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF87a", "image/gif"),
               (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))


def image_type(head: bytes) -> str:
    """A stored thumbnail's real type from its first bytes (any format the crawl accepts is
    stored as it came); a type no browser should render is served as bytes."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in IMAGE_TYPES if head.startswith(magic)), "application/octet-stream")


def _link(mid: str, label: str, method: str = "visual") -> str:
    return f'<a href="?q={quote(mid)}&amp;method={quote(method)}">{escape(label)}</a>'


def metrics_table(history: list[dict]) -> str:
    """Each run's warm metrics at 10, the cold-start hybrid NDCG and the gate's comparison of its
    served lists (``recsketch.gate``: its NDCG@10 and the kept run's it was held to, the paired
    difference ± its standard error, and the held-out users), newest first."""
    columns = [(f"warm/{m}/{TREND_METRIC}", f"{m} NDCG@10") for m, _ in TREND]
    columns += [("warm/visual/coverage@10", "visual coverage@10"),
                ("cold_start/hybrid/ndcg@10", "cold-start hybrid NDCG@10")]
    gate = [("visual", "gate: served visual NDCG@10 / kept, difference ± s.e. (users)"),
            ("hybrid", "gate: served hybrid NDCG@10 / kept, difference ± s.e. (users)")]
    from recsketch.gate import comparison_cell

    head = "".join(f"<th>{escape(label)}</th>" for _, label in columns + gate)
    rows = []
    for run in reversed(history):
        cells = "".join(f'<td class="num">{run["metrics"][key]:.4f}</td>' if key in run["metrics"] else "<td>–</td>"
                        for key, _ in columns)
        cells += "".join(f'<td class="num">{escape(comparison_cell(run["metrics"], method))}</td>'
                         for method, _ in gate)
        live = ' class="live"' if run["is_live"] else ""
        rows.append(f'<tr{live} data-run="{escape(run["run_id"])}"><td><code>{escape(run["run_id"])}</code>'
                    f'{" (live)" if run["is_live"] else ""}</td>{cells}</tr>')
    return f'<table class="metrics"><tr><th>run</th>{head}</tr>{"".join(rows)}</table>'


def trend_chart(history: list[dict], width: int = 640, height: int = 220) -> str:
    """NDCG@10 of each method over the runs (oldest left), as an inline SVG line chart."""
    measured = [run for run in history if run["metrics"]]
    if not measured:
        return '<p class="trend-empty">No run has been measured yet.</p>'
    values = [run["metrics"].get(f"warm/{m}/{TREND_METRIC}") for run in measured for m, _ in TREND]
    top = max([v for v in values if v is not None] + [1e-9]) * 1.1
    left, right, bottom, pad = 48, 110, 24, 10
    plot_w, plot_h = width - left - right, height - bottom - pad

    def x(i: int) -> float:
        return left + (plot_w * i / (len(measured) - 1) if len(measured) > 1 else plot_w / 2)

    def y(v: float) -> float:
        return pad + plot_h * (1 - v / top)

    parts = [f'<line x1="{left}" y1="{pad}" x2="{left}" y2="{pad + plot_h}" stroke="#a0aec0"/>',
             f'<line x1="{left}" y1="{pad + plot_h}" x2="{left + plot_w}" y2="{pad + plot_h}" stroke="#a0aec0"/>',
             f'<text x="4" y="{pad + 8}">{top:.3f}</text><text x="4" y="{pad + plot_h}">0</text>',
             f'<text x="{left}" y="{height - 6}">{escape(measured[0]["run_id"][:28])}</text>']
    for slot, (method, colour) in enumerate(TREND):
        points = [(x(i), y(run["metrics"][f"warm/{method}/{TREND_METRIC}"])) for i, run in enumerate(measured)
                  if f"warm/{method}/{TREND_METRIC}" in run["metrics"]]
        if not points:
            continue
        line = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        parts.append(f'<polyline class="series" data-method="{method}" fill="none" stroke="{colour}" '
                     f'stroke-width="2" points="{line}"/>')
        parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>' for px, py in points]
        parts.append(f'<text x="{left + plot_w + 8}" y="{pad + 14 + 16 * slot}" fill="{colour}">{method}</text>')
    return (f'<svg class="trend" role="img" aria-label="NDCG@10 by method over the last {len(measured)} runs" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">{"".join(parts)}</svg>')


def render_gallery(gallery: Gallery, q: str | None, top_k: int, method: str = "visual") -> tuple[int, str]:
    """The page for query ``q`` (status, HTML); without ``q``, the live run, its metrics and models to try."""
    value = escape(q or "")
    choices = "".join(f'<option value="{m}"{" selected" if m == method else ""}>{m}</option>' for m in METHODS)
    form = (f'<h1>recsketch: more like this</h1><form method="get"><input name="q" value="{value}" '
            f'placeholder="model id or https://sketchfab.com/3d-models/..." aria-label="model id or URL"> '
            f'<input name="top_k" type="number" min="1" max="{MAX_TOP_K}" value="{top_k}" aria-label="top N"> '
            f'<select name="method" aria-label="method">{choices}</select> '
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
        measured = gallery.metrics()
        quality = ("<h2>Quality of recent runs</h2><p>Held-out likes ranked by each method "
                   "(<code>recsketch evaluate</code>); the load refuses a run whose visual NDCG@10 falls "
                   "below the gate's share of the live run's.</p>" + trend_chart(measured) + metrics_table(measured))
        return 200, _page("recsketch", form + run_line + f'<h2>Pick a model</h2><div class="grid">{picks}</div>'
                          + quality + "<h2>Recent loads</h2><table><tr><th>run</th><th>backbone</th><th>models</th>"
                          f"<th>loaded</th></tr>{history}</table>")
    try:
        mid = model_id_from_input(q)
        results = gallery.similar(mid, top_k, method)
    except InvalidModelId as exc:
        return 400, _page("recsketch", form + f'<p class="error">{escape(str(exc))}</p>')
    except UnknownModel as exc:
        return 404, _page("recsketch", form + run_line + f'<p class="error">{escape(str(exc))}</p>')
    model = gallery.model(mid) or {"name": mid, "viewer_url": None}
    title = escape(model["name"])
    title = f'<a href="{escape(viewer_url(model.get("viewer_url"), mid))}" target="_blank" rel="noopener">{title}</a>'
    query = (f'<div class="query">{_thumb(mid, model["name"])}<div><h2>{title}</h2>'
             f'<code>{escape(mid)}</code></div></div>')
    cells = []
    for r in results:
        sketchfab = (f' · <a href="{escape(viewer_url(r.get("viewer_url"), r["mid"]))}" target="_blank" '
                     'rel="noopener">Sketchfab</a>')
        cells.append(f'<figure class="rec" data-rank="{r["rank"]}">{_thumb(r["mid"], r["name"] or r["mid"])}'
                     f'<figcaption>{r["rank"]}. {_link(r["mid"], r["name"] or r["mid"], method)}{sketchfab}<br>'
                     f'<span class="score">score {r["score"]:.3f}</span></figcaption></figure>')
    return 200, _page(f"recsketch: {model['name']}", form + run_line + query
                      + f'<h2 data-method="{method}">Top {len(results)} similar models ({method})</h2>'
                      f'<div class="grid">{"".join(cells)}</div>')


def create_app(settings_factory: Callable[[], Settings], authenticate: Callable[..., Any]) -> FastAPI:
    """The gallery app; ``authenticate`` guards every route (Airflow's ``get_user`` in the plugin)."""
    gallery = Gallery(settings_factory)
    app = FastAPI(title="recsketch gallery", dependencies=[Depends(authenticate)], docs_url=None,
                  redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def page(q: str | None = Query(None, max_length=500), top_k: int = Query(10, ge=1, le=MAX_TOP_K),
                   method: Literal["visual", "hybrid"] = Query("visual")) -> HTMLResponse:
        status, html = await asyncio.to_thread(render_gallery, gallery, q, top_k, method)
        return HTMLResponse(html, status_code=status)

    @app.get("/api/similar/{mid}")
    async def similar(mid: str, top_k: int = Query(10, ge=1, le=MAX_TOP_K),
                      method: Literal["visual", "hybrid"] = Query("visual")) -> list[dict]:
        """The same JSON as ``recsketch similar --json``, plus each model's Sketchfab link."""
        try:
            return await asyncio.to_thread(gallery.similar, validate_model_id(mid, source="path"), top_k, method)
        except InvalidModelId as exc:
            raise HTTPException(400, str(exc)) from None
        except UnknownModel as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/api/metrics")
    async def metrics(limit: int = Query(30, ge=1, le=1000)) -> list[dict]:
        """Each recent run's metrics ({split}/{method}/{metric}: value), oldest first."""
        return await asyncio.to_thread(gallery.metrics, limit)

    @app.get("/thumbs/{name}")
    async def thumbnail(name: str) -> Response:
        mid = name.removesuffix(".jpg")
        try:
            path = thumbnail_path(gallery.settings, validate_model_id(mid, source="thumbnail name"))
        except InvalidModelId as exc:
            raise HTTPException(400, str(exc)) from None
        headers = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
        if (local := local_path(path)) is not None:
            if not local.is_file():
                raise HTTPException(404, f"no thumbnail stored for {mid}")
            with local.open("rb") as handle:
                head = handle.read(16)
            return FileResponse(local, media_type=image_type(head), headers=headers)
        try:  # an object store: one GET, off the event loop
            body = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise HTTPException(404, f"no thumbnail stored for {mid}") from None
        return Response(body, media_type=image_type(body[:16]), headers=headers)

    @app.exception_handler(RecsketchError)
    async def recsketch_error(_request: Any, exc: RecsketchError) -> HTMLResponse:
        return HTMLResponse(_page("recsketch", f'<p class="error">{escape(str(exc))}</p>'), status_code=500)

    return app
