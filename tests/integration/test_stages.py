"""``recsketch run`` in process, over the registry: every step's summary, and a run folder that
holds nothing but contract files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recsketch import stages
from recsketch.config import Settings
from recsketch.contracts import RunLikes, TopKStore, owner_of, run_folder_keys
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
    working = summary["gc"].pop("working_files_deleted")
    assert working >= 4  # both methods' gathered features and shards: the run loaded, its lists are merged
    assert not [name for name in files if "-shard-" in name or "-features-" in name], files
    assert summary["gc"] == {"kept": 1, "deleted": 0, "files_deleted": 0, "failed": 0, "dry_run": False,
                             "chunks_dropped": 0, "chunks_rewritten": 0, "chunk_files_deleted": 0,
                             "feature_entries": entries, "thumbnail_index_lines_dropped": 0, "exports_deleted": 0}
    assert entries == summary["load"]["models"]  # every extracted model is served: nothing to compact
    again = stages.run_pipeline(settings, "day-2", progress=lambda _: None)  # nothing changed: reused
    assert again["similarity"]["mode"] == "unchanged (reused)" and again["extract"] == []
    # an unchanged day gathers the hybrid's visual rows into a file of its own: named, and deleted once loaded
    day2 = Path(run_dir(settings, "day-2"))
    assert again["gc"]["working_files_deleted"] >= 2
    left = sorted(p.name for p in day2.iterdir())
    assert set(left) <= {key.name for key in run_folder_keys(day2)}, left
    assert not [name for name in left if "-shard-" in name or "-features-" in name or "-visual-" in name
                or name == "topk-deep.npz"], left
    assert {"topk.npz", "topk-hybrid.npz", "valid_models.json", "likes.npz"} <= set(left)
    # the run no longer live keeps its served lists (the gate scores them) but not its likes
    day1 = sorted(p.name for p in Path(run_dir(settings, "day-1")).iterdir())
    assert {"topk.npz", "topk-hybrid.npz", "valid_models.json"} <= set(day1) and "likes.npz" not in day1, day1
    # ids are stored as UTF-8 bytes and rows as int32: a kept list costs ~128 B a model, not ~312
    with np.load(day2 / "topk.npz") as data:
        assert data["mids"].dtype.kind == "S" and data["versions"].dtype.kind == "S"
        assert data["indices"].dtype == np.int32
    served = TopKStore(day2 / "topk.npz").require("similarity")
    assert served.indices.dtype == np.int64 and all(isinstance(m, str) and len(m) == 32 for m in served.mids)
    likes = RunLikes.read(day2)
    assert likes is not None and len(likes) > 0 and isinstance(likes["uid"].iloc[0], str)
