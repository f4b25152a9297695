"""The ``recsketch`` command (docs/contracts.md §3).

Every subcommand's flags go, as keywords named by their ``dest``, to one handler whose
parameters are exactly those flags (``tests/unit/test_cli_flags.py`` checks that each one is
read), so a flag cannot be parsed and dropped. The pipeline's subcommands come from
``recsketch.stages.STEPS``, the registry the DAG uses too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from recsketch.config import BACKBONES, Settings
from recsketch.errors import ConfigError, InvalidModelId, RecsketchError, UnknownModel
from recsketch.ids import printable
from recsketch.stages import STEPS, Option, Step, run_options
from recsketch.timestamps import parse_utc

log = logging.getLogger("recsketch")
SETTINGS_FLAGS = ("backbone", "top_k", "min_likes", "chunk_size")  # the pipeline options: Settings overrides


MAX_COUNT = 1_000_000  # a count of models or recommendations on the command line


def _positive(value: str) -> int:
    number = int(value)
    if not 1 <= number <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{value} must be between 1 and {MAX_COUNT:,}")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is no TCP port (0 to 65535)")
    return number


def _rate(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be a probability between 0 and 1")
    return number


def _pipeline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", help=f"feature backbone: {', '.join(BACKBONES)} (RECSKETCH_BACKBONE; "
                        "default efficientnet_lite0)")
    # values are checked by Settings, the one validation layer: argparse only reads them
    parser.add_argument("--top-k", type=int, help="recommendations per model (RECSKETCH_TOP_K; default 10)")
    parser.add_argument("--min-likes", type=int,
                        help="like threshold for users and models (RECSKETCH_MIN_LIKES; default 5; 0 keeps all)")
    parser.add_argument("--chunk-size", type=int, help="models per feature chunk (RECSKETCH_CHUNK_SIZE; default 256)")
    parser.set_defaults(pipeline_options=True)  # invocation() folds these four into the Settings


def _add_option(parser: argparse.ArgumentParser, option: Option) -> None:
    if option.kind == "flag":
        parser.add_argument(option.flag, dest=option.name, action="store_true", help=option.help)
    elif option.kind == "list":
        parser.add_argument(option.flag, dest=option.name, action="append", help=option.help)
    else:
        parser.add_argument(option.flag, dest=option.name, help=option.help,
                            type=parse_utc if option.kind == "timestamp" else str)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsketch", description="Sketchfab thumbnails -> visual "
                                     "'more like this' recommendations (README.md; docs/ for the rest)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve-sketchfab", help="serve a rec-a-sketch data folder as the Sketchfab API")
    serve.add_argument("folder", type=Path, help="a folder with model_urls.psv, model_likes_anon.psv, model_thumbs/")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8765, help="port to listen on (default 8765)")
    serve.add_argument("--fault-429", type=_rate, default=0.0, help="share of API requests answered 429")
    serve.add_argument("--retry-after", type=float, default=None, help="Retry-After seconds sent with 429s")
    serve.add_argument("--fault-5xx", type=_rate, default=0.0, help="share of API requests answered 503")
    serve.add_argument("--fault-truncate", type=_rate, default=0.0,
                       help="share of responses cut off before their Content-Length")
    serve.add_argument("--fault-bad-json", type=_rate, default=0.0, help="share of API answers with broken JSON")
    serve.add_argument("--latency-ms", type=float, default=0.0, help="added latency per API request")
    serve.add_argument("--seed", type=int, default=0, help="seed of the fault generator")
    serve.add_argument("--now", type=parse_utc, default=None,
                       help="the server's clock: models and likes after it are hidden (POST /_clock?now= moves it)")
    serve.add_argument("--public-url", default=None,
                       help="the base URL its next links and thumbnails name (default: http://HOST:PORT; never the "
                            "request's Host header)")
    serve.add_argument("--test-controls", action="store_true",
                       help="allow the test controls: the fault switches, POST /_clock and POST /_reload (never on a "
                            "server anyone else can reach)")
    serve.add_argument("--thumbnail-url", default=None,
                       help="base URL of another host that serves the thumbnails (e.g. a second serve-sketchfab)")

    run = commands.add_parser("run", help="the whole pipeline in this process, without Airflow")
    _pipeline_options(run)
    run.add_argument("--run-id", help="run id: the run's folder under <data dir>/runs (default manual__<UTC time>)")
    for option in run_options():
        _add_option(run, option)

    similar = commands.add_parser("similar", help="recommendations for one model, from the DB")
    similar.add_argument("mid", help="the model's id (32 hex characters, or a legacy id)")
    similar.add_argument("--top-k", type=_positive, help="how many (default: all that are stored)")
    similar.add_argument("--json", dest="as_json", action="store_true", help="print a JSON list, best first")
    similar.add_argument("--method", choices=("visual", "hybrid"), default="visual",
                         help="visual: by the pictures (default); hybrid: pictures and likes together")

    for part in STEPS:
        if part.name in ("evaluate", "gc"):
            continue  # their own subcommands below: they also run without a run
        stage = commands.add_parser(part.name, help=part.help)
        _pipeline_options(stage)
        stage.add_argument("--run-id", required=True, help="the run whose folder the stages share")
        for option in part.options:
            _add_option(stage, option)

    gc = commands.add_parser("gc", help="retention: delete the run folders past RECSKETCH_KEEP_RUNS and compact "
                             "the feature chunks (the load does it too)")
    gc.add_argument("--dry-run", dest="dry_run", action="store_true",
                    help="print what would be kept and deleted, delete nothing")

    evaluate = commands.add_parser("evaluate", help="offline quality: every method ranked on held-out likes")
    _pipeline_options(evaluate)
    evaluate.add_argument("--run-id", help="evaluate this run's models and store the report with the run "
                          "(what the DAG's evaluate task does); default: the catalogue's models with features")
    evaluate.add_argument("--json", dest="as_json", action="store_true", help="print the whole report as JSON")
    evaluate.add_argument("--holdout", type=float, help="test on this share of each user's likes, drawn at random "
                          "(default: the held-out likes, 20 %% by a hash of the like, that no served list was "
                          "fitted on)")
    evaluate.add_argument("--cold", type=float, default=0.1, help="share of models held out with all their likes (0.1)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the split and the samples (0)")
    evaluate.add_argument("--max-users", type=_positive, help="users ranked for (sampled; RECSKETCH_EVAL_MAX_USERS)")

    db = commands.add_parser("db", help="schema migrations of the recommendations DB (Alembic)")
    db.add_argument("action", choices=("upgrade", "current"),
                    help="upgrade: apply every migration the DB lacks; current: its revision and the code's")

    demo = commands.add_parser("demo-catalog", help="build the demo catalogue from offline photos")
    demo.add_argument("folder", type=Path, help="where to write it (a rec-a-sketch data folder)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the variants and the likes (0)")

    importer = commands.add_parser("import", help="a rec-a-sketch folder (model_urls.psv, model_likes_anon.psv, "
                                   "model_thumbs/) straight into the catalogue, no HTTP")
    importer.add_argument("folder", type=Path, help="the rec-a-sketch data folder")
    show = commands.add_parser("show", help="print some models with their top recommendations, from the DB")
    show.add_argument("--models", type=_positive, default=5, help="how many models (5)")
    show.add_argument("--top-k", type=_positive, default=3, help="recommendations each (3)")
    return parser


def settings_for(backbone: str | None = None, top_k: int | None = None, min_likes: int | None = None,
                 chunk_size: int | None = None) -> Settings:
    return Settings.from_env().with_overrides(backbone=backbone, top_k=top_k, min_likes=min_likes,
                                              chunk_size=chunk_size)


def _serve(folder: Path, host: str, port: int, fault_429: float, retry_after: float | None, fault_5xx: float,
           fault_truncate: float, fault_bad_json: float, latency_ms: float, seed: int, now: datetime | None,
           thumbnail_url: str | None, test_controls: bool = False, public_url: str | None = None) -> int:
    from recsketch.sketchfab.server import Catalog, Faults, SketchfabServer

    switched = [name for name, value in (("--fault-429", fault_429), ("--fault-5xx", fault_5xx),
                                         ("--fault-truncate", fault_truncate), ("--fault-bad-json", fault_bad_json),
                                         ("--latency-ms", latency_ms)) if value]
    if switched and not test_controls:
        raise ConfigError(f"{', '.join(switched)} are test controls: start the server with --test-controls too")
    faults = Faults(rate_429=fault_429, retry_after=retry_after, rate_5xx=fault_5xx, rate_truncate=fault_truncate,
                    rate_bad_json=fault_bad_json, latency_s=latency_ms / 1000.0, seed=seed)
    catalog = Catalog(folder)
    try:
        server = SketchfabServer(catalog, (host, port), faults, now=now,
                                 thumbnail_url=thumbnail_url.rstrip("/") if thumbnail_url else None,
                                 test_controls=test_controls, public_url=public_url)
    except OSError as exc:  # the port is taken, the address is not this machine's, ...
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    print(f"serving {len(catalog.models)} models from {folder} at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _demo_catalog(folder: Path, seed: int) -> int:
    from recsketch.demo import build_demo_catalog, describe_demo_catalog

    build_demo_catalog(folder, seed=seed)
    print(describe_demo_catalog(folder))
    return 0


def _db(settings: Settings, action: str) -> int:
    from recsketch.db import migrate, store

    engine = store.engine_for(settings.resolved_database_url)
    try:
        if action == "upgrade":
            before, after = migrate.upgrade(engine)
            print(f"schema: {before or 'none'} -> {after} (head {migrate.head()})")
        else:
            print(f"schema: {migrate.current(engine) or 'none'} (this code needs {migrate.head()})")
    except RecsketchError:
        raise
    except Exception as exc:
        raise store.unavailable(engine, exc) from exc
    return 0


def _similar(settings: Settings, mid: str, top_k: int | None, as_json: bool, method: str) -> int:
    from recsketch.db import store

    engine = store.connect(settings.resolved_database_url, read_only=True)
    results = store.similar(engine, mid, top_k, method=method)
    if as_json:
        print(json.dumps(results))
    else:
        for row in results:
            print(f"{row['rank']:3d}  {row['score']:.4f}  {row['mid']}  {printable(row['name'])}")
    return 0


def _evaluate(settings: Settings, run_id: str | None, as_json: bool, holdout: float | None, cold: float,
              seed: int, max_users: int | None) -> int:
    from recsketch.contracts import EvaluationReport
    from recsketch.evaluation import EvaluationConfig
    from recsketch.stages.common import run_dir
    from recsketch.stages.evaluate import evaluate_catalogue, evaluate_stage
    from recsketch.stages.threshold import valid_models

    for name, share in (("--holdout", holdout), ("--cold", cold)):
        if share is not None and not 0 <= share < 1:
            raise ConfigError(f"{name} is a share of likes or models: between 0 and 1, not {share}")
    config = EvaluationConfig(holdout=0.2 if holdout is None else holdout, random_holdout=holdout is not None,
                              cold_items=cold, seed=seed,
                              max_users=max_users or settings.eval_max_users, threads=settings.effective_threads,
                              hybrid_likes=settings.hybrid_likes)
    if run_id:
        folder = run_dir(settings, run_id)
        evaluate_stage(settings, folder, config=config)
        report = EvaluationReport.require(folder).payload
    else:
        versions, _, likes = valid_models(settings)
        report = evaluate_catalogue(settings, versions, config=config, likes=likes)
    history = _served_history(settings)
    if as_json:
        print(json.dumps({**report, "served_history": [{**run, "loaded_at": str(run["loaded_at"])}
                                                       for run in history]}))
        return 0
    ks = report["k"]
    names = [f"{m}@{k}" for k in ks for m in ("precision", "recall", "ndcg", "coverage")]
    print(f"split: {json.dumps(report['split'])}")
    print(f"{'':<22}" + "".join(f"{n:>14}" for n in names))
    for section, title in (("methods", "warm"), ("cold_start", "cold start")):
        for method, values in report.get(section, {}).items():
            print(f"{title + ' ' + method:<22}" + "".join(f"{values[n]:>14.4f}" for n in names))
    als = report.get("als") or {}
    if als:
        print(f"\nALS chosen on validation: {json.dumps(als['params'])}, NDCG@10 {als['validation_ndcg@10']:.4f} "
              f"({len(als['tried'])} tried, {als['skipped']} past the budget)"
              + (f"; hybrid likes half {report['hybrid'].get('likes', 'als')}, CF weight "
                 f"{report['hybrid']['cf_weight']}, cold start "
                 f"{report['hybrid'].get('cold_cf_weight', report['hybrid']['cf_weight'])}"
                 if report.get("hybrid") else ""))
    if history:
        from recsketch.gate import trend

        print("\nthe loaded runs' lists, scored by the quality gate at their load (each run is held to "
              "RECSKETCH_GATE_MIN_RATIO x the best kept run's, on its own day's split):")
        print("\n".join(trend(history)))
    return 0


def _served_history(settings: Settings) -> list[dict]:
    """The kept loaded runs' stored metrics (none when the DB holds no run yet)."""
    from recsketch.db import store

    engine = store.connect(settings.resolved_database_url)
    try:
        return store.metrics_history(engine)
    finally:
        engine.dispose()


