# ruff: noqa: E501  (the log lines are as Airflow writes them)
"""make demo's report: one line per stage from the task logs, mapped tasks summed."""

from __future__ import annotations

from pathlib import Path

from tools.demo_report import report

LOG = """\
2026-12-01T09:26:40Z [info     ] crawl summary: {"models": 76, "likes": 616, "thumbnails_ok": 75, "thumbnails_missing": 1} [recsketch.stages]
2026-12-01T09:26:40Z [info     ] crawl: done in 1.900 s [recsketch.stages]
2026-12-01T09:26:48Z [info     ] threshold summary: {"valid_models": 72, "with_thumbnail": 75, "likes": 610} [recsketch.stages]
2026-12-01T09:26:49Z [info     ] plan_chunks summary: ["c1", "c2"] [recsketch.stages]
2026-12-01T09:26:54Z [info     ] extract summary: {"chunk_id": "c1", "chunks": 1, "images": 40, "failed": 1, "images_per_s": 120.0, "skipped": false} [x]
2026-12-01T09:26:54Z [info     ] extract: done in 2.000 s [x]
2026-12-01T09:26:55Z [info     ] extract summary: {"chunk_id": "c2", "chunks": 1, "images": 32, "failed": 0, "images_per_s": 130.0, "skipped": false} [x]
2026-12-01T09:26:55Z [info     ] extract: done in 1.000 s [x]
2026-12-01T09:26:56Z [info     ] merge_similarity summary: {"models": 72, "k": 10, "mode": "full", "shards": 2} [x]
2026-12-01T09:26:57Z [info     ] evaluate summary: {"random_ndcg@10": 0.1, "visual_ndcg@10": 0.8, "primary": "visual"} [x]
2026-12-01T09:26:58Z [info     ] merge_hybrid summary: {"models": 0, "k": 0, "mode": "none", "shards": 0, "cf_weight": null} [x]
2026-12-01T09:26:59Z [info     ] load summary: {"rows": 720, "models": 72, "run_id": "r1"} [x]
"""


def test_one_line_per_stage_with_the_mapped_tasks_summed(tmp_path: Path) -> None:
    (tmp_path / "log").write_text(LOG)
    lines = report(tmp_path / "log")
    assert [line.split()[0] for line in lines] == ["crawl", "threshold", "extract", "similarity", "evaluate",
                                                   "hybrid", "load"]
    extract = next(line for line in lines if line.startswith("extract"))
    assert "72 thumbnails embedded in 2 chunks by 2 mapped tasks" in extract and "1 failed" in extract
    assert extract.endswith("[3.0 s]")
    assert "visual ranks held-out likes best, 8.0x chance" in lines[4]
    assert "no hybrid lists" in lines[5] and "1 model has none" in lines[0]
