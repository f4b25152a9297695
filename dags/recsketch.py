"""recsketch: Sketchfab thumbnails -> visual "more like this" recommendations.

crawl -> threshold -> plan_chunks -> extract (one mapped task per chunk) -> plan_similarity ->
similarity_shard (one mapped task per row block, full runs only) -> merge_similarity -> load.
Scheduled and backfilled runs crawl the models published in their day (data interval);
manual runs crawl the whole catalogue.
Every task calls one function of ``recsketch.pipeline``; stages hand over through the
catalogue DB and the run's folder, so any task can be retried alone. Heavy libraries
(TensorFlow, torch) load inside the tasks, never when this file is parsed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import CronDataIntervalTimetable, Param, dag, get_current_context, task

DEFAULT_ARGS = {
    "owner": "recsketch",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
}

PARAMS = {
    "backbone": Param("efficientnet_lite0", enum=["efficientnet_lite0", "vgg16"],
                      description="feature backbone"),
    "top_k": Param(10, type="integer", minimum=1, maximum=1000, description="recommendations per model"),
    "min_likes": Param(5, type="integer", minimum=0, description="like threshold for users and models"),
    "chunk_size": Param(256, type="integer", minimum=1, maximum=100_000, description="models per chunk"),
}


def _run_stage(stage: str, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
    """Call ``recsketch.pipeline.<stage>`` with settings (environment + DAG params) and this
    run's folder; the library is imported here, at run time, never when the file is parsed."""
    from recsketch import pipeline
    from recsketch.config import Settings

    context = get_current_context()
    params = context["params"]
    settings = Settings.from_env().with_overrides(
        backbone=params["backbone"], top_k=params["top_k"],
        min_likes=params["min_likes"], chunk_size=params["chunk_size"])
    folder = pipeline.run_dir(settings, context["run_id"])
    return getattr(pipeline, stage)(settings, folder, *args, **kwargs)


@dag(
    dag_id="recsketch",
    # daily intervals: a scheduled or backfilled run crawls the models published in its day
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["recsketch", "sketchfab", "recommendations"],
    doc_md=__doc__,
)
def recsketch() -> None:
    @task
    def crawl() -> dict:
        """Scheduled and backfill runs crawl their data interval; manual runs the whole catalogue."""
        context = get_current_context()
        run_type = context["dag_run"].run_type
        if getattr(run_type, "value", run_type) in ("scheduled", "backfill"):
            return _run_stage("crawl_stage", published_since=context["data_interval_start"],
                              published_before=context["data_interval_end"])
        return _run_stage("crawl_stage")

    @task
    def threshold() -> dict:
        return _run_stage("threshold_stage")

    @task
    def plan_chunks() -> list[str]:
        return _run_stage("plan_stage")

    @task(map_index_template="chunk {{ task.op_kwargs['chunk_id'] }}")
    def extract(chunk_id: str) -> dict:
        return _run_stage("extract_stage", chunk_id)

    @task(trigger_rule="none_failed")  # runs when every chunk was already done (no mapped task)
    def plan_similarity() -> list[str]:
        """Incremental or unchanged runs finish here; full runs return their row-block shards."""
        return _run_stage("plan_similarity_stage")

    @task(map_index_template="rows {{ task.op_kwargs['shard'] }}")
    def similarity_shard(shard: str) -> dict:
        return _run_stage("similarity_shard_stage", shard)

    @task(trigger_rule="none_failed")  # runs when no shard was needed
    def merge_similarity() -> dict:
        return _run_stage("merge_similarity_stage")

    @task
    def load() -> dict:
        return _run_stage("load_stage", get_current_context()["run_id"])

    chunks = plan_chunks()
    crawl() >> threshold() >> chunks
    shards = plan_similarity()
    chunks >> extract.expand(chunk_id=chunks) >> shards
    shards >> similarity_shard.expand(shard=shards) >> merge_similarity() >> load()


recsketch()
