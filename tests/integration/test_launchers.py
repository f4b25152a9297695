"""Issue 13: every launcher stops all it started on SIGTERM (what a supervisor or `kill` sends),
as on Ctrl-C: no api-server, scheduler, worker or object store is left behind as an orphan."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tools.local_airflow import free_port

REPO = Path(__file__).parents[2]


def launch_and_terminate(args: list[str], ready_text: str, env: dict[str, str], timeout_s: float = 240) -> list[str]:
    """Start a launcher, wait for ``ready_text`` on its output, note every process under it,
    SIGTERM the launcher alone, and return the descriptions of the processes still alive."""
    launcher = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert launcher.stdout is not None
    output = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = launcher.stdout.readline()
        if not line and launcher.poll() is not None:
            pytest.fail(f"{args} exited with {launcher.returncode}: {''.join(output)[-3000:]}")
        output.append(line)
        if ready_text in line:
            break
    else:
        launcher.kill()
        pytest.fail(f"{args} was not ready in {timeout_s}s: {''.join(output)[-3000:]}")
    started = psutil.Process(launcher.pid).children(recursive=True)
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=90)
    _, alive = psutil.wait_procs(started, timeout=30)
    leftovers = []
    for process in alive:  # don't leak them into the rest of the session, whatever the verdict
        with contextlib.suppress(psutil.NoSuchProcess):
            leftovers.append(f"{process.pid} {' '.join(process.cmdline()[:3])}")
            process.kill()
    return leftovers


def test_the_object_store_launcher_stops_seaweedfs_on_sigterm(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "tools.object_store", "--dir", str(tmp_path), "--port", str(free_port())]
    assert launch_and_terminate(args, "Ctrl-C or SIGTERM stops it", dict(os.environ)) == []


def test_local_airflow_stops_every_component_on_sigterm(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "tools.local_airflow", "--home", str(tmp_path / "airflow"),
            "--port", str(free_port()), "--sketchfab-url", "http://127.0.0.1:9"]
    env = {**os.environ, "RECSKETCH_DATA_DIR": str(tmp_path / "data")}
    assert launch_and_terminate(args, "Ctrl-C or SIGTERM stops it", env) == []


def test_the_celery_launcher_stops_components_and_workers_on_sigterm(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "tools.celery_airflow", "--home", str(tmp_path / "airflow"),
            "--port", str(free_port()), "--workers", "2", "--redis", "redis://127.0.0.1:6379/12",
            "--sketchfab-url", "http://127.0.0.1:9"]
    env = {**os.environ, "RECSKETCH_DATA_DIR": str(tmp_path / "data")}
    assert launch_and_terminate(args, "Ctrl-C or SIGTERM stops it", env) == []


def test_the_local_sketchfab_server_ends_on_sigterm(demo_catalog: Path) -> None:
    args = [sys.executable, "-m", "recsketch.cli", "serve-sketchfab", str(demo_catalog), "--port", str(free_port())]
    assert launch_and_terminate(args, "serving", dict(os.environ)) == []
