"""The pipeline's stages, listed once: ``recsketch run``, the stage subcommands and the DAG all
read :data:`TASKS` and :data:`STEPS`.

A :class:`Task` is one unit of work, an Airflow task: a function of ``recsketch.stages.<module>``
called with the run's settings and folder. A :class:`Step` is what a subcommand (and a stage of
``recsketch run``) does: a task, or a plan task, the task it maps over the plan's ids, and the
task that merges their results. Stages hand over only through the catalogue DB and the typed
files of ``recsketch.contracts`` in the run's folder, so each task can run in its own process
or worker and be retried alone; each is idempotent.

This module imports nothing heavy: the scheduler parses the DAG file, which imports it, every
30 s, and numpy, pandas and the stages' libraries cost ~0.4 s to import. A task's module is
imported when the task first runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recsketch.config import Settings
    from recsketch.storage import Location


@dataclass(frozen=True)
class Task:
    """One unit of work: ``function`` of ``recsketch.stages.<module>``, named ``name`` in the DAG."""

    name: str
    module: str
    function: str
    help: str

    def resolve(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(f"recsketch.stages.{self.module}"), self.function)

    def __call__(self, settings: Settings, folder: Location, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(settings, folder, *args, **kwargs)


@dataclass(frozen=True)
class Option:
    """A subcommand flag that reaches the step's task as the keyword ``name``."""

    flag: str
    name: str
    help: str
    kind: str = "value"  # value | timestamp | flag | list


@dataclass(frozen=True)
class Step:
    """A subcommand, and a stage of ``recsketch run``: ``plan`` returns the ids ``each`` runs on
    (or ``--chunk`` names them), then ``finish`` runs once; every part optional."""

    name: str
    help: str
    plan: Task | None = None
    each: Task | None = None
    finish: Task | None = None
    options: tuple[Option, ...] = ()
    needs_db: bool = False  # an unreachable DB fails before any state is written
    takes_run_id: bool = False  # finish gets the run id (load: the served run's name)
    ids_option: str | None = None  # the option that names the ids instead of plan

    def run(self, settings: Settings, folder: Location, run_id: str, progress: Callable[[str], None],
            **options: Any) -> Any:
        """The step in this process; returns the finish task's summary, else the mapped ones'."""
        ids = options.pop(self.ids_option, None) if self.ids_option else None
        results = []
        if self.each is not None:
            if not ids:
                assert self.plan is not None
                ids = self.plan(settings, folder, progress=progress)
            results = [self.each(settings, folder, item, progress=progress) for item in ids]
        elif self.plan is not None:
            results = self.plan(settings, folder, progress=progress, **options)
        if self.finish is None:
            return results
        extra = (run_id,) if self.takes_run_id else ()
        return self.finish(settings, folder, *extra, progress=progress, **options)


CRAWL = Task("crawl", "crawl", "crawl_stage", "the API into the catalogue DB and the thumbnail store")
THRESHOLD = Task("threshold", "threshold", "threshold_stage", "the like threshold: the run's models and likes")
PLAN_CHUNKS = Task("plan_chunks", "extract", "plan_stage", "the models without features, in chunks and tasks")
PLANNED_EXTRACT_TASKS = Task("planned_extract_tasks", "extract", "planned_tasks", "the chunk plan's task ids")
EXTRACT = Task("extract", "extract", "extract_stage", "one planned task's chunks of features")
PLAN_SIMILARITY = Task("plan_similarity", "neighbours", "plan_similarity_stage",
                        "the visual rows written once for the shards, or the lists worked into the last ones")
SIMILARITY_SHARD = Task("similarity_shard", "neighbours", "similarity_shard_stage", "one row block's visual top-k")
MERGE_SIMILARITY = Task("merge_similarity", "neighbours", "merge_similarity_stage", "the visual lists joined")
EVALUATE = Task("evaluate", "evaluate", "evaluate_stage", "every method ranked on held-out likes")
PLAN_HYBRID = Task("plan_hybrid", "neighbours", "plan_hybrid_stage",
                    "pictures and likes blended into rows written once for the shards")
HYBRID_SHARD = Task("hybrid_shard", "neighbours", "hybrid_shard_stage", "one row block's hybrid top-k")
MERGE_HYBRID = Task("merge_hybrid", "neighbours", "merge_hybrid_stage", "the hybrid lists joined")
LOAD = Task("load", "load", "load_stage", "the run's lists served, if it passes the quality gate")
CLEANUP = Task("cleanup", "cleanup", "cleanup_stage", "run folders past RECSKETCH_KEEP_RUNS deleted (retention)")

