"""Stage 5: every method measured on held-out likes; the report goes with the run."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import pandas as pd

from recsketch.config import Settings
from recsketch.contracts import PRIMARY_METRIC, EvaluationReport, ValidModels
from recsketch.db import store as db_store
from recsketch.errors import RecsketchError
from recsketch.evaluation import EvaluationConfig, Incumbent, Likes, evaluate
from recsketch.features.chunks import ChunkStore, NpyFileRows
from recsketch.features.keys import backbone_key
from recsketch.ids import run_folder_name
from recsketch.similarity import NpyRows
from recsketch.stages.common import Progress, log, run_likes, thresholded_likes
from recsketch.storage import Location


def evaluate_catalogue(settings: Settings, versions: dict[str, str], progress: Progress = log.info,
                       config: EvaluationConfig | None = None, likes: pd.DataFrame | None = None) -> dict:
    """Every method's offline metrics on thresholded likes (``likes``, else the catalogue's now),
    over the given models (mid -> thumbnail version) with their features (``recsketch.evaluation``),
    streamed into a local file of unit rows and read by blocks: memory never holds N x d."""
    likes = thresholded_likes(settings) if likes is None else likes
    store = ChunkStore(settings.features_dir, backbone_key(settings))
    config = config or EvaluationConfig(max_users=settings.eval_max_users, threads=settings.effective_threads,
                                        hybrid_likes=settings.hybrid_likes)
    if config.incumbent is None and (incumbent := served_choices(settings, progress)) is not None:
        config = replace(config, incumbent=incumbent)
    with tempfile.TemporaryDirectory(prefix="recsketch-evaluate-") as scratch:  # local: read by blocks
        path = Path(scratch) / "unit.npy"
        sink = NpyFileRows(path)
        try:
            mids = store.gather(versions, sorted(versions), sink, unit=True).mids
        finally:
            sink.close()
        if len(mids) < 2:
            raise RecsketchError(f"only {len(mids)} models have features: nothing to evaluate; run the pipeline first")
        unit = NpyRows(path)
        try:
            return evaluate(Likes.from_frame(likes, mids), unit, config, progress)
        finally:
            unit.close()


def served_choices(settings: Settings, progress: Progress = log.info) -> Incumbent | None:
    """The choices the live run's lists were made with, if it was made with this backbone: the
    tunings keep each unless an alternative validates better by more than its noise."""
    try:
        live = db_store.live_run(db_store.connect(settings.resolved_database_url, read_only=True))
    except RecsketchError:
        return None
    if live is None or live["backbone"] != backbone_key(settings):
        return None
    report = EvaluationReport.read(settings.run_dir(run_folder_name(live["run_id"])))
    if report is None:
        return None
    choices = Incumbent(report.als_params, report.hybrid_likes, report.cf_weight, report.cold_cf_weight)
    progress(f"evaluate: the live run {live['run_id']}'s choices are kept unless beaten by more than their "
             f"standard error: ALS {choices.als}, likes half {choices.likes}, CF weight {choices.cf_weight}, "
             f"cold start {choices.cold_cf_weight}")
    return choices


def evaluate_stage(settings: Settings, folder: Location, progress: Progress = log.info,
                   config: EvaluationConfig | None = None) -> dict:
    """The run's models measured on held-out likes; the report is stored with the run for load
    (its quality gate, ``run_metrics``), plan_hybrid (its CF weight) and the gallery."""
    report = EvaluationReport(evaluate_catalogue(settings, ValidModels.read(folder).versions, progress, config,
                                                 likes=run_likes(settings, folder, progress)))
    report.write(folder)
    method, metric = PRIMARY_METRIC
    summary: dict[str, object] = {f"{name}_{metric}": values[metric]
                                  for name, values in report.payload["methods"].items()}
    summary["primary"] = f"{method} {metric} = {report.primary}"
    return summary
