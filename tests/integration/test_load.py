"""Load, short: 50 concurrent clients for a few seconds on the gallery endpoint (through a
real Airflow api-server) and on ``similar_models``; ``make faults`` runs 60 s. No timing is
asserted: the figures are printed and kept in the README; errors must be zero."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.load_suite import describe, run_load

pytestmark = pytest.mark.faults


def test_fifty_clients_get_answers_and_no_errors(tmp_path: Path) -> None:
    report = run_load(tmp_path, clients=50, seconds=float(os.environ.get("RECSKETCH_TEST_LOAD_S", "5")))
    print(describe(report))
    for name, result in report.items():
        assert result["errors"] == 0, describe(report)
        assert result["requests"] > 50, name  # every client got answers
