"""The Airflow DAG: integrity (DagBag), thin parse, and a real end-to-end run with dag.test()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
DAG_FILE = REPO / "dags" / "recsketch.py"


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Airflow's metadata DB (SQLite in the tests' private AIRFLOW_HOME)."""
    airflow = Path(sys.executable).with_name("airflow")
    done = subprocess.run([str(airflow), "db", "migrate"], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_dagbag_has_no_import_errors_and_the_expected_shape() -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAG_FILE.parent))
    assert bag.import_errors == {}
    dag = bag.dags["recsketch"]
    assert {t.task_id for t in dag.tasks} == {"crawl", "threshold", "plan_chunks", "extract", "plan_similarity",
                                             "similarity_shard", "merge_similarity", "load"}
    assert dag.catchup is False and "recsketch" in dag.tags
    for task in dag.tasks:
        assert task.retries >= 1, task.task_id
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    assert isinstance(dag.get_task("extract"), MappedOperator)
    assert isinstance(dag.get_task("similarity_shard"), MappedOperator)
    assert dag.get_task("plan_similarity").trigger_rule == "none_failed"
    assert dag.get_task("merge_similarity").trigger_rule == "none_failed"
    assert set(dag.params.keys()) == {"backbone", "top_k", "min_likes", "chunk_size"}


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

    from recsketch.db import store

    monkeypatch.setenv("RECSKETCH_SKETCHFAB_URL", sketchfab.url)
    monkeypatch.setenv("RECSKETCH_DATABASE_URL", pg_url)
    monkeypatch.setenv("RECSKETCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RECSKETCH_SIMILARITY_SHARD_ROWS", "25")  # 72 models: three mapped shards
    dag = DagBag(str(DAG_FILE.parent)).dags["recsketch"]
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
    assert len(list((tmp_path / "data" / "runs").glob("*/similarity-shard-*.npz"))) == 3
    # the sparse models were removed by the threshold, the model without thumbnail never planned
    valid = json.loads(next((tmp_path / "data" / "runs").glob("*/valid_models.json")).read_text())
    assert sorted(valid) == sorted(demo_groups)

    # a second run reuses every chunk: nothing is extracted again
    mtimes = {p: p.stat().st_mtime_ns for p in chunk_files}
    second = dag.test(run_conf={"top_k": 5, "chunk_size": 30})
    assert second.state == "success"
    assert {p: p.stat().st_mtime_ns for p in chunk_files} == mtimes
    assert store.live_run(engine)["run_id"] == second.run_id
