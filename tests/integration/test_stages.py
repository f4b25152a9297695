"""``recsketch run`` in process, over the registry: every step's summary, and a run folder that
holds nothing but contract files."""

from __future__ import annotations

from pathlib import Path

from recsketch import stages
from recsketch.config import Settings
from recsketch.contracts import owner_of, run_folder_keys
from recsketch.features.chunks import ChunkStore
from recsketch.features.keys import backbone_key
from recsketch.stages.common import run_dir


def test_a_run_writes_only_contract_files_and_summarises_every_step(sketchfab, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", sketchfab_url=sketchfab.url, runtime="torch", top_k=3)
    summary = stages.run_pipeline(settings, "day-1", progress=lambda _: None)
    assert list(summary) == ["run_id", *(part.name for part in stages.STEPS)]
    assert summary["similarity"]["mode"] == "full" and summary["hybrid"]["models"] == summary["load"]["models"]
    files = sorted(p.name for p in Path(run_dir(settings, "day-1")).iterdir())
    assert {name: owner_of(name) for name in files if owner_of(name) is None} == {}
    assert {owner_of(name) for name in files} == {"CrawlReport", "ValidModels", "RunLikes", "ChunkPlan",
                                                  "EvaluationReport", "SimilarityPlan", "TopKStore"}
    # retention finds every one of them by name, as it must on an object store (no listing)
    assert set(files) <= {key.name for key in run_folder_keys(run_dir(settings, "day-1"))}
    entries = sum(len(held) for held in ChunkStore(settings.features_dir, backbone_key(settings)).manifest().values())
    assert summary["gc"] == {"kept": 1, "deleted": 0, "files_deleted": 0, "failed": 0, "dry_run": False,
                             "chunks_dropped": 0, "chunks_rewritten": 0, "chunk_files_deleted": 0,
                             "feature_entries": entries, "thumbnail_index_lines_dropped": 0, "exports_deleted": 0}
    assert entries == summary["load"]["models"]  # every extracted model is served: nothing to compact
    again = stages.run_pipeline(settings, "day-2", progress=lambda _: None)  # nothing changed: reused
    assert again["similarity"]["mode"] == "unchanged (reused)" and again["extract"] == []
