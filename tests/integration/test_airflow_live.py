"""A real local Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor on
PostgreSQL), as ``make airflow`` starts it: runs triggered through the REST API, a backfill
through the CLI, and the gallery plugin in headless Chromium behind Airflow's login."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import requests

from recsketch import storage
from recsketch.db import store
from recsketch.psv import read_models
from tests.fault_suite import Databases
from tools.local_airflow import LocalAirflow, connection_env, free_port

REPO = Path(__file__).parents[2]
ARTIFACTS = Path(os.environ.get("RECSKETCH_TEST_ARTIFACTS", REPO / "test-artifacts"))
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


class Deployment:
    """A local Airflow plus its own Sketchfab server, recommendations DB and data dir."""

    def __init__(self, airflow: LocalAirflow, server, db_url: str, data_dir: Path, token: str) -> None:  # type: ignore[no-untyped-def]
        self.airflow, self.server, self.db_url, self.data_dir, self.token = airflow, server, db_url, data_dir, token

    def unpause(self, *dag_ids: str) -> None:
        for dag_id in dag_ids:
            self.airflow.wait_for_dag(dag_id)
            self.airflow.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def crawl_summary(self, run_id: str) -> dict:
        entry = self.airflow.api("GET", f"/dags/recsketch/dagRuns/{run_id}/taskInstances/crawl/xcomEntries/"
                                 "return_value")
        return entry["value"] if isinstance(entry["value"], dict) else json.loads(entry["value"])

    def wait_until_live(self, n_models: int, timeout_s: float = 600) -> dict:
        """Until the recommendations DAG has loaded ``n_models`` and has nothing left running."""
        engine = store.connect(self.db_url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            runs = self.airflow.dag_runs("recsketch_recommendations")
            failed = [r["dag_run_id"] for r in runs if r["state"] == "failed"]
            assert not failed, f"recommendation runs failed: {failed}"
            live = store.live_run(engine)
            if live and live["n_models"] == n_models and runs and all(r["state"] == "success" for r in runs):
                return live
            time.sleep(2)
        raise TimeoutError(f"no live run with {n_models} models within {timeout_s}s")


def _deployment(tmp: Path, catalog: Path, serve) -> Iterator[Deployment]:  # type: ignore[no-untyped-def]
    """Start everything; on the way out stop Airflow and drop both databases."""
    dbs = Databases()
    _, metadata_url = dbs.create()
    _, db_url = dbs.create()
    server = serve(catalog)
    token = "sf-" + secrets.token_hex(12)
    data_dir = tmp / "data"
    env = {**connection_env(server.url, token, db_url), "RECSKETCH_DATA_DIR": str(data_dir),
           "RECSKETCH_SIMILARITY_SHARD_ROWS": "40"}
    airflow = LocalAirflow(tmp / "airflow", port=free_port(), metadata_url=metadata_url, env=env)
    try:
        airflow.start()
        yield Deployment(airflow, server, db_url, data_dir, token)
    finally:
        airflow.stop()
        dbs.drop_all()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, demo_catalog: Path, module_serve) -> Iterator[Deployment]:  # type: ignore[no-untyped-def]
    yield from _deployment(tmp_path_factory.mktemp("live"), demo_catalog, module_serve)


@pytest.fixture(scope="module")
def triggered(deployment: Deployment, demo_groups: dict[str, str]) -> dict:
    """A manual crawl triggered through the REST API, and the asset-driven run that follows it."""
    airflow = deployment.airflow
    deployment.unpause("recsketch", "recsketch_recommendations")
    run = airflow.api("POST", "/dags/recsketch/dagRuns", json={"logical_date": None, "conf": {}})
    deadline = time.monotonic() + 300
    while airflow.api("GET", f"/dags/recsketch/dagRuns/{run['dag_run_id']}")["state"] != "success":
        assert time.monotonic() < deadline, "the triggered crawl did not finish"
        assert airflow.api("GET", f"/dags/recsketch/dagRuns/{run['dag_run_id']}")["state"] != "failed"
        time.sleep(2)
    live = deployment.wait_until_live(len(demo_groups))
    return {"crawl_run": run["dag_run_id"], "live": live}


def test_a_run_triggered_through_the_rest_api_loads_recommendations(deployment: Deployment, triggered: dict,
                                                                     demo_groups: dict[str, str]) -> None:
    airflow = deployment.airflow
    summary = deployment.crawl_summary(triggered["crawl_run"])
    assert summary["models"] == 76  # the whole catalogue was listed
    # each thumbnail was fetched once, by whichever crawl came first (unpausing starts a daily run too)
    thumbs = {k: v for k, v in deployment.server.fetches.items() if k.startswith("thumb ")}
    assert len(thumbs) == 75 and set(thumbs.values()) == {1}
    # the recommendations run was started by the catalogue Asset, not by a clock or a person
    recs_runs = airflow.dag_runs("recsketch_recommendations")
    assert recs_runs and {r["run_type"] for r in recs_runs} == {"asset_triggered"}
    assert triggered["live"]["run_id"] in {r["dag_run_id"] for r in recs_runs}
    engine = store.connect(deployment.db_url)
    top1 = [demo_groups[store.similar(engine, mid, 1)[0]["mid"]] == group for mid, group in demo_groups.items()]
    assert all(top1)
    # mapped tasks carry readable names; task logs show progress and the final summary
    run_id = triggered["live"]["run_id"]
    extract = airflow.api("GET", f"/dags/recsketch_recommendations/dagRuns/{run_id}/taskInstances",
                          params={"task_id": "extract"})["task_instances"]
    assert extract and all(t["rendered_map_index"].startswith("chunk ") for t in extract)
    log = airflow.api("GET", f"/dags/recsketch/dagRuns/{triggered['crawl_run']}/taskInstances/crawl/logs/1",
                      params={"full_content": True})
    text_log = json.dumps(log)
    assert "crawl done:" in text_log and "crawl summary:" in text_log


def test_the_token_reaches_the_api_but_no_log_or_xcom(deployment: Deployment, triggered: dict) -> None:
    arrivals = deployment.server.arrivals
    assert {auth for _, path, auth in arrivals if not path.startswith("/models/")} == {f"Token {deployment.token}"}
    assert {auth for _, path, auth in arrivals if path.startswith("/models/")} == {None}  # thumbnails: never
    files = [p for p in deployment.airflow.home.rglob("*") if p.is_file()]
    task_logs = [p for p in files if "crawl done:" in p.read_text(errors="replace")]
    assert task_logs, "the crawl's task log was not found: the search below would prove nothing"
    assert [str(p) for p in files if deployment.token in p.read_text(errors="replace")] == []
    xcom = json.dumps(deployment.crawl_summary(triggered["crawl_run"]))
    assert deployment.token not in xcom


def test_gallery_endpoints_require_an_airflow_login(deployment: Deployment, triggered: dict,
                                                    demo_groups: dict[str, str]) -> None:
    url, mid = deployment.airflow.url, next(iter(demo_groups))
    for path in ("/recsketch/", f"/recsketch/api/similar/{mid}", f"/recsketch/thumbs/{mid}.jpg"):
        assert requests.get(url + path, timeout=10).status_code == 401, path
        forged = requests.get(url + path, headers={"Authorization": "Bearer not-a-jwt"}, timeout=10)
        assert forged.status_code in (401, 403), path
    auth = {"Authorization": f"Bearer {deployment.airflow.token()}"}
    answer = requests.get(f"{url}/recsketch/api/similar/{mid}", params={"top_k": 3}, headers=auth, timeout=10)
    expected = store.similar(store.connect(deployment.db_url), mid, 3)
    assert [(r["mid"], r["score"]) for r in answer.json()] == [(r["mid"], r["score"]) for r in expected]
    by_url = requests.get(f"{url}/recsketch/", params={"q": f"https://sketchfab.com/3d-models/some-model-{mid}"},
                          headers=auth, timeout=10)
    assert by_url.status_code == 200 and all(r["mid"] in by_url.text for r in expected)
    thumb = requests.get(f"{url}/recsketch/thumbs/{mid}.jpg", headers=auth, timeout=10)
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    for bad in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd.jpg", "x' OR '1'='1.jpg"):
        assert requests.get(f"{url}/recsketch/thumbs/{bad}", headers=auth, timeout=10).status_code in (400, 404)


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="Debian chromium + chromium-driver needed")
def test_gallery_in_chromium_after_logging_in(deployment: Deployment, triggered: dict,
                                              demo_groups: dict[str, str]) -> None:
    """Log in through Airflow's form, open Browse > Similar models, ask for one model."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1100", "--disable-background-networking"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    wait = WebDriverWait(driver, 60)
    airflow = deployment.airflow
    mid = next(m for m, g in demo_groups.items() if g == "chelsea")
    mates = {m for m, g in demo_groups.items() if g == "chelsea" and m != mid}
    try:
        driver.get(airflow.url + "/")
        wait.until(ec.presence_of_element_located((By.NAME, "username"))).send_keys("admin")
        driver.find_element(By.NAME, "password").send_keys(airflow.password)
        next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Sign in").click()
        wait.until(lambda d: "/auth/login" not in d.current_url)
        driver.get(airflow.url + "/plugin/recsketch-gallery")  # the nav entry's page
        wait.until(ec.frame_to_be_available_and_switch_to_it((By.CSS_SELECTOR, "iframe[src*='recsketch/']")))
        box = wait.until(ec.presence_of_element_located((By.NAME, "q")))
        box.send_keys(mid)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "figure.rec")))
        wait.until(lambda d: d.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"))
        shown = driver.execute_script(
            "return [...document.querySelectorAll('figure.rec img')].map(i => [i.dataset.mid, i.naturalWidth])")
        query_mid = driver.find_element(By.CSS_SELECTOR, ".query img").get_attribute("data-mid")
        driver.switch_to.default_content()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "gallery.png"))
    finally:
        driver.quit()
    assert query_mid == mid
    assert len(shown) == 10 and all(width == 720 for _, width in shown)  # the 720×405 thumbnails really loaded
    assert {m for m, _ in shown[:3]} == mates  # its three variants come first
    assert (ARTIFACTS / "gallery.png").stat().st_size > 10_000


