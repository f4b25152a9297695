"""What each stage hands to the next, as typed objects with one writer and one reader each.

Stages run in separate processes (Airflow tasks, CLI commands) and meet in the run's folder
(``<data dir>/runs/<run id>/``) and beside the feature chunks:

| object | file | written by | read by |
| --- | --- | --- | --- |
| ``ValidModels`` | ``valid_models.json`` | threshold | plan, similarity |
| ``ChunkPlan`` | ``chunk_plan.json`` | plan | extract |
| ``SimilarityPlan`` | ``similarity_plan.json`` | plan_similarity | similarity shards, merge |
| ``TopK`` | ``topk.npz`` (run), ``topk-latest-exact.npz`` (backbone) | ``TopKStore`` | load, the next incremental run |

Every write is atomic (``recsketch.files``); a missing file names the stage to run first.
The folder is a ``recsketch.storage.Location``: a local path or an object-store prefix.
No reader lists it: each object is read by the exact key a plan names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from recsketch import files
from recsketch.errors import RecsketchError
from recsketch.storage import Location

VALID_MODELS_FILE = "valid_models.json"
RUN_LIKES_FILE = "likes.npz"  # the thresholded likes the run was made from
PLAN_FILE = "chunk_plan.json"
SIMILARITY_PLAN_FILE = "similarity_plan.json"  # the hybrid neighbours': hybrid_plan.json (SimilarityPlan.name)
TOPK_FILE = "topk.npz"
LATEST_TOPK_FILE = "topk-latest-exact.npz"  # beside the backbone's chunks; exact runs only
SHARD_PREFIX = "similarity-shard-"  # the visual plan's shards (shard_path: "<plan name>-shard-")


def _read_json(path: Location, stage: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RecsketchError(f"{path} is missing: run the {stage} stage first") from None
    except json.JSONDecodeError as exc:
        raise RecsketchError(f"{path} is not valid JSON ({exc}): run the {stage} stage again") from None


def _write_json(path: Location, payload: object) -> None:
    files.write_text(path, json.dumps(payload, indent=1))


@dataclass(frozen=True)
class ValidModels:
    """The run's item set: each model that passed the threshold, with its thumbnail's version."""

    versions: dict[str, str]

    def write(self, folder: Location) -> None:
        _write_json(folder / VALID_MODELS_FILE, self.versions)

    @classmethod
    def read(cls, folder: Location) -> ValidModels:
        payload = _read_json(folder / VALID_MODELS_FILE, "threshold")
        if isinstance(payload, list):  # a plain list of mids: unversioned (synthetic runs)
            return cls(dict.fromkeys((str(mid) for mid in payload), ""))
        if not isinstance(payload, Mapping):
            raise RecsketchError(f"{folder / VALID_MODELS_FILE}: expected an object of mid -> thumbnail version")
        return cls({str(mid): str(version) for mid, version in payload.items()})

    def __len__(self) -> int:
        return len(self.versions)


class RunLikes:
    """The thresholded likes a run was made from, saved by threshold as integer codes and their
    names: evaluate and plan_hybrid measure and blend exactly these, even if a crawl changes
    the catalogue meanwhile, without reading and thresholding the likes table again."""

    @staticmethod
    def write(folder: Location, likes: pd.DataFrame) -> None:
        columns = {name: pd.Categorical(likes[name]).remove_unused_categories() for name in ("mid", "uid")}
        arrays = {}
        for name, column in columns.items():
            arrays[f"{name}_codes"] = column.codes.astype(np.int32)
            arrays[f"{name}_names"] = np.asarray(column.categories, dtype=str)
        files.save_npz(folder / RUN_LIKES_FILE, **arrays)

    @staticmethod
    def read(folder: Location) -> pd.DataFrame | None:
        """The run's likes (columns mid, uid, categorical), or None for a run made before they
        were saved."""
        try:
            data = files.load_npz(folder / RUN_LIKES_FILE)
        except FileNotFoundError:
            return None
        try:
            return pd.DataFrame({name: pd.Categorical.from_codes(data[f"{name}_codes"], data[f"{name}_names"])
                                 for name in ("mid", "uid")})
        except (KeyError, ValueError):
            raise RecsketchError(f"{folder / RUN_LIKES_FILE} is damaged: run the threshold stage again") from None


@dataclass(frozen=True)
class ChunkPlan:
    """The chunks to extract (chunk id -> mids) for one backbone configuration, and the extract
    tasks that make them (task id -> chunk ids): at most ``max_mapped_tasks`` tasks, so a
    catalogue of any size stays under Airflow's ``max_map_length``. A task that holds one
    chunk is named by it."""

    backbone_key: str
    chunks: dict[str, list[str]]
    tasks: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tasks:  # a plan of an older release: one task per chunk
            self.tasks.update({cid: [cid] for cid in self.chunks})

    def write(self, folder: Location) -> None:
        _write_json(folder / PLAN_FILE, {"backbone_key": self.backbone_key, "chunks": self.chunks,
                                         "tasks": self.tasks})

    @classmethod
    def read(cls, folder: Location) -> ChunkPlan:
        payload = _read_json(folder / PLAN_FILE, "plan")
        try:
            return cls(str(payload["backbone_key"]),
                       {str(cid): [str(m) for m in mids] for cid, mids in payload["chunks"].items()},
                       {str(tid): [str(c) for c in cids] for tid, cids in payload.get("tasks", {}).items()})
        except (KeyError, TypeError, AttributeError):
            raise RecsketchError(f"{folder / PLAN_FILE} is not a chunk plan: run the plan stage again") from None

    def chunks_of(self, task_id: str) -> list[str]:
        if task_id in self.tasks:
            return self.tasks[task_id]
        if task_id in self.chunks:  # a chunk named alone (``recsketch extract --chunk``)
            return [task_id]
        raise RecsketchError(f"{task_id!r} is neither an extract task nor a chunk of this run's plan")


def group_tasks(chunk_ids: list[str], max_tasks: int) -> dict[str, list[str]]:
    """Chunk ids (sorted) in at most ``max_tasks`` contiguous groups of near-equal size; a group of
    one chunk is named by it, a larger one ``chunks-<first>-<count>``."""
    ordered = sorted(chunk_ids)
    if len(ordered) <= max_tasks:
        return {cid: [cid] for cid in ordered}
    size, extra = divmod(len(ordered), max_tasks)
    tasks: dict[str, list[str]] = {}
    start = 0
    for index in range(max_tasks):
        part = ordered[start : start + size + (1 if index < extra else 0)]
        start += len(part)
        tasks[f"chunks-{part[0]}-{len(part)}"] = part
    return tasks


@dataclass(frozen=True)
class SimilarityPlan:
    """How a run's top-k is made: ``full`` (row-block shards over ``mids``, optionally on
    PCA-reduced features saved with the run) or finished already (incremental, unchanged).
    ``method``: the visual neighbours, or the hybrid ones (sharded alike over their own
    embedding; plan, features and shards under names of their own)."""

    mode: str
    mids: list[str] | None = None
    recall_at_k: float | None = None  # set when the features were PCA-reduced
    shards: list[tuple[int, int]] = field(default_factory=list)  # row blocks [first, last)
    method: str = "visual"

    @property
    def sharded(self) -> bool:
        return self.mode.startswith("full")

    @property
    def reduced(self) -> bool:
        return self.recall_at_k is not None

    @property
    def name(self) -> str:
        """What its files and stages are named after: ``similarity`` (the visual neighbours'
        ``similarity_plan.json``, ``similarity-shard-*``, ``plan_similarity``) or the method's."""
        return self.name_of(self.method)

    @staticmethod
    def name_of(method: str) -> str:
        return "similarity" if method == "visual" else method

    def write(self, folder: Location) -> None:
        payload: dict[str, object] = {"mode": self.mode, "mids": self.mids,
                                      "shards": [list(shard) for shard in self.shards]}
        if self.recall_at_k is not None:
            payload["recall_at_k"] = self.recall_at_k
        _write_json(folder / f"{self.name}_plan.json", payload)

    @classmethod
    def read(cls, folder: Location, method: str = "visual") -> SimilarityPlan:
        name = cls.name_of(method)
        path, stage = folder / f"{name}_plan.json", f"plan_{name}"
        payload = _read_json(path, stage)
        try:
            mids = payload["mids"]
            recall = payload.get("recall_at_k")
            shards = [(int(first), int(last)) for first, last in payload.get("shards", [])]
            return cls(str(payload["mode"]), None if mids is None else [str(m) for m in mids],
                       None if recall is None else float(recall), shards, method)
        except (KeyError, TypeError, AttributeError):
            raise RecsketchError(f"{path} is not a similarity plan: run {stage} again") from None

    def ordered_mids(self) -> list[str]:
        if self.mids is None:
            raise RecsketchError(f"similarity plan {self.mode!r} has no shards to compute")
        return self.mids

    @property
    def digest(self) -> str:
        """Names this plan's shard objects, so a shard of another plan is never merged."""
        named = [self.mode, *(self.mids or [])] if self.method == "visual" else [self.method, self.mode,
                                                                                *(self.mids or [])]
        return hashlib.sha1("\n".join(named).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TopK:
    """Each model's top-k neighbours: row i of ``indices``/``scores`` belongs to ``mids[i]``."""

    mids: list[str]
    indices: np.ndarray  # int64 [n, k]
    scores: np.ndarray  # float32 [n, k]
    backbone_key: str
    versions: list[str] = field(default_factory=list)  # thumbnail versions of ``mids`` (exact results)

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    def rows(self) -> list[tuple[str, int, str, float]]:
        """(mid, rank, similar mid, score) for the recommendations table."""
        return [(self.mids[i], rank + 1, self.mids[int(j)], float(s))
                for i in range(len(self.mids))
                for rank, (j, s) in enumerate(zip(self.indices[i], self.scores[i], strict=True))]


class TopKStore:
    """One top-k result file, written atomically: a run's (``for_run``) or the backbone's
    latest exact result (``latest``), the base of the next incremental run."""

    def __init__(self, path: Location) -> None:
        self.path = path

    @classmethod
    def for_run(cls, folder: Location, method: str = "visual") -> TopKStore:
        """The run's visual neighbours, or another method's (``hybrid``: ``topk-hybrid.npz``)."""
        return cls(folder / (TOPK_FILE if method == "visual" else f"topk-{method}.npz"))

    @classmethod
    def latest(cls, features_root: Location) -> TopKStore:
        return cls(features_root / LATEST_TOPK_FILE)

    def write(self, topk: TopK) -> None:
        files.save_npz(self.path, mids=np.array(topk.mids, dtype=str), indices=topk.indices, scores=topk.scores,
                       backbone_key=np.array(topk.backbone_key), versions=np.array(topk.versions, dtype=str))

    def read(self) -> TopK | None:
        """The stored result, or None when there is none (or it is unreadable: recomputed)."""
        try:
            data = files.load_npz(self.path)
            return TopK([str(m) for m in data["mids"]], data["indices"], data["scores"],
                        str(data["backbone_key"]), [str(v) for v in data["versions"]])
        except (OSError, KeyError, ValueError, EOFError):
            return None

    def require(self, stage: str) -> TopK:
        topk = self.read()
        if topk is None and self.path.exists():
            raise RecsketchError(f"{self.path} is unreadable or from an older release: run the {stage} stage again")
        if topk is None:
            raise RecsketchError(f"{self.path} is missing: run the {stage} stage first")
        return topk


def features_file(plan: SimilarityPlan) -> str:
    return f"{plan.name}-features-{plan.digest}.npy"


def shard_path(folder: Location, plan: SimilarityPlan, first: int, last: int) -> Location:
    return folder / f"{plan.name}-shard-{plan.digest}-{first:09d}-{last:09d}.npz"


def write_shard(folder: Location, plan: SimilarityPlan, first: int, last: int, indices: np.ndarray,
                scores: np.ndarray) -> None:
    files.save_npz(shard_path(folder, plan, first, last), indices=indices, scores=scores)


def read_shards(folder: Location, plan: SimilarityPlan) -> tuple[int, np.ndarray, np.ndarray]:
    """(shards found, indices, scores) of the plan's shards, by their exact keys, in row order;
    a missing shard raises, naming it."""
    index_parts, score_parts = [], []
    for first, last in plan.shards:
        path = shard_path(folder, plan, first, last)
        try:
            part = files.load_npz(path)
        except FileNotFoundError:
            raise RecsketchError(f"{plan.name} shard rows {first}-{last} ({path}) is missing: "
                                 f"run the {plan.name} shards again") from None
        index_parts.append(part["indices"])
        score_parts.append(part["scores"])
    if not index_parts:
        return 0, np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32)
    return len(index_parts), np.concatenate(index_parts), np.concatenate(score_parts)