TASKS: tuple[Task, ...] = (CRAWL, THRESHOLD, PLAN_CHUNKS, EXTRACT, PLAN_SIMILARITY, SIMILARITY_SHARD,
                           MERGE_SIMILARITY, EVALUATE, PLAN_HYBRID, HYBRID_SHARD, MERGE_HYBRID, LOAD, CLEANUP)

PUBLISHED_SINCE = Option("--published-since", "published_since",
                         "crawl only models published at or after this time (ISO 8601, UTC)", "timestamp")
PUBLISHED_BEFORE = Option("--published-before", "published_before",
                          "crawl only models published before this time (ISO 8601, UTC)", "timestamp")

CONFIRM_DELETIONS = Option("--confirm-deletions", "confirm_deletions",
                           "delete the models a whole listing no longer shows even if they are more than "
                           "RECSKETCH_MAX_DELETION_SHARE of the catalogue", "flag")

STEPS: tuple[Step, ...] = (
    Step("crawl", "stage 1: crawl the API into the catalogue", finish=CRAWL,
         options=(PUBLISHED_SINCE, PUBLISHED_BEFORE, CONFIRM_DELETIONS), needs_db=True),
    Step("threshold", "stage 2: the like threshold", finish=THRESHOLD, needs_db=True),
    Step("plan", "stage 3a: plan feature chunks", plan=PLAN_CHUNKS),
    Step("extract", "stage 3b: extract planned chunks", plan=PLANNED_EXTRACT_TASKS, each=EXTRACT,
         options=(Option("--chunk", "chunk", "an extract task or chunk id (repeatable; default: every planned task)",
                         "list"),), ids_option="chunk"),
    Step("similarity", "stage 4: visual neighbours (exact cosine top-k)", plan=PLAN_SIMILARITY,
         each=SIMILARITY_SHARD, finish=MERGE_SIMILARITY),
    Step("evaluate", "stage 5: offline quality of every method", finish=EVALUATE),
    Step("hybrid", "stage 5b: hybrid neighbours (after evaluate)", plan=PLAN_HYBRID, each=HYBRID_SHARD,
         finish=MERGE_HYBRID),
    Step("load", "stage 6: load recommendations into the DB (after evaluate)", finish=LOAD,
         options=(Option("--force", "force", "load even if the quality gate refuses the run", "flag"),),
         needs_db=True, takes_run_id=True),
    Step("gc", "stage 7: retention: run folders past RECSKETCH_KEEP_RUNS deleted", finish=CLEANUP, needs_db=True),
)


def step(name: str) -> Step:
    return next(s for s in STEPS if s.name == name)


def run_pipeline(settings: Settings, run_id: str | None = None, progress: Callable[[str], None] | None = None,
                 **options: Any) -> dict:
    """Every step in order, in this process (``recsketch run``); ``options`` go to the steps
    that take them (``published_since`` to crawl, ``force`` to load)."""
    from recsketch.stages.common import log, new_run_id, run_dir

    unknown = set(options) - {o.name for o in run_options()}
    if unknown:
        raise TypeError(f"run_pipeline got options no step takes: {sorted(unknown)}")
    progress = progress or log.info
    run_id = run_id or new_run_id()
    folder = run_dir(settings, run_id)
    summary: dict = {"run_id": run_id}
    for part in STEPS:
        given = {o.name: options[o.name] for o in part.options if o.name in options}
        summary[part.name] = part.run(settings, folder, run_id, progress, **given)
    return summary


def run_options() -> list[Option]:
    """The options ``recsketch run`` takes: every step's, but those naming mapped ids."""
    return [o for part in STEPS for o in part.options if o.name != part.ids_option]


def similarity_stage(settings: Settings, folder: Location, progress: Callable[[str], None] | None = None) -> dict:
    """The whole similarity step in this process (``recsketch similarity``): plan, shards, merge."""
    return _in_process("similarity", settings, folder, progress)


def hybrid_stage(settings: Settings, folder: Location, progress: Callable[[str], None] | None = None) -> dict:
    """The whole hybrid step in this process (``recsketch hybrid``): plan, shards, merge."""
    return _in_process("hybrid", settings, folder, progress)


def _in_process(name: str, settings: Settings, folder: Location, progress: Callable[[str], None] | None) -> dict:
    from recsketch.stages.common import log

    return step(name).run(settings, folder, "", progress or log.info)
