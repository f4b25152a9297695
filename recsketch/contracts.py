"""What each stage hands to the next, as typed objects with one writer and one reader each.

Stages run in separate processes (Airflow tasks, CLI commands) and meet in the run's folder
(``<data dir>/runs/<run id>/``) and beside the feature chunks:

- ``CrawlReport``: ``crawl_stats.json``, by crawl, for whoever looks into a run;
- ``ValidModels``: ``valid_models.json``, by threshold, for plan, similarity and evaluate;
- ``RunLikes``: ``likes.npz``, by threshold, for evaluate and plan_hybrid;
- ``ChunkPlan``: ``chunk_plan.json``, by plan, for extract and plan_similarity;
- ``EvaluationReport``: ``evaluation.json``, by evaluate, for plan_hybrid, load and the CLI;
- ``SimilarityPlan``: ``<name>_plan.json``, ``<name>-features-<digest>.npy``,
  ``<name>-refresh-<digest>.npz`` (incremental plans) and
  ``<name>-shard-<digest>-<first>-<last>.npz``, by plan_<name> and the shards, for the shards
  and merge_<name>;
- ``TopKStore``: ``topk.npz`` and ``topk-hybrid.npz`` (run), ``topk-latest-exact.npz``
  (beside the chunks), by merge or plan_similarity, for load, plan_hybrid and the next
  incremental run;
- ``ChunkStore`` (``recsketch.features.chunks``): ``chunk-*.npz`` and ``manifest.json``
  beside the chunks, by extract and plan_similarity, for plan, similarity and evaluate.

``<name>`` is ``similarity`` (visual) or ``hybrid`` (``Method.file_name``). Every write is
atomic (``recsketch.storage``); a missing file names the stage to run first. The folder is a
``recsketch.storage.Location``: a local path or an object-store prefix. No reader lists it:
each object is read by the exact key a plan names. :func:`owner_of` names the class of any
file a run folder holds.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd

from recsketch import storage
from recsketch.errors import RecsketchError
from recsketch.similarity import Refresh
from recsketch.storage import Location

VALID_MODELS_FILE = "valid_models.json"
RUN_LIKES_FILE = "likes.npz"  # the thresholded likes the run was made from
PLAN_FILE = "chunk_plan.json"
TOPK_FILE = "topk.npz"
LATEST_TOPK_FILE = "topk-latest-exact.npz"  # beside the backbone's chunks: the deep lists of the last exact run
LIKES_FIT_FILE = "likes-fit.npz"  # a run's ALS factors (plan_hybrid), kept by merge_hybrid as the next day's base
DEEP_TOPK_FILE = "topk-deep.npz"  # a run's exact visual lists to RECSKETCH_NEIGHBOUR_DEPTH (exact runs only)
EVALUATION_FILE = "evaluation.json"
CRAWL_STATS_FILE = "crawl_stats.json"


def _read_json(path: Location, stage: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RecsketchError(f"{path} is missing: run the {stage} stage first") from None
    except json.JSONDecodeError as exc:
        raise RecsketchError(f"{path} is not valid JSON ({exc}): run the {stage} stage again") from None


def _write_json(path: Location, payload: object) -> None:
    storage.write_text(path, json.dumps(payload, indent=1))


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
            arrays[f"{name}_names"] = storage.text_array(list(column.categories))
        storage.save_npz(folder / RUN_LIKES_FILE, **arrays)

    @staticmethod
    def read(folder: Location) -> pd.DataFrame | None:
        """The run's likes (columns mid, uid, categorical), or None for a run made before they
        were saved."""
        try:
            data = storage.load_npz(folder / RUN_LIKES_FILE)
        except FileNotFoundError:
            return None
        try:
            return pd.DataFrame({name: pd.Categorical.from_codes(data[f"{name}_codes"],
                                                                 storage.texts(data[f"{name}_names"]))
                                 for name in ("mid", "uid")})
        except (KeyError, ValueError):
            raise RecsketchError(f"{folder / RUN_LIKES_FILE} is damaged: run the threshold stage again") from None


PRIMARY_METRIC = ("visual", "ndcg@10")  # what the quality gate compares


@dataclass(frozen=True)
class EvaluationReport:
    """What evaluate measured (``recsketch.evaluation.evaluate``'s report, also what
    ``recsketch evaluate --json`` prints): load stores its metrics and gates on them,
    plan_hybrid blends at its tuned CF weight, the gallery shows it."""

    payload: dict[str, Any]

    def write(self, folder: Location) -> None:
        _write_json(folder / EVALUATION_FILE, self.payload)

    @classmethod
    def read(cls, folder: Location) -> EvaluationReport | None:
        """The run's report, or None when the run was not evaluated."""
        try:
            return cls(_read_json(folder / EVALUATION_FILE, "evaluate"))
        except RecsketchError:
            if not (folder / EVALUATION_FILE).exists():
                return None
            raise

    @classmethod
    def require(cls, folder: Location) -> EvaluationReport:
        return cls(_read_json(folder / EVALUATION_FILE, "evaluate"))

    @property
    def cf_weight(self) -> float | None:
        """The hybrid's tuned CF weight (None: too few models to tune one)."""
        return self._hybrid_weight("cf_weight")

    @property
    def cold_cf_weight(self) -> float | None:
        """The CF weight the cold start was ranked at (tuned apart from the warm one; None: none)."""
        return self._hybrid_weight("cold_cf_weight")

    def _hybrid_weight(self, key: str) -> float | None:
        weight = (self.payload.get("hybrid") or {}).get(key)
        return None if weight is None else float(weight)

    @property
    def hybrid_likes(self) -> str:
        """The hybrid's likes half evaluate chose on validation: "als" (likes rows) or "itemknn"
        (a report from before the choice: "als")."""
        return str((self.payload.get("hybrid") or {}).get("likes") or "als")

    @property
    def als_params(self) -> dict[str, float] | None:
        """ALS's hyperparameters chosen on validation (None: a report from before the tuning)."""
        params = (self.payload.get("als") or {}).get("params")
        return dict(params) if params else None

    def metric(self, method: str, metric: str) -> float | None:
        value = self.payload.get("methods", {}).get(method, {}).get(metric)
        return None if value is None else float(value)

    @property
    def primary(self) -> float | None:
        return self.metric(*PRIMARY_METRIC)

    def metric_rows(self) -> list[dict]:
        """The ``run_metrics`` rows: one per (method, metric, split)."""
        rows = [{"method": method, "metric": metric, "split": split, "value": float(value)}
                for section, split in (("methods", "warm"), ("cold_start", "cold_start"))
                for method, values in self.payload.get(section, {}).items() for metric, value in values.items()]
        als = self.payload.get("als") or {}  # the tuning's choice and what it scored on validation
        if als.get("params"):
            rows.append({"method": "cf", "metric": "ndcg@10", "split": "validation",
                         "value": float(als["validation_ndcg@10"])})
            rows += [{"method": "cf", "metric": f"als_{name}", "split": "chosen", "value": float(value)}
                     for name, value in als["params"].items()]
        if self.cf_weight is not None:
            rows.append({"method": "hybrid", "metric": "cf_weight", "split": "chosen", "value": self.cf_weight})
        if self.cold_cf_weight is not None:
            rows.append({"method": "hybrid", "metric": "cold_cf_weight", "split": "chosen",
                         "value": self.cold_cf_weight})
        return rows


