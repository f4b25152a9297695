"""The Airflow DAG: integrity (DagBag), thin parse, and a real end-to-end run with dag.test()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
DAG_FILE = REPO / "dags" / "recsketch_dags.py"


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Airflow's metadata DB (SQLite in the tests' private AIRFLOW_HOME)."""
    airflow = Path(sys.executable).with_name("airflow")
    done = subprocess.run([str(airflow), "db", "migrate"], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_dagbag_has_no_import_errors_and_the_expected_shape() -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    bag = DagBag(str(DAG_FILE.parent))
    assert bag.import_errors == {}
    assert set(bag.dags) == {"recsketch", "recsketch_recommendations"}
    crawl_dag, recs_dag = bag.dags["recsketch"], bag.dags["recsketch_recommendations"]
    assert {t.task_id for t in crawl_dag.tasks} == {"crawl", "publish_catalogue"}
    assert {t.task_id for t in recs_dag.tasks} == {"threshold", "plan_chunks", "extract", "plan_similarity",
                                                  "similarity_shard", "merge_similarity", "evaluate", "plan_hybrid",
                                                  "hybrid_shard", "merge_hybrid", "load", "cleanup"}
    for dag in (crawl_dag, recs_dag):
        assert "recsketch" in dag.tags and dag.max_active_runs == 1
        for task in dag.tasks:
            assert task.retries >= 1 and task.retry_exponential_backoff, task.task_id
    # the crawl is on a clock and holds the API pool; the rest runs when the catalogue changes
    assert crawl_dag.catchup is False and type(crawl_dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert crawl_dag.get_task("crawl").pool == "sketchfab_api"
    assert crawl_dag.get_task("crawl").max_active_tis_per_dag == 1  # crawls never overlap
    assert [a.uri for a in crawl_dag.get_task("publish_catalogue").outlets] == ["recsketch://catalogue/"]
    assert type(recs_dag.timetable).__name__ == "AssetTriggeredTimetable"
    assert [a.uri for a in recs_dag.get_task("load").outlets] == ["recsketch://recommendations/"]
    assert isinstance(recs_dag.get_task("extract"), MappedOperator)
    assert isinstance(recs_dag.get_task("similarity_shard"), MappedOperator)
    assert recs_dag.get_task("plan_similarity").trigger_rule == "none_failed"
    assert recs_dag.get_task("merge_similarity").trigger_rule == "none_failed"
    assert set(recs_dag.params.keys()) == {"backbone", "top_k", "min_likes", "chunk_size", "force"}
    assert recs_dag.get_task("evaluate").downstream_task_ids == {"plan_hybrid"}
    assert recs_dag.get_task("plan_hybrid").downstream_task_ids == {"hybrid_shard"}  # sharded as similarity is
    assert isinstance(recs_dag.get_task("hybrid_shard"), MappedOperator)
    assert recs_dag.get_task("merge_hybrid").trigger_rule == "none_failed"
    assert recs_dag.get_task("merge_hybrid").downstream_task_ids == {"load"}
    assert recs_dag.get_task("load").downstream_task_ids == {"cleanup"}  # retention after every load


def test_params_are_validated() -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    dag = DagBag(str(DAG_FILE.parent)).dags["recsketch_recommendations"]
    ParamsDict(dag.params).update({"top_k": 3, "backbone": "vgg16", "chunk_size": 8, "min_likes": 0})
    ParamsDict(dag.params).update({"top_k": None, "backbone": None})  # unset: the environment decides
    for bad in ({"top_k": 0}, {"backbone": "resnet"}, {"chunk_size": "many"}, {"min_likes": -1}):
        with pytest.raises(ParamValidationError, match=f"param {next(iter(bad))}"):
            ParamsDict(dag.params).update(bad)


def test_parsing_the_dag_is_fast_and_loads_no_heavy_library() -> None:
    code = (
        "import sys, time, importlib.util\n"
        "import airflow.sdk\n"
        f"spec = importlib.util.spec_from_file_location('recsketch_dag', {str(DAG_FILE)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "started = time.perf_counter(); spec.loader.exec_module(module); took = time.perf_counter() - started\n"
        "heavy = sorted(m for m in ('tensorflow', 'torch', 'keras') if m in sys.modules)\n"
        "print(took, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 0.5
    assert out[1] == "[]"


@pytest.mark.usefixtures("airflow_db")
def test_dag_end_to_end_into_postgres(sketchfab, pg_url: str, demo_groups: dict[str, str], tmp_path: Path,
                                      monkeypatch) -> None:
    """dag.test() against the local server over HTTP, into PostgreSQL: neighbours are right."""
    from airflow.dag_processing.dagbag import DagBag

    from recsketch.contracts import Method, SimilarityPlan
    from recsketch.db import store

    # the API and the DB come from Airflow Connections; the environment holds neither
    monkeypatch.setenv("AIRFLOW_CONN_SKETCHFAB_DEFAULT", json.dumps(
        {"conn_type": "http", "host": sketchfab.url, "password": "tok-secret-123"}))
    monkeypatch.setenv("AIRFLOW_CONN_RECSKETCH_DB", json.dumps({"conn_type": "postgres", "extra": {
        "sqlalchemy_url": pg_url}}))
    monkeypatch.setenv("RECSKETCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RECSKETCH_SIMILARITY_SHARD_ROWS", "25")  # 72 models: three mapped shards
    bag = DagBag(str(DAG_FILE.parent))
    crawl_run = bag.dags["recsketch"].test()
    assert crawl_run.state == "success"
    # the connection's password was the token, sent to the API and never with a thumbnail
    assert {auth for _, path, auth in sketchfab.arrivals if not path.startswith("/models/")} == {"Token tok-secret-123"}
    assert {auth for _, path, auth in sketchfab.arrivals if path.startswith("/models/")} == {None}
    dag = bag.dags["recsketch_recommendations"]
    run = dag.test(run_conf={"top_k": 5, "chunk_size": 30})
    assert run.state == "success"

    engine = store.connect(pg_url)
    live = store.live_run(engine)
    assert live is not None and live["run_id"] == run.run_id and live["n_models"] == len(demo_groups)
    hits = 0
    for mid, group in demo_groups.items():
        recs = store.similar(engine, mid)
        assert len(recs) == 5 and [r["rank"] for r in recs] == [1, 2, 3, 4, 5]
        assert all(r["mid"] != mid for r in recs)
        hits += demo_groups[recs[0]["mid"]] == group
    assert hits == len(demo_groups), f"top-1 in own group for {hits}/{len(demo_groups)}"
    # three chunks of at most 30 models, each a checkpoint file
    chunk_files = list((tmp_path / "data" / "features").rglob("chunk-*.npz"))
    assert len(chunk_files) == 3
    run_folder = next(p for p in (tmp_path / "data" / "runs").iterdir() if (p / "valid_models.json").exists())
    assert len(SimilarityPlan.read(run_folder, Method.VISUAL).shards) == 3
    assert len(SimilarityPlan.read(run_folder, Method.HYBRID).shards) == 3  # mapped alike
    assert not list(run_folder.glob("*-shard-*.npz"))  # the run loaded: cleanup deleted its working files
    # the sparse models were removed by the threshold, the model without thumbnail never planned
    valid = json.loads(next((tmp_path / "data" / "runs").glob("*/valid_models.json")).read_text())
    assert sorted(valid) == sorted(demo_groups)

    # a second run reuses every chunk: nothing is extracted again
    mtimes = {p: p.stat().st_mtime_ns for p in chunk_files}
    second = dag.test(run_conf={"top_k": 5, "chunk_size": 30})
    assert second.state == "success"
    assert {p: p.stat().st_mtime_ns for p in chunk_files} == mtimes
    assert store.live_run(engine)["run_id"] == second.run_id

    # a value set in the environment beats the Params (which set nothing), and run conf beats it;
    # a freshly parsed DAG each time, as the scheduler has (dag.test() keeps a run's conf in dag.params)
    monkeypatch.setenv("RECSKETCH_TOP_K", "3")
    from_env = DagBag(str(DAG_FILE.parent)).dags["recsketch_recommendations"].test()
    assert from_env.state == "success" and store.live_run(engine)["top_k"] == 3
    assert len(store.similar(engine, next(iter(demo_groups)))) == 3
    from_conf = DagBag(str(DAG_FILE.parent)).dags["recsketch_recommendations"].test(run_conf={"top_k": 4})
    assert from_conf.state == "success" and store.live_run(engine)["top_k"] == 4


@pytest.mark.usefixtures("airflow_db")
def test_a_permanent_api_error_fails_the_crawl_without_retries(tmp_path: Path, monkeypatch) -> None:
    """A 400 on the listing cannot be cured by waiting: the task fails at once, retries unused."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from airflow.dag_processing.dagbag import DagBag

    requests_seen: list[str] = []

    class Refusing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests_seen.append(self.path)
            body = b'{"detail": "Unsupported sort_by."}'
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("RECSKETCH_SKETCHFAB_URL", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("RECSKETCH_DATA_DIR", str(tmp_path / "data"))
        run = DagBag(str(DAG_FILE.parent)).dags["recsketch"].test()
    finally:
        server.shutdown()
        server.server_close()
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    assert run.state == "failed"
    with create_session() as session:
        crawl = session.scalars(select(TaskInstance).where(
            TaskInstance.dag_id == "recsketch", TaskInstance.run_id == run.run_id,
            TaskInstance.task_id == "crawl")).one()
        state = (crawl.state, crawl.try_number, crawl.max_tries)
    assert state == ("failed", 1, 2)  # not up_for_retry, though 2 retries were allowed
    assert len(requests_seen) == 1
