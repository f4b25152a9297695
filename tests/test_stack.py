"""The docker-compose stack, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parents[1]
COMPOSE = REPO / "docker-compose.yaml"
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker",
                    "airflow-triggerer", "airflow-init"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_health_checks(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == AIRFLOW_SERVICES | {"postgres", "redis"}
    for name, service in services.items():
        if name != "airflow-init":
            assert "healthcheck" in service, name
    assert services["airflow-worker"]["command"] == "celery worker"
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"


def test_workers_share_the_data_volume(compose: dict) -> None:
    for name in AIRFLOW_SERVICES:
        volumes = compose["services"][name]["volumes"]
        assert "recsketch-data:/data" in volumes and "./dags:/opt/airflow/dags" in volumes, name
        assert compose["services"][name]["environment"]["RECSKETCH_DATA_DIR"] == "/data"


def test_connections_and_the_api_pool_are_configured(compose: dict) -> None:
    env = compose["x-airflow-common"]["environment"]
    assert env["AIRFLOW_CONN_RECSKETCH_DB"].startswith("postgres://airflow:${POSTGRES_PASSWORD")
    assert '"password": "${RECSKETCH_SKETCHFAB_TOKEN:-}"' in env["AIRFLOW_CONN_SKETCHFAB_DEFAULT"]
    assert "RECSKETCH_SKETCHFAB_TOKEN" not in env and "RECSKETCH_DATABASE_URL" not in env  # connections only
    assert "airflow pools set sketchfab_api" in compose["services"]["airflow-init"]["command"][1]


def test_the_image_prefetches_vgg16_weights() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in dockerfile
    assert "pip install -r requirements.txt" in dockerfile


def test_no_hard_coded_secrets() -> None:
    text = COMPOSE.read_text()
    for line in text.splitlines():
        match = re.match(r"\s*[A-Z_]*(PASSWORD|SECRET|TOKEN)[A-Z_]*:\s*(\S+)", line)
        if match:
            assert match.group(2).startswith("${"), line
    assert not re.search(r"://\w+:(?!\$\{)[^@/]+@", text), "a URL carries a literal password"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (v1) is not installed")
def test_docker_compose_validates_it() -> None:
    env = {"PATH": "/usr/bin:/bin", "POSTGRES_PASSWORD": "x", "AIRFLOW__API_AUTH__JWT_SECRET": "y"}
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    missing = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], env={"PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr  # secrets must be supplied
