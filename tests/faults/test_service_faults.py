"""Service faults: PostgreSQL stopped mid-load or unreachable, a full disk, API outages.

PostgreSQL is stopped and started for real: a private cluster (initdb as the ``postgres``
user, its own port and socket dir), so the machine's shared server is never touched. The
API outages last ``RECSKETCH_TEST_OUTAGE_S`` seconds per fault mode (5 here; ``make faults``: 120).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from recsketch import contracts
from recsketch.config import Settings
from recsketch.contracts import TopK, TopKStore
from recsketch.db import store
from recsketch.errors import StorageFull
from recsketch.sketchfab.server import Faults
from recsketch.stages.common import run_dir
from recsketch.stages.extract import extract_stage, plan_stage
from tests.fault_suite import FaultSuite

PG_BIN = Path("/usr/lib/postgresql") / (os.listdir("/usr/lib/postgresql")[0] if Path("/usr/lib/postgresql").is_dir()
                                        else "none") / "bin"
OUTAGE_S = float(os.environ.get("RECSKETCH_TEST_OUTAGE_S", "5"))
pytestmark = pytest.mark.faults


def _cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recsketch.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


class PrivatePostgres:
    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.url = f"postgresql+psycopg2://postgres:s3cret-pw@127.0.0.1:{port}/postgres"

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self.folder.mkdir(parents=True)
        shutil.chown(self.folder, "postgres")
        os.chmod(self.folder, 0o700)
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.folder / "db"), "-U", "postgres",
                          "-A", "trust")

    def start(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.folder / "db"), "-l", str(self.folder / "log"),
                          "-w", "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.folder / "db"), "-w", "-m", mode, "stop")


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[PrivatePostgres]:
    if os.geteuid() != 0 or not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        pytest.skip("needs root, runuser and PostgreSQL's initdb to run a private cluster")
    from tools.local_airflow import free_port

    server = PrivatePostgres(Path("/tmp") / f"recsketch-pg-{os.getpid()}-{tmp_path.name}", free_port())
    server.init()
    server.start()
    try:
        yield server
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D",
                        str(server.folder / "db"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(server.folder, ignore_errors=True)


def _synthetic_topk(folder: Path, n: int = 50_000, k: int = 10) -> None:
    """500,000 rows: a load that lasts seconds, so PostgreSQL can be stopped in the middle of it."""
    rng = np.random.default_rng(3)
    mids = np.array([f"{i:032x}" for i in range(n)])
    indices = rng.integers(0, n, size=(n, k)).astype(np.int32)
    scores = np.sort(rng.random((n, k)).astype(np.float32), axis=1)[:, ::-1]
    for run in ("previous", "r"):
        (folder / "runs" / run).mkdir(parents=True, exist_ok=True)
        TopKStore.for_run(folder / "runs" / run).write(TopK(list(mids), indices, scores, "synthetic"))


def test_postgres_stopped_during_a_load_then_restarted(private_postgres: PrivatePostgres, tmp_path: Path) -> None:
    _synthetic_topk(tmp_path)
    env = {**os.environ, "RECSKETCH_DATA_DIR": str(tmp_path), "RECSKETCH_DATABASE_URL": private_postgres.url}
    assert _cli("load", "--run-id", "previous", env=env).returncode == 0
    served_before = FaultSuite.served_rows(private_postgres.url)

    loader = subprocess.Popen([sys.executable, "-m", "recsketch.cli", "load", "--run-id", "r"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    engine = create_engine(private_postgres.url)
    deadline = time.monotonic() + 60
    with engine.connect() as conn:  # wait until the load is inside its transaction
        while time.monotonic() < deadline and loader.poll() is None:
            busy = conn.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                     "AND objid = 727275 AND granted")).scalar()  # the load's lock
            if busy:
                break
            time.sleep(0.01)
    engine.dispose()
    assert loader.poll() is None, "the load finished before PostgreSQL could be stopped"
    private_postgres.stop("fast")
    _, stderr = loader.communicate(timeout=60)
    assert loader.returncode == 1
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("recsketch: error: lost the recommendations DB")
    assert "previous run stays served" in message
    assert "s3cret-pw" not in stderr

    private_postgres.start()
    assert FaultSuite.served_rows(private_postgres.url) == served_before  # the old set, whole
    assert _cli("load", "--run-id", "r", env=env).returncode == 0  # the retry completes
    live, rows = FaultSuite.served_rows(private_postgres.url)
    assert live == "r" and rows == served_before[1]


def test_postgres_unreachable_at_start_is_a_clear_error_with_no_state(tmp_path: Path, sketchfab) -> None:
    from tools.local_airflow import free_port

    url = f"postgresql+psycopg2://recsketch:s3cret-pw@127.0.0.1:{free_port()}/recsketch"
    env = {**os.environ, "RECSKETCH_DATA_DIR": str(tmp_path / "data"), "RECSKETCH_DATABASE_URL": url,
           "RECSKETCH_SKETCHFAB_URL": sketchfab.url}
    for command in (("run",), ("crawl", "--run-id", "x"), ("load", "--run-id", "x")):
        done = _cli(*command, env=env, timeout=120)
        assert done.returncode == 1, command
        line = done.stderr.strip().splitlines()[-1]
        assert line.startswith("recsketch: error: cannot open the recommendations DB at "), line
        assert f"127.0.0.1:{url.split(':')[-1].split('/')[0]}" in line and "s3cret-pw" not in done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*"))
    assert sketchfab.requests_served == 0  # nothing was crawled


def test_disk_full_while_writing_a_chunk(tmp_path: Path, demo_catalog: Path) -> None:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        data = tmp_path / "data"
        thumbs = data / "thumbs"
        thumbs.mkdir(parents=True)
        mids = sorted(p.name.removesuffix("_thumb200.jpg") for p in (demo_catalog / "model_thumbs").glob("*.jpg"))[:40]
        for mid in mids:
            shutil.copy(demo_catalog / "model_thumbs" / f"{mid}_thumb200.jpg", thumbs / f"{mid}.jpg")
        (data / "features").symlink_to(mount)  # the chunks go to the small disk
        settings = Settings(data_dir=data, chunk_size=16, min_likes=0)
        folder = run_dir(settings, "r")
        (folder / contracts.VALID_MODELS_FILE).write_text(json.dumps(mids))
        chunk_ids = plan_stage(settings, folder)
        assert len(chunk_ids) == 3
        written, error = [], None
        for chunk_id in chunk_ids:
            try:
                extract_stage(settings, folder, chunk_id)
                written.append(chunk_id)
            except StorageFull as exc:
                error = exc
                break
        assert error is not None and len(written) >= 1, "the small disk never filled up"
        assert "disk full while writing" in str(error) and "chunk-" in str(error)
        assert "the partial file was removed" in str(error)
        files_left = sorted(p.name for p in mount.rglob("*") if p.is_file())
        assert files_left == sorted(f"chunk-{c}.npz" for c in written)  # no half chunk, no temp file
        from recsketch.features.chunks import ChunkStore
        from recsketch.features.keys import backbone_key

        store_ = ChunkStore(settings.features_dir, backbone_key(settings))
        assert all(store_.read(c) is not None for c in written)  # what was written before is intact
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


MODES = {
    "429": Faults(rate_429=1.0),
    "429-retry-after": Faults(rate_429=1.0, retry_after=1.0),
    "5xx": Faults(rate_5xx=1.0),
    "truncated": Faults(rate_truncate=1.0),
    "bad-json": Faults(rate_bad_json=1.0),
    "slow": Faults(latency_s=1.0),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_an_api_outage_in_each_fault_mode_is_survived(mode: str, demo_catalog: Path, serve, tmp_path: Path) -> None:
    """The API answers only with ``mode`` for OUTAGE_S seconds. The crawl either waits it out
    or fails with a one-line error; reruns (as Airflow's retries would) complete it, and every
    thumbnail is fetched once in all."""
    server = serve(demo_catalog)
    server.faults = MODES[mode]
    threading.Timer(OUTAGE_S, lambda: setattr(server, "faults", Faults())).start()
    env = {**os.environ, "RECSKETCH_SKETCHFAB_URL": server.url, "RECSKETCH_DATA_DIR": str(tmp_path / "data"),
           "RECSKETCH_SKETCHFAB_TOKEN": "tok-outage", "RECSKETCH_RATE_LIMIT": "0", "RECSKETCH_HTTP_RETRIES": "3"}
    attempts, deadline = [], time.monotonic() + OUTAGE_S + 240
    while time.monotonic() < deadline:
        done = _cli("crawl", "--run-id", "r", env=env, timeout=OUTAGE_S + 240)
        attempts.append(done.returncode)
        if done.returncode == 0:
            break
        line = done.stderr.strip().splitlines()[-1]
        assert line.startswith("recsketch: error:") and server.url in line and "tok-outage" not in done.stderr, line
        assert "Traceback" not in done.stderr
        time.sleep(min(5.0, OUTAGE_S / 4))
    assert attempts[-1] == 0, attempts
    engine = store.connect(f"sqlite:///{tmp_path / 'data' / 'recsketch.sqlite'}")
    with engine.connect() as conn:
        n_models = conn.execute(text("SELECT count(*) FROM models")).scalar()
        complete = conn.execute(text("SELECT count(*) FROM models WHERE likes_complete")).scalar()
    assert n_models == complete == 76
    thumbs = {k: v for k, v in server.fetches.items() if k.startswith("thumb ")}
    assert len(thumbs) == 75 and set(thumbs.values()) == {1}


def test_a_killed_crawl_under_faults_still_fetches_each_thumbnail_once(demo_catalog: Path, serve,
                                                                      tmp_path: Path) -> None:
    server = serve(demo_catalog, Faults(rate_5xx=0.2, rate_429=0.1, latency_s=0.02, seed=5))
    env = {**os.environ, "RECSKETCH_SKETCHFAB_URL": server.url, "RECSKETCH_DATA_DIR": str(tmp_path / "data"),
           "RECSKETCH_RATE_LIMIT": "0"}
    victim = subprocess.Popen([sys.executable, "-m", "recsketch.cli", "crawl", "--run-id", "r"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(k.startswith("thumb ") for k in server.fetches) < 20:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stored = {f"thumb {p.stem}" for p in (tmp_path / "data" / "thumbs").glob("*.jpg")}
    assert len(stored) >= 10
    assert _cli("crawl", "--run-id", "r", env=env).returncode == 0
    thumbs = {k: v for k, v in server.fetches.items() if k.startswith("thumb ")}
    assert len(thumbs) == 75 and {thumbs[name] for name in stored} == {1}  # stored ones were not fetched again
    assert sum(v > 1 for v in thumbs.values()) <= 8  # only downloads in flight at the kill (8 workers)
