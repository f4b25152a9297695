"""recsketch: Sketchfab thumbnails -> visual "more like this" recommendations, as two DAGs.

``recsketch`` (daily): scheduled and manual runs list the whole catalogue and fetch only
what changed: new models, thumbnails with a new URL, and likers of models whose likeCount
changed or whose stored likers are older than RECSKETCH_LIKES_MAX_AGE_DAYS. ``airflow
backfill create --dag-id recsketch`` fills past days: a backfilled run lists only its own
day (data interval). Every crawl, on any worker, shares one request budget
(RECSKETCH_RATE_LIMIT). When a crawl brings something new it updates the catalogue Asset,
and that, not a clock, starts

``recsketch_recommendations``: threshold -> plan_chunks -> extract (one mapped task per
chunk) -> plan_similarity -> similarity_shard (one mapped task per row block, full runs
only) -> merge_similarity -> evaluate (held-out likes, every method) -> plan_hybrid ->
hybrid_shard (visual and likes-based neighbours blended, sharded alike) -> merge_hybrid ->
load, which refuses a
run that measures worse than the live one (the quality gate; param ``force`` overrides it)
and updates the recommendations Asset with the run's metrics. Asset events
that arrive while it runs are queued into one next run, so crawls close together coalesce.

Every task runs one task of the stage registry ``recsketch.stages`` (the one ``recsketch run``
and the CLI use); stages hand over through the catalogue DB and the run's folder, so any task
can be retried alone. Settings come from the
environment, the ``sketchfab_default`` and ``recsketch_db`` Connections, then the DAG params.
Heavy libraries (TensorFlow, torch) load inside the tasks, never when this file is parsed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, CronDataIntervalTimetable, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from recsketch import stages  # the registry only: the stages' modules load when a task runs

CATALOGUE = Asset("recsketch://catalogue", extra={"holds": "models, likes, thumbnails"})
RECOMMENDATIONS = Asset("recsketch://recommendations", extra={"holds": "top-k similar models per model"})
SKETCHFAB_POOL = "sketchfab_api"  # caps concurrent API tasks; `make airflow` and the stack create it

DEFAULT_ARGS = {
    "owner": "recsketch",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
}

# No Param has a value of its own: an unset one leaves the setting to the Connections, then the
# environment (RECSKETCH_*), then the library's default. Run conf beats them all.
PARAMS = {
    "backbone": Param(None, type=["null", "string"], enum=[None, "efficientnet_lite0", "vgg16"],
                      description="feature backbone (unset: RECSKETCH_BACKBONE, else efficientnet_lite0)"),
    "top_k": Param(None, type=["null", "integer"], minimum=1, maximum=1000,
                   description="recommendations per model (unset: RECSKETCH_TOP_K, else 10)"),
    "min_likes": Param(None, type=["null", "integer"], minimum=0,
                       description="like threshold for users and models (unset: RECSKETCH_MIN_LIKES, else 5)"),
    "chunk_size": Param(None, type=["null", "integer"], minimum=1, maximum=100_000,
                        description="models per chunk (unset: RECSKETCH_CHUNK_SIZE, else 256)"),
}
# not a setting: load this run even if it fails the quality gate
FORCE = Param(False, type="boolean", description="load even if the run measures worse than the live one "
                                                 "(the quality gate, RECSKETCH_GATE_MIN_RATIO)")
# not a setting: an operator's word that a mass deletion the crawl refused is real
CONFIRM_DELETIONS = Param(False, type="boolean",
                          description="delete the models the listing no longer shows even if they are more than "
                                      "RECSKETCH_MAX_DELETION_SHARE of the catalogue")


def _run(task: stages.Task, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
    """Run ``task`` of the stage registry with this run's settings and folder, logging its summary
    and peak memory; a failure a retry cannot mend fails the task at once."""
    import json
    import time

    from recsketch.errors import ConfigError, PermanentApiError, QualityGateFailed
    from recsketch.hooks import airflow_settings
    from recsketch.resources import peak_rss_bytes, reset_peak_rss
    from recsketch.stages.common import log, run_dir

    context = get_current_context()
    params = context["params"]
    settings = airflow_settings(**{name: params.get(name) for name in PARAMS})
    folder = run_dir(settings, context["run_id"])
    reset_peak_rss()
    started = time.monotonic()
    try:
        summary = task(settings, folder, *args, **kwargs)
    except (PermanentApiError, ConfigError, QualityGateFailed) as exc:  # a retry would fail the same way
        raise AirflowFailException(str(exc)) from exc
    log.info("%s summary: %s", task.name, json.dumps(summary, default=str))
    log.info("%s: done in %.3f s", task.name, time.monotonic() - started)
    log.info("%s: peak RSS %.0f MiB", task.name, peak_rss_bytes() / 2**20)
    return summary


@dag(
    dag_id="recsketch",
    # daily intervals: a scheduled or backfilled run crawls the models published in its day
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["recsketch", "sketchfab", "crawl"],
    params={"confirm_deletions": CONFIRM_DELETIONS},
    doc_md=__doc__,
)
def recsketch() -> None:
    # one crawl at a time, across scheduled and backfill runs: two at once would fetch the same
    # new models twice, and one already fills the deployment's request budget
    @task(pool=SKETCHFAB_POOL, max_active_tis_per_dag=1)
    def crawl() -> dict:
        """Backfill runs crawl their data interval; scheduled and manual runs the whole
        catalogue, refetching only what changed (so likes stay fresh every day)."""
        context = get_current_context()
        run_type = context["dag_run"].run_type
        if getattr(run_type, "value", run_type) == "backfill":
            return _run(stages.CRAWL, published_since=context["data_interval_start"],
                              published_before=context["data_interval_end"])
        return _run(stages.CRAWL, confirm_deletions=bool(context["params"].get("confirm_deletions")))

    @task(outlets=[CATALOGUE])
    def publish_catalogue(stats: dict) -> dict:
        """Update the catalogue Asset (which starts recsketch_recommendations) only when the
        crawl changed likers or thumbnails; a day without change is skipped and starts nothing."""
        changed = stats["likes_changed"] + stats["thumbnails_ok"] + stats.get("models_deleted", 0)
        if not changed:
            raise AirflowSkipException("the crawl stored no model: the catalogue is unchanged")
        summary = {key: stats.get(key, 0) for key in ("models", "models_repaired", "likes", "likes_changed",
                                                      "thumbnails_ok", "models_deleted")}
        get_current_context()["outlet_events"][CATALOGUE].extra = summary
        return summary

    publish_catalogue(crawl())


@dag(
    dag_id="recsketch_recommendations",
    schedule=[CATALOGUE],  # runs when the catalogue changes; events queued meanwhile make one run
    start_date=datetime(2026, 1, 1),
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={**PARAMS, "force": FORCE},
    tags=["recsketch", "features", "recommendations"],
    doc_md=__doc__,
)
def recsketch_recommendations() -> None:
    @task
    def threshold() -> dict:
        return _run(stages.THRESHOLD)

    @task
    def plan_chunks() -> list[str]:
        return _run(stages.PLAN_CHUNKS)

    # one mapped task per planned task id: one chunk, or a group of chunks once a catalogue has more
    # chunks than RECSKETCH_MAX_MAPPED_TASKS (so it never meets Airflow's max_map_length)
    @task(map_index_template="chunk {{ task.op_kwargs['chunk_id'] }}")
    def extract(chunk_id: str) -> dict:
        return _run(stages.EXTRACT, chunk_id)

    @task(trigger_rule="none_failed")  # runs when every chunk was already done (no mapped task)
    def plan_similarity() -> list[str]:
        """Incremental or unchanged runs finish here; full runs return their row-block shards."""
        return _run(stages.PLAN_SIMILARITY)

    @task(map_index_template="rows {{ task.op_kwargs['shard'] }}")
    def similarity_shard(shard: str) -> dict:
        return _run(stages.SIMILARITY_SHARD, shard)

    @task(trigger_rule="none_failed")  # runs when no shard was needed
    def merge_similarity() -> dict:
        return _run(stages.MERGE_SIMILARITY)

    @task
    def evaluate() -> dict:
        """Every method ranked on held-out likes; the report goes with the run to load."""
        return _run(stages.EVALUATE)

    @task
    def plan_hybrid() -> list[str]:
        """Neighbours from the pictures and the likes together, with the weight evaluate tuned:
        the blended embedding written once, and its row-block shards returned."""
        return _run(stages.PLAN_HYBRID)

    @task(map_index_template="rows {{ task.op_kwargs['shard'] }}")
    def hybrid_shard(shard: str) -> dict:
        return _run(stages.HYBRID_SHARD, shard)

    @task(trigger_rule="none_failed")  # runs when evaluate tuned no weight (no shard)
    def merge_hybrid() -> dict:
        return _run(stages.MERGE_HYBRID)

    @task(outlets=[RECOMMENDATIONS])
    def load() -> dict:
        context = get_current_context()
        summary = _run(stages.LOAD, context["run_id"], force=bool(context["params"].get("force")))
        context["outlet_events"][RECOMMENDATIONS].extra = summary
        return summary

    @task
    def cleanup() -> dict:
        return _run(stages.CLEANUP)

    chunks = plan_chunks()
    threshold() >> chunks
    shards = plan_similarity()
    chunks >> extract.expand(chunk_id=chunks) >> shards
    hybrid_shards = plan_hybrid()
    shards >> similarity_shard.expand(shard=shards) >> merge_similarity() >> evaluate() >> hybrid_shards
    hybrid_shards >> hybrid_shard.expand(shard=hybrid_shards) >> merge_hybrid() >> load() >> cleanup()


recsketch()
recsketch_recommendations()
