"""A real local Airflow 3 for recsketch, without Docker: api-server + scheduler + dag-processor
(+ triggerer) on the LocalExecutor, with PostgreSQL as the metadata DB, the repo's dags/ and
plugins/, the ``sketchfab_api`` pool, and the Connections set through the environment.

``make airflow`` runs it in the foreground (Ctrl-C stops every component); the tests use
:class:`LocalAirflow` to trigger runs and backfills through the REST API and the CLI.

    python -m tools.local_airflow --port 8080 --sketchfab-url http://127.0.0.1:8765
    python -m tools.local_airflow --maintenance [--keep-days 30]    # make airflow-clean
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tools.processes import ProcessGroup, serve_until_stopped

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
ADMIN = "admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_database(server_url: str, name: str, *, fresh: bool) -> str:
    """Create PostgreSQL database ``name`` on ``server_url`` (dropped first if ``fresh``)."""
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        if fresh:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if not conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def connection_env(sketchfab_url: str, sketchfab_token: str | None, recsketch_db_url: str) -> dict[str, str]:
    """``AIRFLOW_CONN_*`` for sketchfab_default and recsketch_db (Airflow's JSON form)."""
    db = make_url(recsketch_db_url)
    return {
        "AIRFLOW_CONN_SKETCHFAB_DEFAULT": json.dumps({"conn_type": "http", "host": sketchfab_url,
                                                      "password": sketchfab_token or ""}),
        "AIRFLOW_CONN_RECSKETCH_DB": json.dumps({"conn_type": "postgres", "host": db.host, "port": db.port,
                                                 "login": db.username, "password": db.password or "",
                                                 "schema": db.database}),
    }


class LocalAirflow:
    """One Airflow deployment in ``home``; ``start()`` returns when the REST API answers."""

    def __init__(self, home: Path, *, port: int, metadata_url: str, env: dict[str, str] | None = None,
                 parallelism: int = 2, unpause: bool = False, components: tuple[str, ...] = COMPONENTS) -> None:
        self.home = home
        self.components = components
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.password = secrets.token_urlsafe(12)
        self.group = ProcessGroup()
        home.mkdir(parents=True, exist_ok=True)
        (home / "passwords.json").write_text(json.dumps({ADMIN: self.password}))
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False" if unpause else "True",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__LAZY_LOAD_PLUGINS": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            **(env or {}),
        }
        self._token: str | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def airflow(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([str(BIN / "airflow"), *args], env=self.env, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def start(self, timeout_s: float = 180) -> LocalAirflow:
        self.airflow("db", "migrate")
        self.airflow("pools", "set", "sketchfab_api", "2", "concurrent Sketchfab API tasks")
        for name in self.components:
            args = [str(BIN / "airflow"), *name.split()] + (["--port", str(self.port)] if name == "api-server" else [])
            self.group.start(name, args, env=self.env, log=self.home / f"{name}.log")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.group.check_alive(self.home)
            try:
                if requests.get(f"{self.url}/api/v2/monitor/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"the api-server did not answer on {self.url} within {timeout_s}s")

    def stop(self) -> None:
        """Stop each component's whole process group (SIGTERM, then SIGKILL after 30 s)."""
        self.group.stop()

    # --- REST API ------------------------------------------------------------------------------
    def token(self) -> str:
        if self._token is None:
            answer = requests.post(f"{self.url}/auth/token", json={"username": ADMIN, "password": self.password},
                                   timeout=10)
            answer.raise_for_status()
            self._token = answer.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = requests.request(method, f"{self.url}/api/v2{path}", timeout=30,
                                  headers={"Authorization": f"Bearer {self.token()}"}, **kwargs)
        if not answer.ok:
            raise RuntimeError(f"{method} {path}: {answer.status_code} {answer.text[:1000]}")
        return answer.json() if answer.content else None

    def wait_for_dag(self, dag_id: str, timeout_s: float = 120) -> None:
        """Until the dag-processor has serialised ``dag_id``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.api("GET", f"/dags/{dag_id}/details")
                return
            except RuntimeError:
                time.sleep(2)
        raise TimeoutError(f"dag {dag_id} was not parsed within {timeout_s}s")

    def dag_runs(self, dag_id: str) -> list[dict]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "logical_date"})[
            "dag_runs"]

    def wait_for_runs(self, dag_id: str, count: int, timeout_s: float = 600) -> list[dict]:
        """Until ``count`` runs of ``dag_id`` have finished; a failed run raises with its task states."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            runs = self.dag_runs(dag_id)
            for run in runs:
                if run["state"] == "failed":
                    tasks = self.api("GET", f"/dags/{dag_id}/dagRuns/{run['dag_run_id']}/taskInstances")
                    states = {t["task_id"]: t["state"] for t in tasks["task_instances"]}
                    raise RuntimeError(f"{dag_id} run {run['dag_run_id']} failed: {states}")
            done = [run for run in runs if run["state"] == "success"]
            if len(done) >= count and all(run["state"] == "success" for run in runs):
                return done
            time.sleep(2)
        raise TimeoutError(f"{dag_id}: fewer than {count} runs finished within {timeout_s}s: "
                           f"{[(r['dag_run_id'], r['state']) for r in self.dag_runs(dag_id)]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--home", type=Path, default=REPO / ".airflow")
    parser.add_argument("--postgres", default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres",
                        help="PostgreSQL server for Airflow's metadata DB and the recommendations DB")
    parser.add_argument("--sketchfab-url", default=os.environ.get("RECSKETCH_SKETCHFAB_URL", "https://api.sketchfab.com"))
    parser.add_argument("--maintenance", action="store_true",
                        help="instead of starting it: purge its run history and task logs past --keep-days "
                             "(tools.airflow_maintenance)")
    parser.add_argument("--keep-days", type=float, default=30.0, help="with --maintenance: days kept (30)")
    args = parser.parse_args(argv)
    metadata = ensure_database(args.postgres, "recsketch_airflow", fresh=False)
    recommendations = ensure_database(args.postgres, "recsketch", fresh=False)
    env = connection_env(args.sketchfab_url, os.environ.get("RECSKETCH_SKETCHFAB_TOKEN"), recommendations)
    env.setdefault("RECSKETCH_DATA_DIR", os.environ.get("RECSKETCH_DATA_DIR", str(REPO / "data")))
    airflow = LocalAirflow(args.home, port=args.port, metadata_url=metadata, env=env)
    if args.maintenance:
        from datetime import UTC, datetime, timedelta

        from tools.airflow_maintenance import clean

        print(clean(airflow.env, datetime.now(UTC) - timedelta(days=args.keep_days)))
        return 0

    def start() -> str:
        airflow.start()
        return (f"Airflow UI: {airflow.url}  user {ADMIN}, password {airflow.password}\n"
                f"recommendations gallery: {airflow.url}/recsketch/ (Browse > Similar models)\n"
                f"Sketchfab API: {args.sketchfab_url}; data: {env['RECSKETCH_DATA_DIR']}; logs: {args.home}/*.log.")

    return serve_until_stopped(start, airflow.stop)  # SIGTERM, like Ctrl-C, stops every component


if __name__ == "__main__":
    sys.exit(main())
