"""The docker-compose stack, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parents[2]
COMPOSE = REPO / "docker-compose.yaml"
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker",
                    "airflow-triggerer", "airflow-init", "airflow-maintenance"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def shell_commands(script: str) -> list[tuple[dict[str, str], list[str]]]:
    """A shell script as (variable assignments, argv) per simple command: continuation lines
    joined, ``&&`` split, here-documents skipped. Enough to check what a stack runs."""
    commands: list[tuple[dict[str, str], list[str]]] = []
    lines = iter(script.replace("\\\n", " ").splitlines())
    for line in lines:
        if "<<" in line:  # a here-document: skip to its end marker
            marker = line.split("<<", 1)[1].strip().strip("'\"")
            for rest in lines:
                if rest.strip() == marker:
                    break
            continue
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            assignments = {}
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                name, _, value = words.pop(0).partition("=")
                assignments[name] = value
            if words:
                commands.append((assignments, words))
    return commands


def database_url(url: str) -> dict[str, str]:
    """A DB URL's parts; the password may be a compose ``${…}`` expression (not URL-safe)."""
    match = re.fullmatch(r"(?P<scheme>[\w+]+)://(?P<user>\w+):(?P<password>\$\{[^}]*\}|[^@]*)@(?P<host>[\w.-]+)"
                         r":(?P<port>\d+)/(?P<database>\w+)", url)
    assert match, url
    return match.groupdict()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_services_and_health_checks(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == AIRFLOW_SERVICES | {"postgres", "redis", "seaweedfs"}
    for name, service in services.items():
        if name not in ("airflow-init", "airflow-maintenance"):  # a one-off, and a daily loop
            assert "healthcheck" in service, name
    assert services["airflow-worker"]["command"] == "celery worker"
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"


def test_airflow_services_share_no_disk_only_the_object_store(compose: dict) -> None:
    """As on several hosts: no volume or host path; artefacts and task logs in the object store,
    reached through the recsketch_storage connection; two workers; DAGs baked into the image."""
    for name in AIRFLOW_SERVICES:
        service = compose["services"][name]
        assert "volumes" not in service, name
        env = service["environment"]
        assert env["RECSKETCH_DATA_DIR"] == "${RECSKETCH_DATA_DIR:-s3://recsketch/data}", name
        assert env["RECSKETCH_STORAGE_CONN_ID"] == "recsketch_storage"
        assert env["AIRFLOW__LOGGING__REMOTE_LOGGING"] == "true"
        assert env["AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER"].startswith("s3://recsketch/")
        assert env["AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID"] == "recsketch_storage"
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://")
        assert service["depends_on"]["seaweedfs"] == {"condition": "service_healthy"}
    storage = json.loads(compose["x-airflow-common"]["environment"]["AIRFLOW_CONN_RECSKETCH_STORAGE"])
    assert storage["conn_type"] == "aws" and storage["extra"]["endpoint_url"] == "${RECSKETCH_S3_ENDPOINT:-http://seaweedfs:8333}"
    assert storage["login"].startswith("${") and storage["password"].startswith("${")
    assert compose["services"]["airflow-worker"]["deploy"]["replicas"] == 2
    seaweedfs = compose["services"]["seaweedfs"]
    assert seaweedfs["command"].split()[0] == "mini" and seaweedfs["environment"]["S3_BUCKET"] == "recsketch"
    copies = [args.split() for kind, args in dockerfile_instructions() if kind == "COPY"]
    assert ["dags", "./dags"] in copies and ["plugins", "./plugins"] in copies
    dags_folder = compose["x-airflow-common"]["environment"]["AIRFLOW__CORE__DAGS_FOLDER"]
    assert dags_folder == "/opt/recsketch/dags"


def test_connections_the_api_pool_and_the_schema_are_set_up(compose: dict) -> None:
    env = compose["x-airflow-common"]["environment"]
    db = database_url(env["AIRFLOW_CONN_RECSKETCH_DB"])
    assert db == {"scheme": "postgres", "user": "airflow", "password": "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}",
                  "host": "postgres", "port": "5432", "database": "recsketch"}
    sketchfab = json.loads(env["AIRFLOW_CONN_SKETCHFAB_DEFAULT"])
    assert sketchfab["conn_type"] == "http" and sketchfab["password"] == "${RECSKETCH_SKETCHFAB_TOKEN:-}"
    assert "RECSKETCH_SKETCHFAB_TOKEN" not in env and "RECSKETCH_DATABASE_URL" not in env  # connections only
    init = compose["services"]["airflow-init"]
    assert init["entrypoint"] == "/bin/bash" and init["command"][0] == "-c"
    commands = shell_commands(init["command"][1])
    argvs = [argv for _, argv in commands]
    assert ["airflow", "db", "migrate"] in argvs
    assert ["airflow", "pools", "set", "sketchfab_api", "4", "concurrent Sketchfab API tasks"] in argvs
    upgrade = [assigned for assigned, argv in commands if argv == ["recsketch", "db", "upgrade"]]
    assert len(upgrade) == 1
    target = database_url(upgrade[0]["RECSKETCH_DATABASE_URL"])
    assert (target["scheme"], target["host"], target["database"]) == ("postgresql+psycopg2", "postgres", "recsketch")
    assert argvs.index(["airflow", "db", "migrate"]) < argvs.index(["recsketch", "db", "upgrade"])


def test_a_maintenance_service_bounds_airflows_own_state_daily(compose: dict) -> None:
    """Airflow 3 tasks cannot reach the metadata DB: the stack runs tools/airflow_maintenance.py
    beside it, from the image, once a day."""
    service = compose["services"]["airflow-maintenance"]
    assert service["entrypoint"] == "/bin/bash" and service["restart"] == "always"
    assert service["depends_on"]["airflow-init"] == {"condition": "service_completed_successfully"}
    loop = service["command"][1]
    assert "python /opt/recsketch/tools/airflow_maintenance.py --keep-days 30" in loop and "sleep 86400" in loop
    copies = [args.split() for kind, args in dockerfile_instructions() if kind == "COPY"]
    assert ["tools/airflow_maintenance.py", "./tools/"] in copies
    assert "import tools" not in (REPO / "tools" / "airflow_maintenance.py").read_text()  # runs as a lone file


def test_the_image_installs_the_lock_and_prefetches_vgg16_weights() -> None:
    instructions = dockerfile_instructions()
    env = dict(item.split("=", 1) for kind, args in instructions if kind == "ENV" for item in args.split())
    runs = [argv for kind, args in instructions if kind == "RUN" for _, argv in shell_commands(args)]
    assert ["pip", "install", "-r", "requirements.txt"] in runs and ["pip", "install", "--no-deps", "."] in runs
    fetch = next(argv for argv in runs if argv[0] == "curl")
    target = fetch[fetch.index("-o") + 1].replace("$KERAS_HOME", env["KERAS_HOME"])
    assert target == "/opt/keras/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert fetch[-1].endswith("/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")


def test_no_hard_coded_secrets() -> None:
    text = COMPOSE.read_text()
    for line in text.splitlines():
        match = re.match(r"\s*[A-Z_]*(PASSWORD|SECRET|TOKEN)[A-Z_]*:\s*(\S+)", line)
        if match:
            assert match.group(2).startswith("${"), line
    assert not re.search(r"://\w+:(?!\$\{)[^@/]+@", text), "a URL carries a literal password"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (v1) is not installed")
def test_docker_compose_validates_it() -> None:
    env = {"PATH": "/usr/bin:/bin", "POSTGRES_PASSWORD": "x", "AIRFLOW__API_AUTH__JWT_SECRET": "y",
           "RECSKETCH_S3_ACCESS_KEY": "a", "RECSKETCH_S3_SECRET_KEY": "b"}
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    missing = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], env={"PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr  # secrets must be supplied
