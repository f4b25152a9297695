"""Airflow's own state kept bounded (issue 24 part 4).

Airflow 3 tasks cannot reach the metadata DB, so this runs beside the deployment, with its
``AIRFLOW_*`` environment, as the ``airflow`` command does: ``airflow db clean`` of the run
history older than ``--keep-days`` (dag runs, task instances and their history, XComs, the audit
log, jobs, asset events; Airflow keeps each DAG's latest run whatever its age, and purges
without an archive table), then the task log files older than that under
``[logging] base_log_folder``.

    python -m tools.airflow_maintenance [--keep-days 30] [--dry-run]
    make airflow-clean          # the local Airflow of `make airflow`

The compose stack runs it once a day as the ``airflow-maintenance`` service.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

TABLES = ("dag_run", "task_instance", "task_instance_history", "task_reschedule", "xcom", "log", "job",
          "asset_event", "import_error")
KEEP_DAYS = 30


def airflow(env: Mapping[str, str], *args: str) -> str:
    done = subprocess.run([_airflow_bin(env), *args], env=dict(env), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def _airflow_bin(env: Mapping[str, str]) -> str:
    beside = Path(sys.executable).with_name("airflow")  # the venv's, when PATH does not name it
    return str(beside) if beside.exists() else "airflow"


def log_folder(env: Mapping[str, str]) -> Path:
    """``[logging] base_log_folder``: the value is the last line (Airflow may log to stdout first)."""
    return Path(airflow(env, "config", "get-value", "logging", "base_log_folder").strip().splitlines()[-1].strip())


def clean(env: Mapping[str, str], before: datetime, *, dry_run: bool = False) -> dict:
    """Purge the metadata DB's history and the task logs older than ``before``."""
    airflow(env, "db", "clean", "--clean-before-timestamp", before.isoformat(), "--tables", ",".join(TABLES),
            "--skip-archive", "--yes", "--error-on-cleanup-failure", *(["--dry-run"] if dry_run else []))
    logs = log_folder(env)
    removed = 0
    if logs.is_dir():
        cutoff = before.timestamp()
        for path in sorted(logs.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_symlink():  # "latest" links: Airflow points them anew
                continue
            if path.is_file() and path.stat().st_mtime < cutoff:
                removed += 1
                if not dry_run:
                    path.unlink(missing_ok=True)
            elif path.is_dir() and not dry_run and not any(path.iterdir()):
                path.rmdir()  # a run's folder whose logs all went
    return {"before": before.isoformat(), "tables": list(TABLES), "log_files_removed": removed, "dry_run": dry_run}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-days", type=float, default=KEEP_DAYS,
                        help=f"days of run history and task logs kept (default {KEEP_DAYS})")
    parser.add_argument("--dry-run", action="store_true", help="show what would be purged, purge nothing")
    args = parser.parse_args(argv)
    if args.keep_days < 1:  # `job` rows go by their last heartbeat: a cut that recent purges the live scheduler's
        parser.error(f"--keep-days {args.keep_days}: at least 1 (a cut newer than the running components' "
                     "heartbeats would purge their job rows, and the scheduler stops scheduling)")
    result = clean(os.environ, datetime.now(UTC) - timedelta(days=args.keep_days), dry_run=args.dry_run)
    print(f"airflow maintenance: history before {result['before']} purged from {', '.join(result['tables'])}"
          f"{' (dry run)' if args.dry_run else ''}; {result['log_files_removed']} task log files "
          f"{'would be ' if args.dry_run else ''}removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
