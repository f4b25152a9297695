"""The process-fault suite, short: a few seeded SIGKILLs per stage (``make faults`` runs 20)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsketch import storage
from tests.fault_suite import STAGES, FaultSuite

KILLS = int(os.environ.get("RECSKETCH_TEST_FAULT_KILLS", "3"))
pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultSuite]:
    suite = FaultSuite(tmp_path_factory.mktemp("faults"), seed=int(os.environ.get("RECSKETCH_TEST_FAULT_SEED", "0")))
    try:
        suite.setup()
        yield suite
    finally:
        suite.close()


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_then_rerun_equals_an_uninterrupted_run(suite: FaultSuite, stage: str) -> None:
    report = suite.run_stage(stage, KILLS)
    assert report.problems == []
    assert (report.kills, report.recoveries, report.differences) == (KILLS, KILLS, 0), report.line()
    assert report.redone == 0 and report.leftovers == 0, report.line()
    if stage == "load":  # at least one kill landed inside the load's transaction, by construction
        assert report.in_transaction >= 1, report.line()
    if stage == "gc":  # and one with some of a folder deleted, the rest not
        assert report.mid_work >= 1, report.line()


def test_a_kill_after_the_new_last_result_is_published_recovers_to_it(suite: FaultSuite) -> None:
    report = suite.recover_after_publish()
    assert report.problems == []
    assert (report.recoveries, report.mid_work, report.leftovers) == (1, 1, 0), report.line()


def test_a_killed_writer_leaves_only_a_temp_file_that_the_next_stage_sweeps(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys


    code = ("import sys, time\nfrom pathlib import Path\nfrom recsketch import storage\n"
            "with storage.atomic_write(Path(sys.argv[1])) as h:\n"
            "    h.write(b'half'); h.flush(); print('ok', flush=True)"
            "; time.sleep(60)\n")
    target = tmp_path / "chunk-x.npz"
    victim = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert victim.stdout.readline().strip() == "ok"
    assert storage.sweep_stale_temps(tmp_path) == 0  # the writer is alive: its temp file stays
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not target.exists() and len(list(tmp_path.glob(".*.tmp"))) == 1
    assert storage.sweep_stale_temps(tmp_path) == 1 and list(tmp_path.iterdir()) == []