class CrawlReport:
    """A crawl's statistics (``CrawlStats.as_dict``), kept with the run for whoever looks into
    it later: the operations guide and the crawl tests read it."""

    @staticmethod
    def write(folder: Location, stats: Mapping[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        storage.write_text(folder / CRAWL_STATS_FILE, json.dumps(stats, indent=2, default=str))

    @staticmethod
    def read(folder: Location) -> dict[str, Any]:
        payload = _read_json(folder / CRAWL_STATS_FILE, "crawl")
        if not isinstance(payload, dict):
            raise RecsketchError(f"{folder / CRAWL_STATS_FILE} is not a crawl's statistics: run the crawl again")
        return payload


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


class Method(StrEnum):
    """A kind of neighbour list a run serves (``recommendations.method``)."""

    VISUAL = "visual"
    HYBRID = "hybrid"

    @property
    def file_name(self) -> str:
        """What its files and tasks are named after: ``similarity`` for the visual lists (the
        names of the first release), else the method."""
        return "similarity" if self is Method.VISUAL else self.value


class PlanMode(StrEnum):
    """How a run's neighbours are made: row-block shards over every model, or finished at plan
    time (worked into the last result, reused whole), or not at all."""

    FULL = "full"
    INCREMENTAL = "incremental"
    BOUNDED = "bounded"  # hybrid: exact from the visual lists and one scan of the CF factors
    UNCHANGED = "unchanged"
    NONE = "none"

    @classmethod
    def parse(cls, text: str) -> tuple[PlanMode, str]:
        """(mode, detail) of a plan's ``mode`` as written: the enum value with a ``detail``
        beside it, or the free text of releases before it (``full, PCA 6->3-d``)."""
        for mode in cls:
            if text == mode.value:
                return mode, ""
            if text.startswith(mode.value + ", ") or text.startswith(mode.value + " ("):
                return mode, text[len(mode.value) + 2:].removesuffix(")" if text[len(mode.value) + 1] == "(" else "")
        raise ValueError(f"unknown plan mode {text!r}")


@dataclass(frozen=True)
class SimilarityPlan:
    """How a run's neighbours of one ``method`` are made (``mode``). A full plan names the
    models (``mids``, the rows of its unit features file) and the row-block ``shards`` to
    compute; ``recall_at_k`` is set when the features were PCA-reduced. The plan, its features
    and its shards are named after the method (``Method.file_name``) and the plan's digest,
    so a shard of another plan is never merged."""

    mode: PlanMode
    mids: list[str] | None = None
    recall_at_k: float | None = None
    shards: list[tuple[int, int]] = field(default_factory=list)  # row blocks [first, last)
    method: Method = Method.VISUAL
    detail: str = ""  # what the log and the summary add to the mode: "PCA 6->3-d", "20 new x 60"

    @property
    def sharded(self) -> bool:
        """Made by row-block shards over the plan's unit rows: a full pass, or a large refresh."""
        return bool(self.shards)

    @property
    def reduced(self) -> bool:
        return self.recall_at_k is not None

    @property
    def name(self) -> str:
        return self.method.file_name

    @property
    def label(self) -> str:
        """The mode as the summaries print it: ``full``, ``full, PCA 6->3-d``, ``incremental (20 new x 60)``."""
        if not self.detail:
            return self.mode.value
        if self.mode is PlanMode.FULL:
            return f"{self.mode.value}, {self.detail}"
        return f"{self.mode.value} ({self.detail})"

    @staticmethod
    def path(folder: Location, method: Method) -> Location:
        return folder / f"{method.file_name}_plan.json"

    def write(self, folder: Location) -> None:
        """The plan, replacing the run's plan of this method: a replaced plan of other inputs (a
        rerun after the catalogue moved) takes its features and shards with it, so the folder
        holds only what its plans name (``run_folder_keys``)."""
        try:
            replaced: SimilarityPlan | None = SimilarityPlan.read(folder, self.method)
        except RecsketchError:
            replaced = None
        if replaced is not None and replaced.digest != self.digest:
            for key in replaced.keys(folder):
                key.unlink(missing_ok=True)
        payload: dict[str, object] = {"mode": self.mode.value, "detail": self.detail, "mids": self.mids,
                                      "shards": [list(shard) for shard in self.shards]}
        if self.recall_at_k is not None:
            payload["recall_at_k"] = self.recall_at_k
        _write_json(self.path(folder, self.method), payload)

    @classmethod
    def read(cls, folder: Location, method: Method = Method.VISUAL) -> SimilarityPlan:
        method = Method(method)
        path, stage = cls.path(folder, method), f"plan_{method.file_name}"
        payload = _read_json(path, stage)
        try:
            mode, detail = PlanMode.parse(str(payload["mode"]))
            mids = payload["mids"]
            recall = payload.get("recall_at_k")
            shards = [(int(first), int(last)) for first, last in payload.get("shards", [])]
            return cls(mode, None if mids is None else [str(m) for m in mids],
                       None if recall is None else float(recall), shards, method,
                       str(payload.get("detail", detail)))
        except (KeyError, TypeError, AttributeError, ValueError):
            raise RecsketchError(f"{path} is not a similarity plan: run {stage} again") from None

    def ordered_mids(self) -> list[str]:
        if self.mids is None:
            raise RecsketchError(f"similarity plan {self.label!r} has no shards to compute")
        return self.mids

    @property
    def digest(self) -> str:
        """Names this plan's features and shards (the same digest as releases before the enum)."""
        named = [self.label, *(self.mids or [])]
        if self.method is not Method.VISUAL:
            named.insert(0, self.method.value)
        return hashlib.sha1("\n".join(named).encode()).hexdigest()[:12]

    def features_path(self, folder: Location) -> Location:
        """The plan's unit rows, one per model of ``mids``: what every shard reads."""
        return folder / f"{self.name}-features-{self.digest}.npy"

    def visual_rows_path(self, folder: Location) -> Location:
        """A hybrid plan's unit visual rows, when the visual plan wrote none for its models."""
        return folder / f"{self.name}-visual-{self.digest}.npy"

    def shard_path(self, folder: Location, first: int, last: int) -> Location:
        return folder / f"{self.name}-shard-{self.digest}-{first:09d}-{last:09d}.npz"

    def keys(self, folder: Location) -> list[Location]:
        """Every key this plan may have written beside itself (each may be absent)."""
        named = [self.features_path(folder), self.refresh_path(folder)]
        if self.method is not Method.VISUAL:
            named.append(self.visual_rows_path(folder))
        return named + [self.shard_path(folder, first, last) for first, last in self.shards]

    def write_shard(self, folder: Location, first: int, last: int, indices: np.ndarray, scores: np.ndarray,
                    stats: Mapping[str, Any] | None = None) -> None:
        """A shard's lists, and what it measured (``stats``: counts a merge sums, as JSON)."""
        storage.save_npz(self.shard_path(folder, first, last), indices=indices, scores=scores,
                         stats=np.array(json.dumps(dict(stats or {}))))

    def read_shard_stats(self, folder: Location) -> list[dict[str, Any]]:
        """Each shard's ``stats`` (empty for shards written before they were kept)."""
        found = []
        for first, last in self.shards:
            part = storage.load_npz(self.shard_path(folder, first, last))
            found.append(json.loads(str(part["stats"])) if "stats" in part else {})
        return found

    def refresh_path(self, folder: Location) -> Location:
        """An incremental plan's refresh (``similarity.Refresh``): which rows keep their lists."""
        return folder / f"{self.name}-refresh-{self.digest}.npz"

    def write_refresh(self, folder: Location, refresh: Refresh) -> None:
        storage.save_npz(self.refresh_path(folder), clean=refresh.clean, known_indices=refresh.known_indices,
                         known_scores=refresh.known_scores, fresh=refresh.fresh, limit=refresh.limit)

    def read_refresh(self, folder: Location) -> Refresh:
        try:
            data = storage.load_npz(self.refresh_path(folder))
            return Refresh(data["clean"], data["known_indices"], data["known_scores"], data["fresh"], data["limit"])
        except FileNotFoundError:
            raise RecsketchError(f"{self.refresh_path(folder)} is missing: run plan_{self.name} again") from None
        except (KeyError, ValueError):
            raise RecsketchError(f"{self.refresh_path(folder)} is damaged: run plan_{self.name} again") from None

    def read_shards(self, folder: Location) -> tuple[np.ndarray, np.ndarray]:
        """(indices, scores) of every shard, by their exact keys, in row order; a missing one
        raises, naming it."""
        index_parts, score_parts = [], []
        for first, last in self.shards:
            path = self.shard_path(folder, first, last)
            try:
                part = storage.load_npz(path)
            except FileNotFoundError:
                raise RecsketchError(f"{self.name} shard rows {first}-{last} ({path}) is missing: "
                                     f"run the {self.name} shards again") from None
            index_parts.append(part["indices"])
            score_parts.append(part["scores"])
        if not index_parts:
            return np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32)
        return np.concatenate(index_parts), np.concatenate(score_parts)


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
    def for_run(cls, folder: Location, method: Method = Method.VISUAL) -> TopKStore:
        """The run's visual neighbours, or another method's (``hybrid``: ``topk-hybrid.npz``)."""
        method = Method(method)  # a Method, or its value as a caller wrote it
        return cls(folder / (TOPK_FILE if method is Method.VISUAL else f"topk-{method.value}.npz"))

    @classmethod
    def latest(cls, features_root: Location) -> TopKStore:
        return cls(features_root / LATEST_TOPK_FILE)

    @classmethod
    def deep_for_run(cls, folder: Location) -> TopKStore:
        """The run's exact visual lists to their full depth (-1 / -inf pads where a list is
        shorter): what the hybrid's bound reads."""
        return cls(folder / DEEP_TOPK_FILE)

    def write(self, topk: TopK) -> None:
        narrow = topk.indices.size == 0 or int(topk.indices.max()) < 2**31  # row numbers: int32 halves them
        storage.save_npz(self.path, mids=storage.text_array(topk.mids),
                         indices=topk.indices.astype(np.int32) if narrow else topk.indices, scores=topk.scores,
                         backbone_key=np.array(topk.backbone_key), versions=storage.text_array(topk.versions))

    def read(self) -> TopK | None:
        """The stored result, or None when there is none (or it is unreadable: recomputed)."""
        try:
            data = storage.load_npz(self.path)
            return TopK(storage.texts(data["mids"]), data["indices"].astype(np.int64), data["scores"],
                        str(data["backbone_key"]), storage.texts(data["versions"]))
        except (OSError, KeyError, ValueError, EOFError):
            return None

    def read_models(self) -> tuple[list[str], list[str]] | None:
        """The result's (mids, versions) alone: locally the lists themselves are not read."""
        try:
            data = storage.load_npz(self.path, ("mids", "versions"))
            return storage.texts(data["mids"]), storage.texts(data["versions"])
        except (OSError, KeyError, ValueError, EOFError):
            return None

    def require(self, stage: str) -> TopK:
        topk = self.read()
        if topk is None and self.path.exists():
            raise RecsketchError(f"{self.path} is unreadable or from an older release: run the {stage} stage again")
        if topk is None:
            raise RecsketchError(f"{self.path} is missing: run the {stage} stage first")
        return topk


RUN_FOLDER_FILES: tuple[tuple[str, str], ...] = (  # (file name pattern, the class that owns it)
    (re.escape(CRAWL_STATS_FILE), "CrawlReport"),
    (re.escape(VALID_MODELS_FILE), "ValidModels"),
    (re.escape(RUN_LIKES_FILE), "RunLikes"),
    (re.escape(PLAN_FILE), "ChunkPlan"),
    (re.escape(EVALUATION_FILE), "EvaluationReport"),
    (r"(similarity|hybrid)_plan\.json", "SimilarityPlan"),
    (r"(similarity|hybrid)-(features|visual|shard|refresh)-[0-9a-f]{12}(-\d{9}-\d{9})?\.(npy|npz)",
     "SimilarityPlan"),
    (r"topk(-hybrid|-deep)?\.npz", "TopKStore"),
    (re.escape(LIKES_FIT_FILE), "LikesFit"),
)


def hybrid_visual_rows_key(folder: Location, mids: list[str], versions: list[str]) -> Location:
    """Where plan_hybrid gathers the unit visual rows of the run's lists (``mids`` at
    ``versions``) when the visual plan wrote none at full dimension (an unchanged day)."""
    named = hashlib.sha1("\n".join(f"{m} {v}" for m, v in zip(mids, versions or [""] * len(mids), strict=True))
                         .encode()).hexdigest()[:12]
    return folder / f"{Method.HYBRID.file_name}-visual-{named}.npy"


def run_working_keys(folder: Location) -> list[Location]:
    """The keys a run's tasks write for each other and nothing reads once its lists are merged
    and loaded: what its plans name (gathered features, refresh plans, shards), the hybrid's
    gathered visual rows and the deep visual lists its bound reads."""
    named: list[Location] = []
    for method in Method:
        try:
            named += SimilarityPlan.read(folder, method).keys(folder)
        except RecsketchError:  # no plan of this method (or unreadable: its files were never named)
            continue
    models = TopKStore.for_run(folder).read_models()
    if models is not None:
        named.append(hybrid_visual_rows_key(folder, *models))
    return [*named, folder / DEEP_TOPK_FILE, folder / LIKES_FIT_FILE]


def run_folder_keys(folder: Location) -> list[Location]:
    """Every key a run folder may hold, by name (an object store is never listed): the working
    files first, then the fixed files, the plans last, so a deletion cut short finds the rest
    again. A test runs the pipeline and checks that nothing in a folder is missing here."""
    fixed = [CRAWL_STATS_FILE, VALID_MODELS_FILE, RUN_LIKES_FILE, EVALUATION_FILE, TOPK_FILE,
             *(f"topk-{method.value}.npz" for method in Method if method is not Method.VISUAL)]
    plans = [PLAN_FILE, *(SimilarityPlan.path(folder, method).name for method in Method)]
    return run_working_keys(folder) + [folder / name for name in fixed + plans]


def owner_of(name: str) -> str | None:
    """The contract class that writes and reads a run folder's file ``name`` (None: no contract)."""
    return next((owner for pattern, owner in RUN_FOLDER_FILES if re.fullmatch(pattern, name)), None)
