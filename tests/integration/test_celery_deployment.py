"""Issue 13: recsketch on a real Celery deployment whose workers share no disk.

Scheduler, api-server and dag-processor, and two ``airflow celery worker``s with their own
``AIRFLOW_HOME`` and scratch disks; Redis as broker, PostgreSQL as metadata DB and result
backend, every artefact in SeaweedFS through the ``recsketch_storage`` connection (the workers
have no AWS variables). A full run spreads the mapped tasks over both workers and serves what
``recsketch run`` serves; a worker SIGKILLed in the middle of an extract task has that task
retried on the other worker, with the same result.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsketch.config import Settings
from recsketch.db import store
from recsketch.stages import run_pipeline
from tests.fault_suite import Databases
from tests.integration.test_object_storage import recommendations
from tools.celery_airflow import CeleryAirflow, storage_connection
from tools.local_airflow import connection_env, free_port
from tools.object_store import ACCESS_KEY, SECRET_KEY

REDIS_DB = 11  # the broker's own database number on 127.0.0.1:6379
WORKERS = ("worker1", "worker2")
TUNING = {"RECSKETCH_CHUNK_SIZE": "8", "RECSKETCH_SIMILARITY_SHARD_ROWS": "20"}  # 9 chunks, 4 shards


class Deployment:
    def __init__(self, airflow: CeleryAirflow, db_url: str, data_dir: str) -> None:
        self.airflow, self.db_url, self.data_dir = airflow, db_url, data_dir

    def task_instances(self, run_id: str, task_id: str) -> list[dict]:
        return self.airflow.api("GET", f"/dags/recsketch_recommendations/dagRuns/{run_id}/taskInstances",
                                params={"task_id": task_id, "limit": 100})["task_instances"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while (state := self.airflow.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]) != "success":
            assert state != "failed", f"{dag_id} run {run_id} failed"
            assert time.monotonic() < deadline, f"{dag_id} run {run_id} still {state} after {timeout_s}s"
            time.sleep(2)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, object_store, demo_catalog: Path,  # type: ignore[no-untyped-def]
               module_serve) -> Iterator[Deployment]:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    tmp = tmp_path_factory.mktemp("celery")
    dbs = Databases()
    _, metadata_url = dbs.create()
    _, db_url = dbs.create()
    server = module_serve(demo_catalog)
    data_dir = object_store.url(f"celery-{uuid.uuid4().hex[:8]}")
    env = {**connection_env(server.url, None, db_url), **TUNING, "RECSKETCH_DATA_DIR": data_dir,
           "AIRFLOW_CONN_RECSKETCH_STORAGE": storage_connection(object_store.endpoint, ACCESS_KEY, SECRET_KEY)}
    airflow = CeleryAirflow(tmp / "core", port=free_port(), metadata_url=metadata_url,
                            broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}", env=env)
    try:
        airflow.start()
        for name in WORKERS:
            airflow.start_worker(name, tmp / name)  # nothing under tmp/core is visible to a worker's tasks
        airflow.wait_for_workers()
        yield Deployment(airflow, db_url, data_dir)
    finally:
        airflow.stop()
        dbs.drop_all()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, demo_catalog: Path, module_serve) -> list[tuple]:  # type: ignore[no-untyped-def]
    """What `recsketch run` on one machine (local disk, SQLite) serves for the same catalogue."""
    tmp = tmp_path_factory.mktemp("reference")
    server = module_serve(demo_catalog)
    db_url = f"sqlite:///{tmp / 'reference.sqlite'}"
    settings = Settings(data_dir=tmp / "data", database_url=db_url, sketchfab_url=server.url, chunk_size=8,
                        similarity_shard_rows=20)
    run_pipeline(settings, "reference", progress=lambda _: None)
    return recommendations(db_url)


@pytest.fixture(scope="module")
def first_run(deployment: Deployment) -> dict:
    """Unpausing starts the daily crawl; its catalogue Asset starts the recommendations run."""
    airflow = deployment.airflow
    for dag_id in ("recsketch_recommendations", "recsketch"):
        airflow.wait_for_dag(dag_id)
        airflow.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
    started = time.monotonic()
    runs = airflow.wait_for_runs("recsketch_recommendations", 1, timeout_s=900)
    return {"run_id": runs[0]["dag_run_id"], "wall_s": time.monotonic() - started}


def test_a_full_run_spreads_mapped_tasks_over_both_workers(deployment: Deployment, first_run: dict,
                                                            reference: list[tuple]) -> None:
    run_id = first_run["run_id"]
    split: dict[str, Counter] = {}
    for task_id in ("extract", "similarity_shard"):
        instances = deployment.task_instances(run_id, task_id)
        assert instances and all(ti["state"] == "success" for ti in instances)
        split[task_id] = Counter(ti["hostname"] for ti in instances)
    assert sum(split["extract"].values()) == 9 and sum(split["similarity_shard"].values()) == 4
    ran = split["extract"] + split["similarity_shard"]
    assert set(ran) == set(WORKERS), f"mapped tasks ran on {dict(ran)}"
    print(f"\ncelery run {run_id}: {first_run['wall_s']:.0f}s from unpause to loaded; "
          f"extract {dict(split['extract'])}, similarity_shard {dict(split['similarity_shard'])}")
    assert store.live_run(store.connect(deployment.db_url))["run_id"] == run_id
    assert recommendations(deployment.db_url) == reference
    # the workers' own disks hold logs and scratch only: no artefact was written there
    for name in WORKERS:
        root = deployment.airflow.workers[name]
        assert not [p for p in root.rglob("*") if p.suffix in (".npz", ".jpg", ".npy")], name


def test_a_worker_killed_mid_extract_has_its_task_retried_elsewhere(deployment: Deployment, first_run: dict,
                                                                     reference: list[tuple]) -> None:
    import boto3

    # forget every feature and run file, so the next run extracts all 9 chunks again
    bucket, _, prefix = deployment.data_dir.removeprefix("s3://").partition("/")
    client = boto3.client("s3", region_name="us-east-1")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/features/"):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])
    airflow = deployment.airflow
    run_id = airflow.api("POST", "/dags/recsketch_recommendations/dagRuns",
                         json={"logical_date": None, "conf": {}})["dag_run_id"]
    victim = None
    deadline = time.monotonic() + 300
    while victim is None:
        assert time.monotonic() < deadline, "no extract task started"
        running = [ti for ti in deployment.task_instances(run_id, "extract")
                   if ti["state"] == "running" and ti["hostname"] in WORKERS]
        if running:
            victim = running[0]
            airflow.kill_worker(victim["hostname"])
        else:
            time.sleep(0.2)
    deployment.wait_for_run("recsketch_recommendations", run_id, timeout_s=600)
    retried = next(ti for ti in deployment.task_instances(run_id, "extract")
                   if ti["map_index"] == victim["map_index"])
    survivor = next(name for name in WORKERS if name != victim["hostname"])
    assert retried["state"] == "success" and retried["hostname"] == survivor
    assert retried["try_number"] > victim["try_number"]
    assert store.live_run(store.connect(deployment.db_url))["run_id"] == run_id
    assert recommendations(deployment.db_url) == reference
