"""Stage 6: the run's lists served, atomically, if it passes the quality gate."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from recsketch import gate, retention
from recsketch.config import Settings
from recsketch.contracts import PRIMARY_METRIC, EvaluationReport, Method, RunLikes, TopK, TopKStore
from recsketch.db import store
from recsketch.errors import QualityGateFailed, RecsketchError
from recsketch.evaluation import EvaluationConfig
from recsketch.ids import run_folder_name
from recsketch.stages.common import Progress, log
from recsketch.storage import Location


def kept_served_lists(settings: Settings, engine: Engine, run_id: str,
                      progress: Progress) -> dict[str, dict[str, TopK]]:
    """The lists of every loaded run retention keeps (``runs``; their folders), per method."""
    kept: dict[str, dict[str, TopK]] = {}
    for row in store.loaded_runs(engine):
        if row["run_id"] == run_id:
            continue  # a reload of this run: not its own reference
        folder = settings.run_dir(run_folder_name(row["run_id"]))
        lists = {method.value: topk for method in Method
                 if (topk := TopKStore.for_run(folder, method).read()) is not None}
        if Method.VISUAL.value in lists:
            kept[row["run_id"]] = lists
        else:
            progress(f"gate: the loaded run {row['run_id']} has no lists in {folder}: not compared")
    return kept


def quality_gate(settings: Settings, engine: Engine, folder: Location, candidate: dict[str, TopK], run_id: str,
                 force: bool, progress: Progress) -> dict[str, dict[str, float]]:
    """Refuse the run if a method it serves scores below RECSKETCH_GATE_MIN_RATIO x a kept served
    run's (or RECSKETCH_GATE_MIN_NDCG) with 95 % confidence, every run's lists scored on the same
    held-out likes (``recsketch.gate``); returns the comparison per method (stored with its
    metrics)."""
    if settings.gate_min_ratio <= 0 and settings.gate_min_ndcg <= 0:
        progress("gate: off (RECSKETCH_GATE_MIN_RATIO=0, no RECSKETCH_GATE_MIN_NDCG); loaded without a gate")
        return {}
    likes = RunLikes.read(folder)
    if likes is None:
        progress("gate: the run kept no likes (made by an older release): loaded without a gate")
        return {}
    kept = kept_served_lists(settings, engine, run_id, progress)
    verdict = gate.judge(likes, candidate, kept, min_ratio=settings.gate_min_ratio, min_ndcg=settings.gate_min_ndcg,
                         min_users=settings.gate_min_users,
                         config=EvaluationConfig(cold_items=0.0, max_users=settings.eval_max_users))
    for line in verdict.lines:
        progress(f"gate: {line}")
    if verdict.passed:
        return verdict.metrics()
    failed = "; ".join(line for line in verdict.lines if line.endswith("FAILED"))
    live = store.live_run(engine)
    if force:
        progress(f"gate: FAILED but forced: {failed}; loaded because force is set")
        return verdict.metrics()
    raise QualityGateFailed(f"quality gate: run {run_id}: {failed}: not loaded, "
                            f"{live['run_id'] if live else 'nothing'} stays served. Rerun load with the param "
                            "force=true (or RECSKETCH_GATE_MIN_RATIO=0) to serve it anyway")


def load_stage(settings: Settings, folder: Location, run_id: str, progress: Progress = log.info,
               force: bool = False) -> dict:
    """Replace the served recommendations with this run's, atomically, if the run passes the
    quality gate; its metrics are stored in the same transaction."""
    topk = TopKStore.for_run(folder).require("similarity")
    engine = store.connect(settings.resolved_database_url)
    report = EvaluationReport.read(folder)
    hybrid = TopKStore.for_run(folder, Method.HYBRID).read()
    if hybrid is not None and (hybrid.mids != topk.mids or hybrid.k != topk.k):
        raise RecsketchError(f"the run's hybrid neighbours ({len(hybrid.mids)} models, top-{hybrid.k}) are not of its "
                             f"visual ones ({len(topk.mids)} models, top-{topk.k}): run evaluate and hybrid again")
    candidate = {Method.VISUAL.value: topk, **({Method.HYBRID.value: hybrid} if hybrid is not None else {})}
    served = quality_gate(settings, engine, folder, candidate, run_id, force, progress)
    metrics = (report.metric_rows() if report else []) + [
        {"method": method, "metric": metric, "split": gate.SPLIT, "value": value}
        for method, values in served.items() for metric, value in values.items()]
    store.load_recommendations(engine, run_id, topk.backbone_key, topk.k, topk,  # streamed from the arrays
                               metrics=metrics,
                               more={Method.HYBRID.value: hybrid} if hybrid is not None else None)
    retention.finish(engine, folder.name)
    rows = len(topk.mids) * topk.k * (2 if hybrid is not None else 1)
    progress(f"load: {rows} recommendations ({'visual and hybrid' if hybrid is not None else 'visual'}) for "
             f"{len(topk.mids)} models are live as run {run_id}")
    summary: dict = {"rows": rows, "models": len(topk.mids), "run_id": run_id}
    if report:
        method, metric = PRIMARY_METRIC
        summary[f"{method}_{metric}"] = report.primary
    return summary
