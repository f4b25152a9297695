"""The stage registry: one list of stages that the CLI, ``recsketch run`` and the DAG share."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import pytest

from recsketch import stages
from recsketch.contracts import Method, PlanMode, SimilarityPlan, owner_of

DAG_FILE = Path(__file__).parents[2] / "dags" / "recsketch_dags.py"


def test_every_task_resolves_to_a_stage_function_taking_settings_and_folder() -> None:
    for task in stages.TASKS:
        function = task.resolve()
        assert list(inspect.signature(function).parameters)[:2] == ["settings", "folder"], task.name
        assert getattr(function, "func", function).__module__ == f"recsketch.stages.{task.module}"


def test_the_dag_runs_each_registered_task_under_its_name() -> None:
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(str(DAG_FILE.parent)).dags["recsketch_recommendations"]
    crawl_dag = DagBag(str(DAG_FILE.parent)).dags["recsketch"]
    assert {t.task_id for t in dag.tasks} | {"crawl"} == {task.name for task in stages.TASKS}
    assert "crawl" in {t.task_id for t in crawl_dag.tasks}
    source = DAG_FILE.read_text()
    for task in stages.TASKS:  # each task body runs the registry entry of its own name
        assert f"_run(stages.{task.name.upper()}" in source, task.name
    assert "_stage\"" not in source and "getattr(pipeline" not in source  # callables, not strings


def test_every_task_belongs_to_a_step_and_the_steps_run_in_the_dags_order() -> None:
    used = {task for part in stages.STEPS for task in (part.plan, part.each, part.finish) if task is not None}
    assert set(stages.TASKS) <= used
    order = [task.name for part in stages.STEPS for task in (part.plan, part.each, part.finish)
             if task is not None and task in stages.TASKS]
    assert order == [task.name for task in stages.TASKS]


def test_legacy_plan_modes_read_back_with_the_same_digest(tmp_path: Path) -> None:
    """Plans written before the enum (free-text modes) keep their files' names."""
    for text, mode, detail in (("full", PlanMode.FULL, ""), ("full, PCA 6->3-d", PlanMode.FULL, "PCA 6->3-d"),
                               ("incremental (20 new x 60)", PlanMode.INCREMENTAL, "20 new x 60"),
                               ("unchanged (reused)", PlanMode.UNCHANGED, "reused"), ("none", PlanMode.NONE, "")):
        (tmp_path / "similarity_plan.json").write_text(json.dumps({"mode": text, "mids": ["a", "b"], "shards": []}))
        plan = SimilarityPlan.read(tmp_path)
        assert (plan.mode, plan.detail, plan.label) == (mode, detail, text)
        assert plan.digest == hashlib.sha1("\n".join([text, "a", "b"]).encode()).hexdigest()[:12]
        plan.write(tmp_path)  # and the enum form reads back the same
        assert SimilarityPlan.read(tmp_path) == plan
    hybrid = SimilarityPlan(PlanMode.FULL, ["a"], method=Method.HYBRID, detail="CF weight 0.3")
    assert hybrid.digest == hashlib.sha1("\n".join(["hybrid", "full, CF weight 0.3", "a"]).encode()).hexdigest()[:12]
    with pytest.raises(ValueError):
        PlanMode.parse("partial")


@pytest.mark.parametrize(("name", "owner"), [
    ("crawl_stats.json", "CrawlReport"), ("valid_models.json", "ValidModels"), ("likes.npz", "RunLikes"),
    ("chunk_plan.json", "ChunkPlan"), ("evaluation.json", "EvaluationReport"),
    ("hybrid_plan.json", "SimilarityPlan"), ("similarity-features-0123456789ab.npy", "SimilarityPlan"),
    ("hybrid-shard-0123456789ab-000000000-000000025.npz", "SimilarityPlan"), ("topk-hybrid.npz", "TopKStore"),
    ("notes.txt", None), ("similarity-features-xyz.npy", None),
])
def test_each_run_file_name_has_one_owner(name: str, owner: str | None) -> None:
    assert owner_of(name) == owner
