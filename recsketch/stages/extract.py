"""Stage 3: features for the models that have none yet, in chunks (plan, then one task per group)."""

from __future__ import annotations

from recsketch.config import Settings
from recsketch.contracts import ChunkPlan, ValidModels, group_tasks
from recsketch.crawl import thumbnail_path
from recsketch.features.chunks import ChunkStore
from recsketch.features.extract import extract_chunk
from recsketch.features.factory import create_backbone
from recsketch.features.keys import backbone_key
from recsketch.resources import limit_threads
from recsketch.stages.common import Progress, log, sweep
from recsketch.storage import Location


def plan_stage(settings: Settings, folder: Location, progress: Progress = log.info) -> list[str]:
    """Split the valid models that have no features yet into chunks, and the chunks into at most
    RECSKETCH_MAX_MAPPED_TASKS extract tasks; returns the task ids (what the DAG maps over)."""
    valid = ValidModels.read(folder)
    chunk_store = ChunkStore(settings.features_dir, backbone_key(settings))
    chunks = chunk_store.plan(valid.versions, settings.chunk_size)
    plan = ChunkPlan(chunk_store.backbone_key, chunks, group_tasks(list(chunks), settings.max_mapped_tasks))
    plan.write(folder)
    todo = sum(len(m) for m in plan.chunks.values())
    progress(f"plan: {len(valid)} valid models, {todo} need features, {len(plan.chunks)} chunks "
             f"of up to {settings.chunk_size} for {chunk_store.backbone_key}, in {len(plan.tasks)} extract tasks "
             f"(at most {settings.max_mapped_tasks})")
    return list(plan.tasks)


def planned_tasks(settings: Settings, folder: Location, progress: Progress = log.info) -> list[str]:
    """The extract task ids of the run's chunk plan (``recsketch extract`` without ``--chunk``)."""
    return sorted(ChunkPlan.read(folder).tasks)


def extract_stage(settings: Settings, folder: Location, task_id: str, progress: Progress = log.info) -> dict:
    """Extract one planned task's chunks with one backbone (chunks already written are skipped)."""
    plan = ChunkPlan.read(folder)
    chunk_ids = plan.chunks_of(task_id)
    chunk_store = ChunkStore(settings.features_dir, plan.backbone_key)
    sweep(progress, chunk_store.root)
    threads = settings.effective_threads
    limit_threads(threads)
    backbone = None
    images = failed = skipped = 0
    seconds = 0.0
    for number, chunk_id in enumerate(chunk_ids, 1):
        if chunk_store.read(chunk_id) is not None:
            progress(f"chunk {chunk_id} ({number}/{len(chunk_ids)}): already extracted, skipping")
            skipped += 1
            continue
        backbone = backbone or create_backbone(settings, threads)  # loaded once per task, only if needed
        report = extract_chunk(chunk_store, backbone, chunk_id, plan.chunks[chunk_id],
                               lambda mid: thumbnail_path(settings, mid), settings.batch_size or backbone.batch_size,
                               progress, settings.preprocess, checked=True)
        images, failed, seconds = images + report.images, failed + report.failed, seconds + report.seconds
    return {"chunk_id": task_id, "chunks": len(chunk_ids), "images": images, "failed": failed,
            "images_per_s": round(images / seconds, 2) if seconds else 0.0, "skipped": skipped == len(chunk_ids)}
