"""One line per stage of a DAG run, from its task logs: what it did, how many, how fast.

``make demo`` runs the DAGs with ``airflow dags test`` and prints this over their log, then the
commands that query what the run loaded. Every task logs ``<task> summary: {json}`` and
``<task>: done in N s`` (``dags/recsketch_dags.py``); mapped tasks are summed here.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from recsketch import stages

SUMMARY = re.compile(r"\b(\w+) summary: (\{.*\}|\[.*\])")
DONE = re.compile(r"\b(\w+): done in ([\d.]+) s")
ORDER = tuple(task.name for task in stages.TASKS)  # the DAG's tasks, in the order they run


def read_log(path: Path) -> tuple[dict[str, list[Any]], dict[str, float]]:
    summaries: dict[str, list[Any]] = defaultdict(list)
    seconds: dict[str, float] = defaultdict(float)
    for line in path.read_text(errors="replace").splitlines():
        if found := SUMMARY.search(line):
            try:
                parsed = json.loads(found.group(2))
            except json.JSONDecodeError:
                continue
            summaries[found.group(1)].append(parsed)
        elif found := DONE.search(line):
            seconds[found.group(1)] += float(found.group(2))
    return summaries, seconds


def _line(task: str, runs: list[Any], took: float) -> str | None:
    last = runs[-1]
    if task == "crawl":
        missing = last.get("thumbnails_missing", 0)
        return (f"{last['models']} models listed, {last['likes']} likes, {last['thumbnails_ok']} thumbnails stored"
                f"{f' ({missing} model has none)' if missing == 1 else f' ({missing} have none)' if missing else ''}")
    if task == "threshold":
        return (f"{last['valid_models']} of {last['with_thumbnail']} models with a thumbnail pass the like threshold "
                f"(>= 5 likes from users with >= 5 likes), {last['likes']} likes kept")
    if task == "extract":
        images = sum(run["images"] for run in runs)
        failed = sum(run["failed"] for run in runs)
        embedding = max((run["images_per_s"] for run in runs), default=0.0)
        rate = f", {embedding:.0f} img/s while embedding (the rest is loading the model)" if embedding else ""
        return (f"{images} thumbnails embedded in {_count(sum(run['chunks'] for run in runs), 'chunk')} by "
                f"{_count(len(runs), 'mapped task')}{rate}, {failed} failed")
    if task in ("merge_similarity", "merge_hybrid"):
        if not last.get("models"):
            return "no hybrid lists (too few models to tune a CF weight)"
        what = "visual" if task == "merge_similarity" else "pictures and likes blended"
        shards = f" in {_count(last['shards'], 'shard')}" if last.get("shards") else ""
        return f"{what}: top-{last['k']} for {last['models']} models ({last['mode']}){shards}"
    if task == "evaluate":
        scores = {key.removesuffix("_ndcg@10"): value for key, value in last.items() if key.endswith("_ndcg@10")}
        ranked = sorted(scores.items(), key=lambda item: -item[1])
        best, chance = ranked[0], scores.get("random") or 0.0
        takeaway = (f"{best[0]} ranks held-out likes best, {best[1] / chance:.1f}x chance" if chance
                    else f"{best[0]} ranks held-out likes best")
        return "NDCG@10 " + ", ".join(f"{name} {value:.3f}" for name, value in ranked) + f": {takeaway}"
    if task == "load":
        return f"{last['rows']} recommendations for {last['models']} models are live as run {last['run_id']}"
    return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _took(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def report(path: Path) -> list[str]:
    summaries, seconds = read_log(path)
    lines = []
    names = {"merge_similarity": "similarity", "merge_hybrid": "hybrid"}
    for task in ORDER:
        if task not in summaries:
            continue
        took = seconds.get(task, 0.0)
        if task in names:  # a step's line: its plan, shards and merge together
            part = stages.step(names[task])
            took += sum(seconds.get(t.name, 0.0) for t in (part.plan, part.each) if t is not None)
        text = _line(task, summaries[task], took)
        if text is not None:
            lines.append(f"{names.get(task, task):<11}{text} [{_took(took)}]")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="the output of `airflow dags test` for both DAGs")
    print("\n".join(report(parser.parse_args().log)))


if __name__ == "__main__":
    main()