def _gc(settings: Settings, dry_run: bool) -> int:
    from recsketch import compaction, retention
    from recsketch.db import store
    from recsketch.stages.cleanup import clean

    engine = store.connect(settings.resolved_database_url)
    if dry_run:
        verdicts = retention.judge(settings, engine)
        for verdict in verdicts:
            print(f"{'keep' if verdict.keep else 'delete':<7} {verdict.folder}  ({verdict.kind}, {verdict.reason})")
        compaction.compact_features(settings, engine, [v.folder for v in verdicts if v.keep], dry_run=True,
                                    progress=print)
        return 0
    result = clean(settings, progress=lambda line: print(line, file=sys.stderr))
    print(json.dumps({**result, "kept": len(result["kept"])}))
    return 0


def _import(settings: Settings, folder: Path) -> int:
    from recsketch.importer import import_folder

    stats = import_folder(settings, folder)
    print(json.dumps(stats.as_dict(), indent=1, default=str))
    return 0


def _show(settings: Settings, models: int, top_k: int) -> int:
    from sqlalchemy import text

    from recsketch.db import store

    engine = store.connect(settings.resolved_database_url, read_only=True)
    run = store.live_run(engine)
    if run is None:
        raise RecsketchError("no recommendations are loaded yet: run `recsketch run` first")
    print(f"live run {run['run_id']} ({run['backbone']}, {run['n_models']} models)")
    with engine.connect() as conn:
        query = text("SELECT DISTINCT r.mid, m.name FROM recommendations r JOIN models m ON m.mid = r.mid "
                     "ORDER BY r.mid LIMIT :n")  # mids are random: a spread of models
        picked = conn.execute(query, {"n": models}).all()
    for mid, name in picked:
        print(f"\n{printable(name).replace(chr(10), ' ')}  [{mid}]")
        for row in store.similar(engine, mid, top_k):
            print(f"  {row['rank']}. {row['score']:.3f}  {printable(row['name']).replace(chr(10), ' ')}")
    return 0


