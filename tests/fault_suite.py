"""Process faults: SIGKILL each stage at seeded random moments, rerun it, compare with an
uninterrupted run.

For every stage (crawl, extract, similarity, incremental, load, gc) the suite runs the stage's real command
(``recsketch <stage> --run-id r``) from a prepared state, kills it with SIGKILL after a delay
drawn by a seeded generator from [0, the stage's uninterrupted wall time), checks what the
kill left (the served recommendations are complete; finished chunks and thumbnails are
recorded), reruns the stage to completion and compares its output with the reference:
byte-equal thumbnails and catalogue rows, equal features, equal top-k, equal served rows;
nothing a finished step produced is redone, nothing is duplicated, no temp file is left.

    python -m tests.fault_suite --kills 20     # `make faults`; prints one line per stage
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import create_engine, text

from recsketch import contracts, storage
from recsketch.config import Settings
from recsketch.features.chunks import Chunk, ChunkStore
from recsketch.features.keys import backbone_key
from recsketch.likes_fit import LATEST_FILE
from recsketch.psv import write_psv
from recsketch.sketchfab.server import Faults, start_in_thread

PG_ADMIN_URL = os.environ.get("RECSKETCH_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
STAGES = ("crawl", "extract", "similarity", "incremental", "hybrid", "load", "gc")
COMMANDS = {"incremental": "similarity"}  # the similarity step, working the last result forward
RUN_ID = "r"


@dataclass
class StageReport:
    stage: str
    kills: int = 0
    recoveries: int = 0
    differences: int = 0
    mid_work: int = 0  # kills after the stage had produced something (a file, a row)
    redone: int = 0  # finished items produced again by the rerun
    leftovers: int = 0  # temp files or staging tables left after recovery
    in_transaction: int = 0  # load: kills while the load held its lock, inside its transaction
    reference_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.stage}: {self.kills} kills, {self.recoveries} recoveries, {self.differences} differences "
                f"({self.mid_work} after first output, "
                + (f"{self.in_transaction} inside the load's transaction, " if self.stage == "load" else "")
                + f"{self.redone} finished items redone, "
                f"{self.leftovers} leftovers; uninterrupted {self.reference_s:.1f}s)")


def _arrays(path: Path, names: tuple[str, ...] = ("mids", "indices", "scores")) -> dict[str, np.ndarray]:
    """Copies of a top-k file's arrays (or of ``names``), to compare a later state with."""
    with np.load(path) as data:
        return {name: data[name].copy() for name in names}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")] if folder.exists() else []


class Databases:
    """Throwaway PostgreSQL databases, all dropped at the end."""

    def __init__(self) -> None:
        self.admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        self.prefix = f"recsketch_faults_{uuid.uuid4().hex[:6]}"
        self.names: list[str] = []

    def create(self, template: str | None = None) -> tuple[str, str]:
        name = f"{self.prefix}_{len(self.names)}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
        self.names.append(name)
        return name, self.admin.url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self.admin.connect() as conn:
            for name in self.names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()


def build_catalog(folder: Path, n_models: int, seed: int = 0) -> None:
    """``n_models`` thumbnails (variants of the offline photos) each liked by 6 of 30 users."""
    from recsketch.demo import PHOTOS, VARIANTS, load_photo, variant

    rng = random.Random(seed)
    thumbs = folder / "model_thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    photos = {name: load_photo(name) for name in PHOTOS}
    users = [f"u{n:02d}" for n in range(30)]
    models, likes = [], []
    for n in range(n_models):
        mid = f"{rng.getrandbits(128):032x}"
        photo = PHOTOS[n % len(PHOTOS)]
        variant(photos[photo], VARIANTS[rng.randrange(len(VARIANTS))], rng).save(thumbs / f"{mid}_thumb200.jpg",
                                                                                 quality=85)
        models.append((f"{photo} {n}", mid))
        likes += [(f"{photo} {n}", mid, uid) for uid in rng.sample(users, 6)]
    write_psv(folder / "model_urls.psv", ("name", "mid"), models)
    write_psv(folder / "model_likes_anon.psv", ("modelname", "mid", "uid"), likes)


