"""Stage 6: the run's lists served, atomically, if it passes the quality gate."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from recsketch.config import Settings
from recsketch.contracts import PRIMARY_METRIC, EvaluationReport, Method, TopKStore
from recsketch.db import store
from recsketch.errors import QualityGateFailed, RecsketchError
from recsketch.stages.common import Progress, log
from recsketch.storage import Location


def quality_gate(settings: Settings, engine: Engine, report: EvaluationReport | None, run_id: str,
                 force: bool) -> str:
    """Refuse a run whose primary metric falls below RECSKETCH_GATE_MIN_RATIO x the live run's;
    returns what was decided, for the log."""
    method, metric = PRIMARY_METRIC
    if report is None:
        return "gate: the run was not evaluated; loaded without a gate"
    new = report.primary
    live = store.live_metric(engine, method, metric)
    if new is None or live is None or settings.gate_min_ratio <= 0:
        return f"gate: nothing to compare with (this run {method} {metric} = {new}); loaded"
    live_run, old = live
    floor = settings.gate_min_ratio * old
    verdict = (f"run {run_id} has {method} {metric} = {new:.4f}, the live run {live_run} {old:.4f} "
               f"(floor {settings.gate_min_ratio} x {old:.4f} = {floor:.4f})")
    if new >= floor:
        return f"gate: passed: {verdict}"
    if force:
        return f"gate: FAILED but forced: {verdict}; loaded because force is set"
    raise QualityGateFailed(f"quality gate: {verdict}: not loaded, {live_run} stays served. Rerun load with the "
                            "param force=true (or RECSKETCH_GATE_MIN_RATIO=0) to serve it anyway")


def load_stage(settings: Settings, folder: Location, run_id: str, progress: Progress = log.info,
               force: bool = False) -> dict:
    """Replace the served recommendations with this run's, atomically, if the run passes the
    quality gate; its metrics are stored in the same transaction."""
    topk = TopKStore.for_run(folder).require("similarity")
    engine = store.connect(settings.resolved_database_url)
    report = EvaluationReport.read(folder)
    progress(quality_gate(settings, engine, report, run_id, force))
    hybrid = TopKStore.for_run(folder, Method.HYBRID).read()
    if hybrid is not None and (hybrid.mids != topk.mids or hybrid.k != topk.k):
        raise RecsketchError(f"the run's hybrid neighbours ({len(hybrid.mids)} models, top-{hybrid.k}) are not of its "
                             f"visual ones ({len(topk.mids)} models, top-{topk.k}): run evaluate and hybrid again")
    store.load_recommendations(engine, run_id, topk.backbone_key, topk.k, topk,  # streamed from the arrays
                               metrics=report.metric_rows() if report else (),
                               more={Method.HYBRID.value: hybrid} if hybrid is not None else None)
    rows = len(topk.mids) * topk.k * (2 if hybrid is not None else 1)
    progress(f"load: {rows} recommendations ({'visual and hybrid' if hybrid is not None else 'visual'}) for "
             f"{len(topk.mids)} models are live as run {run_id}")
    summary: dict = {"rows": rows, "models": len(topk.mids), "run_id": run_id}
    if report:
        method, metric = PRIMARY_METRIC
        summary[f"{method}_{metric}"] = report.primary
    return summary