def _run(settings: Settings, run_id: str | None, **options: Any) -> int:
    from recsketch.db import store
    from recsketch.stages import run_pipeline

    store.connect(settings.resolved_database_url)  # an unreachable DB fails here, before any state
    summary = run_pipeline(settings, run_id, **options)
    print(json.dumps(summary["load"]))
    return 0


def _step(part: Step) -> Callable[..., int]:
    def handler(settings: Settings, run_id: str, **options: Any) -> int:
        from recsketch.db import store
        from recsketch.stages.common import log, run_dir

        if part.needs_db:
            store.connect(settings.resolved_database_url)  # an unreachable DB fails here, before any state
        result = part.run(settings, run_dir(settings, run_id), run_id, log.info, **options)
        print(json.dumps(result, indent=1, default=str))
        return 0

    handler.__name__ = f"step_{part.name}"
    return handler


HANDLERS: dict[str, Callable[..., int]] = {
    "serve-sketchfab": _serve, "demo-catalog": _demo_catalog, "db": _db, "similar": _similar,
    "evaluate": _evaluate, "import": _import, "show": _show, "run": _run, "gc": _gc,
    **{part.name: _step(part) for part in STEPS if part.name not in ("evaluate", "gc")},
}
NO_SETTINGS = ("serve-sketchfab", "demo-catalog")  # these need no data dir, DB or API settings


def invocation(args: argparse.Namespace) -> tuple[Callable[..., int], dict[str, Any]]:
    """The handler of the parsed command and every flag it was given, as its keywords (the
    pipeline options folded into one Settings)."""
    given = {name: value for name, value in vars(args).items() if name not in ("command", "verbose")}
    overrides = {name: given.pop(name) for name in SETTINGS_FLAGS} if given.pop("pipeline_options", False) else {}
    if args.command not in NO_SETTINGS:
        given["settings"] = settings_for(**overrides)
    return HANDLERS[args.command], given


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        handler, kwargs = invocation(args)
        return handler(**kwargs)
    except (UnknownModel, InvalidModelId, ConfigError) as exc:
        print(f"recsketch: {printable(exc)}", file=sys.stderr)
        return 2
    except (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError) as exc:  # a path given wrong
        print(f"recsketch: {printable(exc.filename)}: {exc.strerror} (check RECSKETCH_DATA_DIR and the paths given)",
              file=sys.stderr)
        return 2
    except RecsketchError as exc:
        print(f"recsketch: error: {printable(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
