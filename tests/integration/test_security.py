"""Security: SQL only through bound parameters, ids validated before paths, thumbnail URLs
limited to allowed public hosts, secrets never shown. (The gallery's Airflow login is tested
against a real api-server in test_airflow_live.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from recsketch.config import Settings
from recsketch.crawl import thumbnail_path
from recsketch.db import store
from recsketch.db.schema import likes, models
from recsketch.errors import BadInputError, InvalidModelId
from recsketch.features.chunks import ChunkStore
from recsketch.gallery import create_app
from recsketch.sketchfab.client import SketchfabClient
from recsketch.stages.common import run_dir

REPO = Path(__file__).parents[2]
A, B, C = "a" * 32, "b" * 32, "c" * 32
INJECTIONS = ["' OR '1'='1", "x'); DROP TABLE models; --", '"; DELETE FROM likes; --',
              "%' UNION SELECT mid, name FROM models --", "Robert'); DROP TABLE recommendations;--",
              "\\'; TRUNCATE runs; --", "<script>alert(1)</script>", "../../etc/passwd"]


def _seed(engine, run_id: str = "run-1") -> None:  # type: ignore[no-untyped-def]
    store.upsert_models(engine, [{"mid": m, "name": name} for m, name in ((A, INJECTIONS[1]), (B, INJECTIONS[6]),
                                                                          (C, INJECTIONS[0]))])
    store.replace_likes(engine, {A: INJECTIONS[:3], B: ["u1"]})
    store.load_recommendations(engine, run_id, "bb", 2, [(A, 1, B, 0.9), (A, 2, C, 0.5), (B, 1, A, 0.9),
                                                         (B, 2, C, 0.4), (C, 1, A, 0.5), (C, 2, B, 0.4)])


def test_injection_strings_are_stored_and_queried_as_data(db_url: str) -> None:
    engine = store.connect(db_url)
    run_id = "manual__x'); DROP TABLE runs; --"
    _seed(engine, run_id)
    with engine.connect() as conn:
        assert conn.execute(select(models.c.name).where(models.c.mid == A)).scalar() == INJECTIONS[1]
        assert sorted(conn.execute(select(likes.c.uid).where(likes.c.mid == A)).scalars()) == sorted(INJECTIONS[:3])
    assert store.live_run(engine)["run_id"] == run_id
    assert [r["name"] for r in store.similar(engine, C)] == [INJECTIONS[1], INJECTIONS[6]]
    for text_ in INJECTIONS:
        with pytest.raises(InvalidModelId, match="is not a Sketchfab model id"):
            store.similar(engine, text_)
        assert store.saved_crawl_position(engine, text_) is None
    with engine.connect() as conn:  # every table still there, nothing deleted
        assert conn.execute(select(func.count()).select_from(models)).scalar() == 3
        assert conn.execute(select(func.count()).select_from(likes)).scalar() == 4


def test_the_cli_refuses_injection_strings_with_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "RECSKETCH_DATA_DIR": str(tmp_path)}
    engine = store.connect(f"sqlite:///{tmp_path / 'recsketch.sqlite'}")
    _seed(engine)
    for text_ in INJECTIONS[:3]:
        done = subprocess.run([sys.executable, "-m", "recsketch.cli", "similar", text_, "--json"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "is not a Sketchfab model id" in done.stderr and done.stdout == ""
    assert len(store.similar(engine, A)) == 2


def test_gallery_endpoints_escape_and_refuse_injection(tmp_path: Path) -> None:
    engine = store.connect(f"sqlite:///{tmp_path / 'recsketch.sqlite'}")
    _seed(engine)
    settings = Settings(data_dir=tmp_path)
    client = TestClient(create_app(lambda: settings, authenticate=lambda: None))
    page = client.get("/", params={"q": A})
    assert page.status_code == 200
    assert "<script>alert(1)</script>" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    for text_ in INJECTIONS:
        answer = client.get("/", params={"q": text_})
        assert answer.status_code == 400 and "<script>alert" not in answer.text
        assert client.get(f"/api/similar/{text_}").status_code in (400, 404)
        assert client.get(f"/thumbs/{text_}.jpg").status_code in (400, 404)
    assert client.get("/api/similar/" + A, params={"top_k": "1; DROP TABLE models"}).status_code == 422
    assert len(store.similar(engine, A)) == 2


def test_gallery_never_shows_the_database_password(tmp_path: Path) -> None:
    from tools.local_airflow import free_port

    url = f"postgresql+psycopg2://recsketch:pw-s3cret@127.0.0.1:{free_port()}/recsketch"
    client = TestClient(create_app(lambda: Settings(data_dir=tmp_path, database_url=url),
                                   authenticate=lambda: None), raise_server_exceptions=False)
    for path in ("/", f"/?q={A}", f"/api/similar/{A}"):
        answer = client.get(path)
        assert answer.status_code == 500 and "cannot open the recommendations DB" in answer.text
        assert "pw-s3cret" not in answer.text and "***" in answer.text


def test_ids_are_validated_before_any_path_is_built(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    for bad in ("../../etc/passwd", "/etc/passwd", "a" * 31 + "/", "..", ""):
        with pytest.raises(InvalidModelId):
            thumbnail_path(settings, bad)
    chunks = ChunkStore(tmp_path, "key")
    for bad in ("../x", "/abs", "a/b", ""):
        with pytest.raises(BadInputError):
            chunks.path(bad)
    for hostile in ("../../../etc", "/etc/cron.d/x", "a/../../b"):
        folder = run_dir(settings, hostile)
        assert folder.resolve().is_relative_to((tmp_path / "runs").resolve())


class _Redirector(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_thumbnail_urls_are_limited_to_allowed_public_hosts(serve, demo_catalog: Path) -> None:
    server = serve(demo_catalog)
    port = server.server_address[1]
    mid = next((demo_catalog / "model_thumbs").iterdir()).name.removesuffix("_thumb200.jpg")
    client = SketchfabClient(server.url, thumbnail_hosts=(f"http://localhost:{port}",))
    # the API's own host (configured by the operator) may be private; another host may not
    assert client.download(f"{server.url}/thumbs/{mid}_thumb200.jpg", 10**6)[0][:2] == b"\xff\xd8"
    with pytest.raises(BadInputError, match=r"'localhost' resolves to the non-public address 127\.0\.0\.1"):
        client.download(f"http://localhost:{port}/thumbs/{mid}_thumb200.jpg", 10**6)
    trusting = SketchfabClient(server.url, thumbnail_hosts=(f"http://localhost:{port}",), allow_private_addresses=True)
    with pytest.raises(BadInputError, match=r"host 'localhost' is not allowed as http://localhost:1"):
        trusting.download(f"http://localhost:1/thumbs/{mid}_thumb200.jpg", 10**6)  # another port: not allowed
    with pytest.raises(BadInputError, match=r"host '127\.0\.0\.1' is not allowed as http://127\.0\.0\.1:1"):
        client.download(f"http://127.0.0.1:1/thumbs/{mid}_thumb200.jpg", 10**6)  # the API's host, another port
    assert trusting.download(f"http://localhost:{port}/thumbs/{mid}_thumb200.jpg", 10**6)[0][:2] == b"\xff\xd8"
    for url, message in (("file:///etc/passwd", "only http"), ("ftp://localhost/x.jpg", "only http"),
                         ("http://169.254.169.254/latest/meta-data/", "is not allowed"),
                         ("http://[::1]/x.jpg", "is not allowed")):
        with pytest.raises(BadInputError, match=message):
            client.download(url, 10**6)
    redirector = HTTPServer(("127.0.0.1", 0), _Redirector)
    threading.Thread(target=redirector.serve_forever, daemon=True).start()
    try:
        api = f"http://127.0.0.1:{redirector.server_address[1]}"
        refused = re.escape("redirect to 'http://169.254.169.254/latest/meta-data/' refused")
        with pytest.raises(BadInputError, match=refused):
            SketchfabClient(api).download(f"{api}/thumbs/x.jpg", 10**6)
    finally:
        redirector.shutdown()
        redirector.server_close()


ALLOWED_DYNAMIC_SQL = {  # (file, fragment): why the dynamic part is safe
    ("recsketch/db/store.py", 'f"COPY {table}'): "table is one of our fixed names, never input",
    ("recsketch/db/store.py", '" LIMIT :k" if top_k else ""'): "a constant clause; k itself is bound",
}


def test_no_sql_is_built_from_strings_in_the_library() -> None:
    """Every statement with an f-string or concatenation is on the reviewed list above."""
    pattern = re.compile(r"(text|execute|copy_expert|exec_driver_sql)\(\s*(f\"|f'|[^)]*\s\+\s)")
    found = set()
    for path in sorted((REPO / "recsketch").rglob("*.py")):
        source = path.read_text()
        for match in pattern.finditer(source):
            found.add((str(path.relative_to(REPO)), source[match.start():match.start() + 250]))
    unreviewed = {(f, snippet[:100]) for f, snippet in found
                  if not any(f == af and frag in snippet for af, frag in ALLOWED_DYNAMIC_SQL)}
    assert unreviewed == set()