def test_maintenance_purges_airflows_old_history_and_task_logs_and_the_dags_still_run(
        deployment: Deployment, triggered: dict) -> None:
    """Issue 24 part 4: tools.airflow_maintenance (``make airflow-clean``, the stack's
    airflow-maintenance) against this live Airflow: history before the cut goes but each DAG's
    latest run, task logs older than the cut go, and a DAG triggered afterwards still runs."""
    from datetime import UTC, timedelta

    from sqlalchemy import create_engine, text

    from tools.airflow_maintenance import clean, log_folder

    airflow = deployment.airflow
    metadata = create_engine(airflow.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    crawl_runs = airflow.dag_runs("recsketch")
    assert len(crawl_runs) >= 2  # the manual crawl and the daily one unpausing started
    logs = log_folder(airflow.env)
    old_log, new_log = logs / "old-run" / "attempt=1.log", logs / "new-run" / "attempt=1.log"
    for path, age in ((old_log, timedelta(days=40)), (new_log, -timedelta(hours=1))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a task log\n")
        stamp = (datetime.now(UTC) - age).timestamp()
        os.utime(path, (stamp, stamp))
    time.sleep(30)  # the cut lies behind the runs so far, and behind the components' last heartbeats
    cut = datetime.now(UTC) - timedelta(seconds=15)

    with metadata.connect() as conn:
        before = {table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() for table in ("dag_run", "log")}
    result = clean(airflow.env, cut)
    with metadata.connect() as conn:
        per_dag = dict(conn.execute(text("SELECT dag_id, count(*) FROM dag_run GROUP BY dag_id")).all())
        old_audit = conn.execute(text("SELECT count(*) FROM log WHERE dttm < :cut"), {"cut": cut}).scalar()
        orphans = conn.execute(text("SELECT count(*) FROM task_instance t LEFT JOIN dag_run r "
                                    "ON r.dag_id = t.dag_id AND r.run_id = t.run_id WHERE r.id IS NULL")).scalar()
    metadata.dispose()
    assert before["dag_run"] > len(per_dag) and before["log"] > 0
    assert per_dag == {"recsketch": 1, "recsketch_recommendations": 1}  # each DAG's latest run stays
    assert old_audit == 0 and orphans == 0
    assert not old_log.exists() and new_log.exists() and result["log_files_removed"] >= 1

    run = airflow.api("POST", "/dags/recsketch/dagRuns", json={"logical_date": None, "conf": {}})
    deadline = time.monotonic() + 300
    while (state := airflow.api("GET", f"/dags/recsketch/dagRuns/{run['dag_run_id']}")["state"]) != "success":
        assert state != "failed" and time.monotonic() < deadline, state
        time.sleep(2)
    assert len(airflow.dag_runs("recsketch")) == 2


def test_backfill_over_three_days_processes_each_days_models_once(tmp_path: Path, demo_catalog: Path,
                                                                  demo_groups: dict[str, str], serve) -> None:
    models = read_models(demo_catalog / "model_urls.psv").rows
    per_day = Counter(m.published_at.date().isoformat() for m in models)
    days = sorted(per_day)
    assert len(days) == 3
    for deployment in _deployment(tmp_path, demo_catalog, serve):
        airflow = deployment.airflow
        deployment.unpause("recsketch", "recsketch_recommendations")
        airflow.airflow("backfill", "create", "--dag-id", "recsketch", "--from-date", days[0], "--to-date", days[-1])
        deadline = time.monotonic() + 600
        while True:
            backfill = [r for r in airflow.dag_runs("recsketch") if r["run_type"] == "backfill"]
            assert not [r for r in backfill if r["state"] == "failed"], backfill
            if len(backfill) == 3 and all(r["state"] == "success" for r in backfill):
                break
            assert time.monotonic() < deadline, backfill
            time.sleep(2)
        live = deployment.wait_until_live(len(demo_groups))

        # each run crawled exactly its own day
        for run in backfill:
            day = datetime.fromisoformat(run["data_interval_start"]).date().isoformat()
            assert deployment.crawl_summary(run["dag_run_id"])["models"] == per_day[day], day
        assert sorted(datetime.fromisoformat(r["data_interval_start"]).date().isoformat() for r in backfill) == days
        # every thumbnail and every likes page was fetched once, across all runs
        fetched = deployment.server.fetches
        assert sum(1 for key in fetched if key.startswith("thumb ")) == 75
        assert set(fetched.values()) == {1}, {k: v for k, v in fetched.items() if v > 1}
        # every model's features were extracted once, in exactly one chunk
        chunk_mids: list[str] = []
        for chunk in (deployment.data_dir / "features").rglob("chunk-*.npz"):
            with np.load(chunk) as data:
                chunk_mids += storage.texts(data["mids"])
        assert sorted(chunk_mids) == sorted(set(chunk_mids)) and set(demo_groups) <= set(chunk_mids)
        # the asset-driven recommendation runs never overlapped: events that came meanwhile waited
        recs_runs = sorted(airflow.dag_runs("recsketch_recommendations"), key=lambda r: r["start_date"])
        assert 1 <= len(recs_runs) <= 3
        for earlier, later in itertools.pairwise(recs_runs):
            assert earlier["end_date"] <= later["start_date"], (earlier, later)
        # and the asset-driven runs end with recommendations for all of them
        engine = store.connect(deployment.db_url)
        assert live["n_models"] == len(demo_groups)
        assert all(demo_groups[store.similar(engine, mid, 1)[0]["mid"]] == group
                   for mid, group in demo_groups.items())