class FaultSuite:
    def __init__(self, workdir: Path, *, seed: int = 0, n_models: int = 240, n_synthetic: int = 20_000,
                 log: Callable[[str], None] = print) -> None:
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.n_models, self.n_synthetic = n_models, n_synthetic
        self.log = log
        self.dbs = Databases()
        self.server = None
        self.reference: dict[str, float] = {}

    # --- plumbing ------------------------------------------------------------------------------
    def env(self, data_dir: Path, db_url: str) -> dict[str, str]:
        return {**os.environ, "RECSKETCH_SKETCHFAB_URL": self.server.url, "RECSKETCH_DATA_DIR": str(data_dir),
                "RECSKETCH_DATABASE_URL": db_url, "RECSKETCH_CHUNK_SIZE": "16", "RECSKETCH_CRAWL_WORKERS": "4",
                "RECSKETCH_RATE_LIMIT": "0", "RECSKETCH_TOP_K": "10", "RECSKETCH_SIMILARITY_SHARD_ROWS": "4000"}

    @staticmethod
    def command(stage: str) -> list[str]:
        if stage == "gc":  # retention runs over the data dir, not one run
            return [sys.executable, "-m", "recsketch.cli", "gc"]
        return [sys.executable, "-m", "recsketch.cli", COMMANDS.get(stage, stage), "--run-id", RUN_ID]

    def run(self, stage: str, env: dict[str, str]) -> float:
        started = time.monotonic()
        done = subprocess.run(self.command(stage), env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"recsketch {stage} failed: {done.stderr[-3000:]}")
        return time.monotonic() - started

    def kill_during(self, stage: str, env: dict[str, str], delay: float) -> tuple[bool, bool]:
        """Start the stage, SIGKILL it after ``delay``: (killed, inside the load's transaction).
        Not killed: it had finished, and the stage's reference time shrinks to what it took,
        so later delays land inside it."""
        started = time.monotonic()
        victim = subprocess.Popen(self.command(stage), env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            victim.wait(delay)
            self.reference[stage] = min(self.reference[stage], time.monotonic() - started)
            return False, False
        except subprocess.TimeoutExpired:
            in_transaction = stage == "load" and self._load_lock_held(env["RECSKETCH_DATABASE_URL"])
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            return True, in_transaction

    def kill_inside_load_transaction(self, env: dict[str, str]) -> tuple[bool, bool]:
        """Start a load and SIGKILL it the moment its transaction holds the lock: a kill that is
        known to land inside the transaction, whatever the machine's speed."""
        victim = subprocess.Popen(self.command("load"), env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + max(30.0, 5 * self.reference["load"])
        try:
            while victim.poll() is None and time.monotonic() < deadline:
                if self._load_lock_held(env["RECSKETCH_DATABASE_URL"]):
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
                    return True, True
                time.sleep(0.005)
            return False, False
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait()

    @staticmethod
    def _load_lock_held(db_url: str) -> bool:
        """Whether a load holds its advisory lock, i.e. is inside its transaction, right now."""
        engine = create_engine(db_url)
        with engine.connect() as conn:
            held = conn.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                     "AND objid = 727275 AND granted")).scalar()
        engine.dispose()
        return bool(held)

    # --- setup: the uninterrupted reference of every stage --------------------------------------
    def setup(self) -> None:
        catalog = self.workdir / "catalog"
        build_catalog(catalog, self.n_models)
        self.server = start_in_thread(catalog, faults=Faults(latency_s=0.01))
        self.ref_dir = self.workdir / "ref"
        self.ref_db_name, self.ref_db = self.dbs.create()
        env = self.env(self.ref_dir, self.ref_db)
        self.reference["crawl"] = self.run("crawl", env)
        self.ref_catalogue = self.catalogue_state(self.ref_db, self.ref_dir)
        self.run("threshold", env)
        self.run("plan", env)
        self.plan_snapshot = self.workdir / "plan-snapshot"
        shutil.copytree(self.ref_dir / "runs", self.plan_snapshot)
        self.reference["extract"] = self.run("extract", env)
        self.ref_features = self.features_state(self.ref_dir)
        self.setup_synthetic()

    def setup_synthetic(self) -> None:
        """Similarity and load run on 20,000 random 256-d items: long enough to be killed mid-way."""
        rng = np.random.default_rng(7)
        mids = [f"{i:032x}" for i in range(self.n_synthetic)]
        features = rng.standard_normal((self.n_synthetic, 256)).astype(np.float32)
        self.syn_dir = self.workdir / "synthetic"
        chunks = ChunkStore(Settings(data_dir=self.syn_dir).features_dir, backbone_key(Settings()))
        for first in range(0, self.n_synthetic, 2000):
            part = mids[first:first + 2000]
            chunks.write(Chunk(f"{first:06d}", part, features[first:first + 2000], {}))
        (self.syn_dir / "runs" / RUN_ID).mkdir(parents=True)
        (self.syn_dir / "runs" / RUN_ID / "valid_models.json").write_text(json.dumps(mids))
        self.syn_db_name, syn_db = self.dbs.create()
        env = self.env(self.syn_dir, syn_db)
        self.reference["similarity"] = self.run("similarity", env)
        with np.load(self.syn_dir / "runs" / RUN_ID / "topk.npz") as data:
            self.ref_topk = {k: data[k].copy() for k in ("mids", "indices", "scores")}
        self.setup_incremental(mids)
        self.setup_hybrid(mids)
        # a previous run is live before the loads under test: it must stay served through a kill
        shutil.copytree(self.syn_dir / "runs" / RUN_ID, self.syn_dir / "runs" / "previous")
        subprocess.run([sys.executable, "-m", "recsketch.cli", "load", "--run-id", "previous"], env=env,
                       check=True, capture_output=True)
        with self.dbs.admin.connect() as conn:  # the template of every load round
            conn.execute(text(f'CREATE DATABASE "{self.syn_db_name}_tpl" TEMPLATE "{self.syn_db_name}"'))
        self.dbs.names.append(f"{self.syn_db_name}_tpl")
        self.reference["load"] = self.run("load", env)
        self.ref_served = self.served_rows(syn_db)
        self.setup_gc()

    def setup_incremental(self, mids: list[str]) -> None:
        """The last exact result over mids[1000:], then a day that adds mids[:1000] and loses the
        last 500: the similarity step works it forward, and a kill must leave either result."""
        base = self.workdir / "incremental-base"
        shutil.copytree(self.syn_dir / "features", base / "features", copy_function=os.link)
        for latest in (base / "features").rglob(contracts.LATEST_TOPK_FILE):
            latest.unlink()
        (base / "runs" / RUN_ID).mkdir(parents=True)
        (base / "runs" / RUN_ID / "valid_models.json").write_text(json.dumps(mids[1000:]))
        self.run("similarity", self.env(base, f"sqlite:///{base / 'unused.sqlite'}"))
        self.incremental_base = base
        self.incremental_valid = mids[:-500]
        self.previous_latest = next((base / "features").rglob(contracts.LATEST_TOPK_FILE)).read_bytes()
        reference = self.workdir / "incremental-reference"
        self.reference["incremental"] = self.run("incremental", self._prepare_incremental(reference))
        plan = json.loads((reference / "runs" / RUN_ID / "similarity_plan.json").read_text())
        if plan["mode"] != "incremental":
            raise RuntimeError(f"the incremental reference ran {plan['mode']!r}, not incremental")
        self.ref_incremental = _arrays(reference / "runs" / RUN_ID / "topk.npz")
        if self._latest(reference).read_bytes() == self.previous_latest:
            raise RuntimeError("the incremental reference did not replace the last result")
        self.ref_latest = _arrays(self._latest(reference))  # the deep lists, not the served ones

    def setup_hybrid(self, mids: list[str]) -> None:
        """The last hybrid lists with their ALS fit over mids[1000:] (the incremental base), then
        the day that adds mids[:1000] and loses the last 500: the hybrid step folds the new
        models into the kept fit and works the lists forward; a kill must leave either state."""
        rng = np.random.default_rng(11)
        self.hybrid_likes = pd.DataFrame({"mid": np.repeat(mids, 6),
                                          "uid": [f"u{u}" for u in rng.integers(0, 2000, 6 * len(mids))]})
        base = self.workdir / "hybrid-base"
        shutil.copytree(self.incremental_base / "features", base / "features", copy_function=os.link)
        env = self._hybrid_run(base, mids[1000:])
        self.run("similarity", env)
        self.run("hybrid", env)
        self.hybrid_base = base
        self.previous_hybrid = self._hybrid_latest(base).read_bytes()
        reference = self.workdir / "hybrid-reference"
        self.reference["hybrid"] = self.run("hybrid", self._prepare_hybrid(reference))
        plan = json.loads((reference / "runs" / RUN_ID / "hybrid_plan.json").read_text())
        if plan["mode"] != "incremental":
            raise RuntimeError(f"the hybrid reference ran {plan['mode']!r}, not incremental (the fit kept)")
        self.ref_hybrid = _arrays(reference / "runs" / RUN_ID / "topk-hybrid.npz")
        self.ref_hybrid_latest = _arrays(self._hybrid_latest(reference), ("mids", "indices", "scores", "rows"))

    def _hybrid_run(self, round_dir: Path, valid: list[str]) -> dict[str, str]:
        """A run folder of ``valid`` models with their likes and a report that chose ALS at 0.5."""
        folder = round_dir / "runs" / RUN_ID
        folder.mkdir(parents=True)
        (folder / "valid_models.json").write_text(json.dumps(valid))
        contracts.RunLikes.write(folder, self.hybrid_likes[self.hybrid_likes["mid"].isin(set(valid))])
        contracts.EvaluationReport({"hybrid": {"cf_weight": 0.5, "likes": "als"},
                                    "als": {"params": {"factors": 8, "iterations": 4}}}).write(folder)
        return {**self.env(round_dir, f"sqlite:///{round_dir / 'unused.sqlite'}"), "RECSKETCH_ALS_REFIT_DRIFT": "0.5"}

    @staticmethod
    def _hybrid_latest(round_dir: Path) -> Path:
        return next((round_dir / "features").rglob(LATEST_FILE))

    @staticmethod
    def _latest(round_dir: Path) -> Path:
        return next((round_dir / "features").rglob(contracts.LATEST_TOPK_FILE))

    # --- states compared with the reference ---------------------------------------------------
    @staticmethod
    def catalogue_state(db_url: str, data_dir: Path) -> dict:
        engine = create_engine(db_url)
        with engine.connect() as conn:
            models = sorted(conn.execute(text(
                "SELECT mid, name, like_count, thumbnail_status, likes_complete FROM models")).all())
            likes = sorted(conn.execute(text("SELECT mid, uid FROM likes")).all())
        engine.dispose()
        thumbs = {p.name: _sha(p) for p in (data_dir / "thumbs").glob("*.jpg")}
        return {"models": models, "likes": likes, "thumbs": thumbs}

    @staticmethod
    def features_state(data_dir: Path) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {}
        for path in sorted((data_dir / "features").rglob("chunk-*.npz")):
            with np.load(path) as data:
                for mid, row in zip(storage.texts(data["mids"]), data["features"], strict=True):
                    if mid in state:
                        raise AssertionError(f"{mid} has features in two chunks")
                    state[mid] = row.copy()
        return state

    @staticmethod
    def served_rows(db_url: str) -> tuple[str | None, list]:
        engine = create_engine(db_url)
        with engine.connect() as conn:
            live = conn.execute(text("SELECT run_id FROM runs WHERE is_live")).scalars().all()
            rows = sorted(conn.execute(text("SELECT mid, rank, similar_mid, round(score::numeric, 5) "
                                            "FROM similar_models")).all())
        engine.dispose()
        if len(live) != 1:
            raise AssertionError(f"{len(live)} live runs")
        return live[0], rows

    # --- the rounds --------------------------------------------------------------------------
    def run_stage(self, stage: str, kills: int) -> StageReport:
        report = StageReport(stage, reference_s=self.reference[stage])
        attempts = 0
        while report.kills < kills and attempts < kills * 4:
            attempts += 1
            delay = self.rng.uniform(0, self.reference[stage])
            round_dir = self.workdir / f"{stage}-{attempts}"
            env = getattr(self, f"_prepare_{stage}")(round_dir)
            if stage == "load" and report.kills == kills - 1 and not report.in_transaction:
                # no random delay landed inside the transaction yet: the last kill goes there
                killed, in_transaction = self.kill_inside_load_transaction(env)
            elif stage == "gc" and report.kills == kills - 1 and not report.mid_work:
                killed, in_transaction = self.kill_mid_collection(round_dir, env), False  # likewise
            else:
                killed, in_transaction = self.kill_during(stage, env, delay)
            if not killed:
                shutil.rmtree(round_dir, ignore_errors=True)
                continue
            report.kills += 1
            report.in_transaction += in_transaction
            try:
                getattr(self, f"_recover_{stage}")(round_dir, env, report)
                report.recoveries += 1
            except AssertionError as exc:
                report.differences += 1
                report.problems.append(f"kill {report.kills} at {delay:.2f}s: {exc}")
            except RuntimeError as exc:
                report.problems.append(f"kill {report.kills} at {delay:.2f}s: no recovery: {exc}")
            shutil.rmtree(round_dir, ignore_errors=True)
        self.log(report.line())
        for problem in report.problems:
            self.log("  " + problem)
        return report

    # crawl: from nothing; the rerun must not fetch a thumbnail that was already stored
    def _prepare_crawl(self, round_dir: Path) -> dict[str, str]:
        _, url = self.dbs.create()
        return self.env(round_dir, url)

    def _recover_crawl(self, round_dir: Path, env: dict[str, str], report: StageReport) -> None:
        thumbs = round_dir / "thumbs"
        kept = {p.name: p.stat().st_mtime_ns for p in thumbs.glob("*.jpg")} if thumbs.exists() else {}
        report.mid_work += bool(kept)
        before = dict(self.server.fetches)
        self.run("crawl", env)
        fetched_again = [name for name in kept if self.server.fetches[f"thumb {name.removesuffix('.jpg')}"]
                         > before.get(f"thumb {name.removesuffix('.jpg')}", 0)]
        changed = [n for n, m in kept.items() if (thumbs / n).stat().st_mtime_ns != m]
        report.redone += len(set(fetched_again) | set(changed))
        report.leftovers += len(_temps(round_dir))
        state = self.catalogue_state(env["RECSKETCH_DATABASE_URL"], round_dir)
        for key in ("models", "likes", "thumbs"):
            if state[key] != self.ref_catalogue[key]:
                raise AssertionError(f"crawl {key} differ from the uninterrupted run")
        if fetched_again or changed:
            raise AssertionError(f"thumbnails redone: {sorted(set(fetched_again) | set(changed))[:5]}")

    # extract: from the reference plan; finished chunks must survive untouched
    def _prepare_extract(self, round_dir: Path) -> dict[str, str]:
        round_dir.mkdir(parents=True)
        shutil.copytree(self.plan_snapshot, round_dir / "runs")
        (round_dir / "thumbs").symlink_to(self.ref_dir / "thumbs")
        return self.env(round_dir, f"sqlite:///{round_dir / 'unused.sqlite'}")

    def _recover_extract(self, round_dir: Path, env: dict[str, str], report: StageReport) -> None:
        chunks = list((round_dir / "features").rglob("chunk-*.npz"))
        finished = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in chunks}
        report.mid_work += bool(finished)
        self.run("extract", env)
        redone = [p for p, stamp in finished.items() if (p.stat().st_ino, p.stat().st_mtime_ns) != stamp]
        report.redone += len(redone)
        report.leftovers += len(_temps(round_dir / "features"))
        state = self.features_state(round_dir)
        if set(state) != set(self.ref_features):
            raise AssertionError(f"{len(set(state) ^ set(self.ref_features))} models differ in having features")
        worst = max(float(np.abs(state[m] - self.ref_features[m]).max()) for m in state)
        if worst > 1e-5:
            raise AssertionError(f"features differ from the uninterrupted run by up to {worst:.2e}")
        if redone:
            raise AssertionError(f"{len(redone)} finished chunks were written again")

    # similarity: from the synthetic features; the result must equal the reference top-k
    def _prepare_similarity(self, round_dir: Path) -> dict[str, str]:
        round_dir.mkdir(parents=True)
        shutil.copytree(self.syn_dir / "features", round_dir / "features", copy_function=os.link)
        for latest in (round_dir / "features").rglob(contracts.LATEST_TOPK_FILE):
            latest.unlink()  # hard links: unlinking leaves the reference's own file alone
        (round_dir / "runs" / RUN_ID).mkdir(parents=True)
        shutil.copy(self.syn_dir / "runs" / RUN_ID / "valid_models.json", round_dir / "runs" / RUN_ID)
        return self.env(round_dir, f"sqlite:///{round_dir / 'unused.sqlite'}")

    def _recover_similarity(self, round_dir: Path, env: dict[str, str], report: StageReport) -> None:
        report.mid_work += any((round_dir / "runs" / RUN_ID).glob("similarity-*"))
        self._rerun_and_compare("similarity", round_dir, env, report, self.ref_topk)

    def _rerun_and_compare(self, stage: str, round_dir: Path, env: dict[str, str], report: StageReport,
                           reference: dict[str, np.ndarray], name: str = contracts.TOPK_FILE) -> None:
        """Rerun the stage; its top-k (``name``) must equal the uninterrupted run's, with no temp file left."""
        self.run(stage, env)
        report.leftovers += len(_temps(round_dir))
        with np.load(round_dir / "runs" / RUN_ID / name) as data:
            for key, expected in reference.items():
                if not np.array_equal(data[key], expected):
                    raise AssertionError(f"top-k {key} differ from the uninterrupted {stage} run")

    @staticmethod
    def _old_or_new(path: Path, previous: bytes, new: dict[str, np.ndarray], report: StageReport, what: str) -> None:
        """After a kill the kept state at ``path`` is the previous bytes or the finished new arrays."""
        if path.read_bytes() != previous:  # replaced: then it must be the finished new state
            report.mid_work += 1
            with np.load(path) as data:
                if not all(np.array_equal(data[k], v) for k, v in new.items()):
                    raise AssertionError(f"the kill left {what} that is neither the old nor the new one")

    # incremental: the last result worked forward; a kill leaves the old or the new last result whole
    def _prepare_incremental(self, round_dir: Path) -> dict[str, str]:
        round_dir.mkdir(parents=True)
        shutil.copytree(self.incremental_base / "features", round_dir / "features", copy_function=os.link)
        (round_dir / "runs" / RUN_ID).mkdir(parents=True)
        (round_dir / "runs" / RUN_ID / "valid_models.json").write_text(json.dumps(self.incremental_valid))
        return self.env(round_dir, f"sqlite:///{round_dir / 'unused.sqlite'}")

    def _recover_incremental(self, round_dir: Path, env: dict[str, str], report: StageReport) -> None:
        self._old_or_new(self._latest(round_dir), self.previous_latest, self.ref_latest, report, "a last result")
        self._rerun_and_compare("incremental", round_dir, env, report, self.ref_incremental)

    # hybrid: the last hybrid lists worked forward with the fit kept; a kill leaves the old or new state whole
    def _prepare_hybrid(self, round_dir: Path) -> dict[str, str]:
        round_dir.mkdir(parents=True)
        shutil.copytree(self.hybrid_base / "features", round_dir / "features", copy_function=os.link)
        env = self._hybrid_run(round_dir, self.incremental_valid)
        self.run("similarity", env)  # the day's visual lists, uninterrupted: the kill is the hybrid step's
        return env

    def _recover_hybrid(self, round_dir: Path, env: dict[str, str], report: StageReport) -> None:
        self._old_or_new(self._hybrid_latest(round_dir), self.previous_hybrid, self.ref_hybrid_latest, report,
                         "a hybrid state")
        self._rerun_and_compare("hybrid", round_dir, env, report, self.ref_hybrid, "topk-hybrid.npz")

    def recover_after_publish(self) -> StageReport:
        """The window a random kill rarely hits: the incremental run has replaced the last result
        and written its run files, then dies. The round must pass as the new result, and the
        rerun (worked forward from that new result) must serve what the uninterrupted run did."""
        report = StageReport("incremental-after-publish", reference_s=self.reference["incremental"])
        round_dir = self.workdir / "incremental-after-publish"
        env = self._prepare_incremental(round_dir)
        reference = self.workdir / "incremental-reference"
        latest = self._latest(round_dir)
        latest.unlink()  # a hard link to the base's file: unlink, never write through it
        shutil.copy(self._latest(reference), latest)
        for name in (contracts.TOPK_FILE, contracts.DEEP_TOPK_FILE, "similarity_plan.json"):
            shutil.copy(reference / "runs" / RUN_ID / name, round_dir / "runs" / RUN_ID / name)
        report.kills += 1
        try:
            self._recover_incremental(round_dir, env, report)
            report.recoveries += 1
        except AssertionError as exc:
            report.differences += 1
            report.problems.append(str(exc))
        shutil.rmtree(round_dir, ignore_errors=True)
        self.log(report.line())
        return report

    # load: "previous" is live; a kill must leave one complete run served, the rerun the new one
    def _prepare_load(self, round_dir: Path) -> dict[str, str]:
        _, url = self.dbs.create(template=f"{self.syn_db_name}_tpl")
        (round_dir / "runs" / RUN_ID).mkdir(parents=True)
        shutil.copy(self.syn_dir / "runs" / RUN_ID / "topk.npz", round_dir / "runs" / RUN_ID)
        return self.env(round_dir, url)

    def _recover_load(self, round_dir: Path, env: dict[str, str], report: StageReport) -> None:
        url = env["RECSKETCH_DATABASE_URL"]
        live, rows = self.served_rows(url)  # after the kill: one complete run, old or new
        report.mid_work += live == RUN_ID
        if live not in ("previous", RUN_ID) or len(rows) != len(self.ref_served[1]):
            raise AssertionError(f"after the kill {live!r} is served with {len(rows)} rows")
        self.run("load", env)
        live, rows = self.served_rows(url)
        engine = create_engine(url)
        with engine.connect() as conn:
            staging = conn.execute(text("SELECT to_regclass('recommendations_staging')")).scalar()
            total = conn.execute(text("SELECT count(*) FROM recommendations")).scalar()
        engine.dispose()
        report.leftovers += staging is not None
        if live != RUN_ID or rows != self.ref_served[1]:
            raise AssertionError("the served recommendations differ from the uninterrupted run")
        if total != len(rows):
            raise AssertionError(f"{total} rows stored for {len(rows)} served: duplicates")

    # gc: nine of twelve loaded runs past RECSKETCH_KEEP_RUNS=3; a kill must leave every kept run
    # whole, and the rerun the state of an uninterrupted collection
    GC_RUNS, GC_KEEP, GC_FILES = 12, 3, 300

    def setup_gc(self) -> None:
        from datetime import UTC, datetime, timedelta

        from recsketch import retention
        from recsketch.db import store

        self.gc_template = self.workdir / "gc-template"
        self.gc_db_name, url = self.dbs.create()
        settings = Settings(data_dir=self.gc_template, database_url=url)
        engine = store.connect(url)
        now = datetime.now(UTC)
        mids = [f"{i:032x}" for i in range(self.GC_FILES)]
        for day in range(self.GC_RUNS):
            name = f"scheduled__day{day:02d}"
            folder = settings.run_dir(name)
            contracts.ValidModels({mid: "v1" for mid in mids}).write(folder)
            shards = [(i, i + 1) for i in range(len(mids))]
            plan = contracts.SimilarityPlan(contracts.PlanMode.FULL, mids, shards=shards)
            plan.write(folder)
            for first, last in plan.shards:
                plan.write_shard(folder, first, last, np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32))
            retention.register(engine, name, retention.Kind.RECOMMENDATIONS, now - timedelta(days=self.GC_RUNS - day))
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO runs VALUES (:r, 'key', 1, 1, :t, :live)"),
                             {"r": name, "t": now, "live": day == 1})  # an old run is live: it stays
                conn.execute(text("INSERT INTO run_metrics VALUES (:r, 'visual', 'ndcg@10', 'warm', 0.5, :t)"),
                             {"r": name, "t": now})
            retention.finish(engine, name)
        engine.dispose()
        with self.dbs.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.gc_db_name}_tpl" TEMPLATE "{self.gc_db_name}"'))
        self.dbs.names.append(f"{self.gc_db_name}_tpl")
        self.gc_before = self.gc_state(self.gc_template, url)
        reference = self.workdir / "gc-reference"
        env = self._prepare_gc(reference)
        self.reference["gc"] = self.run("gc", env)
        self.gc_after = self.gc_state(reference, env["RECSKETCH_DATABASE_URL"])
        kept = {f"scheduled__day{day:02d}" for day in (1, *range(self.GC_RUNS - self.GC_KEEP, self.GC_RUNS))}
        if set(self.gc_after["folders"]) != kept:
            raise RuntimeError(f"the reference collection kept {sorted(self.gc_after['folders'])}, not {sorted(kept)}")

    @staticmethod
    def gc_state(data_dir: Path, db_url: str) -> dict:
        """Each run folder's files and their digests, and the rows retention touches."""
        folders = {p.name: {f.name: _sha(f) for f in sorted(p.iterdir())}
                   for p in sorted((data_dir / "runs").iterdir())}
        engine = create_engine(db_url)
        with engine.connect() as conn:
            rows = {table: sorted(conn.execute(text(f"SELECT run_id FROM {table}")).scalars())
                    for table in ("runs", "run_metrics")}
            rows["run_folders"] = sorted(conn.execute(text("SELECT folder FROM run_folders")).scalars())
        engine.dispose()
        return {"folders": folders, **rows}

    def _prepare_gc(self, round_dir: Path) -> dict[str, str]:
        _, url = self.dbs.create(template=f"{self.gc_db_name}_tpl")
        shutil.copytree(self.gc_template, round_dir, copy_function=os.link)  # unlinking a link spares the template
        return {**self.env(round_dir, url), "RECSKETCH_KEEP_RUNS": str(self.GC_KEEP)}

    def kill_mid_collection(self, round_dir: Path, env: dict[str, str]) -> bool:
        """SIGKILL a collection the moment the first doomed folder has lost a file, not all."""
        first = round_dir / "runs" / "scheduled__day00"
        whole = len(list(first.iterdir()))
        victim = subprocess.Popen(self.command("gc"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while victim.poll() is None and time.monotonic() < deadline:
                try:
                    if len(os.listdir(first)) < whole:
                        victim.send_signal(signal.SIGKILL)
                        victim.wait()
                        return True
                except FileNotFoundError:
                    break  # the whole folder went between two looks: a later kill tries again
                time.sleep(0.0005)
            return False
        finally:
            if victim.poll() is None:
                victim.kill()
            victim.wait()

    def _recover_gc(self, round_dir: Path, env: dict[str, str], report: StageReport) -> None:
        url = env["RECSKETCH_DATABASE_URL"]
        after_kill = self.gc_state(round_dir, url)
        for name, files in self.gc_after["folders"].items():  # every kept run whole through the kill: what
            left = after_kill["folders"].get(name) or {}  # it keeps, unchanged, and at most its working files less
            before = self.gc_before["folders"][name]
            if not (files.items() <= left.items() <= before.items()):
                raise AssertionError(f"the kill damaged {name}, a run retention keeps")
        touched = [name for name, files in after_kill["folders"].items() if files != self.gc_before["folders"][name]]
        report.mid_work += bool(touched) or len(after_kill["folders"]) < len(self.gc_before["folders"])
        self.run("gc", env)
        if self.gc_state(round_dir, url) != self.gc_after:
            raise AssertionError("after the rerun the data dir or the DB differs from an uninterrupted collection")
        report.leftovers += len(_temps(round_dir))

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.dbs.drop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="kills per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="recsketch-faults-") as tmp:
        suite = FaultSuite(Path(tmp), seed=args.seed)
        try:
            suite.setup()
            reports = [suite.run_stage(stage, args.kills) for stage in args.stages]
        finally:
            suite.close()
    bad = [r for r in reports if r.kills != args.kills or r.recoveries != r.kills or r.differences or r.redone]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
