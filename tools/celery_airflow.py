"""Airflow on the CeleryExecutor, as it runs across machines, on this one: api-server, scheduler
and dag-processor in one ``AIRFLOW_HOME``, and N ``airflow celery worker``s, each with an
``AIRFLOW_HOME`` and a scratch disk (``TMPDIR``) of its own and no path shared with anyone.
Redis (127.0.0.1:6379, a db number of its own) is the broker, PostgreSQL the metadata DB and
the Celery result backend; artefacts go to the object store named by ``RECSKETCH_DATA_DIR``
through the ``recsketch_storage`` connection. Workers share only what separate hosts would:
the DAG bundle (the repo's dags/), the JWT secret and the execution API's URL.

Each worker reports its own name as the task instances' hostname (``[core]
hostname_callable`` = :func:`worker_hostname`), so the UI and the tests see which worker ran
which task, though all run on one machine here.

    python -m tools.celery_airflow --port 8080 --workers 2 --sketchfab-url http://127.0.0.1:8765

Ctrl-C or SIGTERM stops every component and worker.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from tools.local_airflow import BIN, REPO, LocalAirflow, connection_env, ensure_database, free_port
from tools.processes import serve_until_stopped

CELERY_COMPONENTS = ("api-server", "scheduler", "dag-processor")
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the workers: their own name, else the machine's."""
    return os.environ.get("RECSKETCH_WORKER_NAME") or socket.getfqdn()


def storage_connection(endpoint: str, access_key: str, secret_key: str) -> str:
    """``AIRFLOW_CONN_RECSKETCH_STORAGE``: an AWS connection to an S3-compatible endpoint."""
    return json.dumps({"conn_type": "aws", "login": access_key, "password": secret_key,
                       "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"}})


class CeleryAirflow(LocalAirflow):
    """The core components (LocalAirflow's, on the CeleryExecutor) plus workers started by name."""

    def __init__(self, home: Path, *, port: int, metadata_url: str, broker_url: str,
                 env: dict[str, str] | None = None, parallelism: int = 4) -> None:
        driver_url = metadata_url.replace("postgresql+psycopg2://", "postgresql://", 1)
        celery = {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            # SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql:// URL: name the driver
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + driver_url.replace("postgresql://", "postgresql+psycopg2://"),
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tools.celery_airflow.worker_hostname",
            # a worker SIGKILLed mid-task stops heartbeating: fail (and retry) its task in 30 s, not 5 min
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        super().__init__(home, port=port, metadata_url=metadata_url, env={**celery, **(env or {})},
                         parallelism=parallelism, unpause=False, components=CELERY_COMPONENTS)
        self.workers: dict[str, Path] = {}

    def start_worker(self, name: str, root: Path) -> None:
        """One worker in ``root`` (its AIRFLOW_HOME, logs and scratch), known as ``name``."""
        home, scratch = root / "airflow", root / "tmp"
        home.mkdir(parents=True, exist_ok=True)
        scratch.mkdir(parents=True, exist_ok=True)
        env = {key: value for key, value in self.env.items() if key not in AWS_VARIABLES}  # the connection only
        env.update({"AIRFLOW_HOME": str(home), "TMPDIR": str(scratch), "RECSKETCH_WORKER_NAME": name,
                    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())})
        args = [str(BIN / "airflow"), "celery", "worker", "--concurrency", "1", "--celery-hostname",
                f"{name}@%h", "--without-mingle", "--without-gossip"]
        self.group.start(f"worker-{name}", args, env=env, log=root / "worker.log", cwd=root)
        self.workers[name] = root

    def wait_for_workers(self, timeout_s: float = 120) -> None:
        """Until every worker has joined the broker (``celery inspect ping`` answers)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, root in self.workers.items():
                if self.group.processes[f"worker-{name}"].poll() is not None:
                    raise RuntimeError(f"worker {name} exited: {(root / 'worker.log').read_text()[-3000:]}")
            if all("ready." in (root / "worker.log").read_text(errors="replace") for root in self.workers.values()):
                return
            time.sleep(1)
        raise TimeoutError(f"the workers did not start within {timeout_s}s")

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker and every process it started (its running task included)."""
        self.group.kill(f"worker-{name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--home", type=Path, default=REPO / ".airflow-celery")
    parser.add_argument("--postgres", default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/5")
    parser.add_argument("--sketchfab-url", default=os.environ.get("RECSKETCH_SKETCHFAB_URL", "https://api.sketchfab.com"))
    args = parser.parse_args(argv)
    metadata = ensure_database(args.postgres, "recsketch_airflow_celery", fresh=False)
    recommendations = ensure_database(args.postgres, "recsketch", fresh=False)
    env = connection_env(args.sketchfab_url, os.environ.get("RECSKETCH_SKETCHFAB_TOKEN"), recommendations)
    env["RECSKETCH_DATA_DIR"] = os.environ.get("RECSKETCH_DATA_DIR", str(REPO / "data"))
    if os.environ.get("AWS_ENDPOINT_URL"):
        env["AIRFLOW_CONN_RECSKETCH_STORAGE"] = storage_connection(
            os.environ["AWS_ENDPOINT_URL"], os.environ.get("AWS_ACCESS_KEY_ID", ""),
            os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
    airflow = CeleryAirflow(args.home, port=args.port, metadata_url=metadata, broker_url=args.redis, env=env)

    def start() -> str:
        airflow.start()
        for index in range(args.workers):
            airflow.start_worker(f"worker{index + 1}", args.home / f"worker{index + 1}")
        airflow.wait_for_workers()
        return (f"Airflow UI: {airflow.url}  user admin, password {airflow.password}; "
                f"{args.workers} Celery workers; data: {env['RECSKETCH_DATA_DIR']}.")

    return serve_until_stopped(start, airflow.stop)  # SIGTERM, like Ctrl-C, stops components and workers


if __name__ == "__main__":
    sys.exit(main())
