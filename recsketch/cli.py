"""The ``recsketch`` command (docs/contracts.md §3)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from recsketch.config import BACKBONES, Settings
from recsketch.contracts import ChunkPlan
from recsketch.errors import ConfigError, InvalidModelId, RecsketchError, UnknownModel
from recsketch.timestamps import parse_utc

log = logging.getLogger("recsketch")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number


def _rate(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be a probability between 0 and 1")
    return number


def _pipeline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", help=f"feature backbone: {', '.join(BACKBONES)} (RECSKETCH_BACKBONE)")
    # values are checked by Settings, the one validation layer: argparse only reads them
    parser.add_argument("--top-k", type=int, help="recommendations per model (default 10)")
    parser.add_argument("--min-likes", type=int, help="like threshold for users and models (default 5; 0 keeps all)")
    parser.add_argument("--chunk-size", type=int, help="models per feature chunk (default 256)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsketch", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve-sketchfab", help="serve a rec-a-sketch data folder as the Sketchfab API")
    serve.add_argument("folder", type=Path)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
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
    serve.add_argument("--thumbnail-url", default=None,
                       help="base URL of another host that serves the thumbnails (e.g. a second serve-sketchfab)")

    run = commands.add_parser("run", help="the whole pipeline, without Airflow")
    _pipeline_options(run)
    run.add_argument("--run-id", help="run id (default manual__<UTC time>)")
    run.add_argument("--published-since", type=parse_utc, help="crawl only models published since (ISO 8601)")

    similar = commands.add_parser("similar", help="recommendations for one model")
    similar.add_argument("mid")
    similar.add_argument("--top-k", type=_positive)  # a query's size, not a setting
    similar.add_argument("--json", action="store_true", help="print a JSON list, best first")
    similar.add_argument("--method", choices=("visual", "hybrid"), default="visual",
                         help="visual: by the pictures (default); hybrid: pictures and likes together")

    for name, help_text in (("crawl", "stage 1: crawl the API into the catalogue"),
                            ("threshold", "stage 2: the like threshold"),
                            ("plan", "stage 3a: plan feature chunks"),
                            ("extract", "stage 3b: extract planned chunks"),
                            ("similarity", "stage 4: top-k cosine similarity"),
                            ("hybrid", "stage 5b: hybrid neighbours (after evaluate)"),
                            ("load", "stage 6: load recommendations into the DB (after evaluate)")):
        stage = commands.add_parser(name, help=help_text)
        _pipeline_options(stage)
        stage.add_argument("--run-id", required=True, help="the run whose folder the stages share")
        if name == "crawl":
            stage.add_argument("--published-since", type=parse_utc)
            stage.add_argument("--published-before", type=parse_utc)
        if name == "load":
            stage.add_argument("--force", action="store_true", help="load even if the quality gate refuses the run")
        if name == "extract":
            stage.add_argument("--chunk", action="append",
                               help="an extract task or chunk id (default: every planned task)")

    evaluate = commands.add_parser("evaluate", help="offline quality: every method ranked on held-out likes")
    _pipeline_options(evaluate)
    evaluate.add_argument("--run-id", help="evaluate this run's models and store the report with the run "
                          "(what the DAG's evaluate task does); default: the catalogue's models with features")
    evaluate.add_argument("--json", action="store_true", help="print the whole report as JSON")
    evaluate.add_argument("--holdout", type=float, default=0.2, help="share of each user's likes held out")
    evaluate.add_argument("--cold", type=float, default=0.1, help="share of models held out with all their likes")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--max-users", type=_positive, help="users ranked for (sampled; default 10000)")

    db = commands.add_parser("db", help="schema migrations of the recommendations DB (Alembic)")
    db.add_argument("action", choices=("upgrade", "current"),
                    help="upgrade: apply every migration the DB lacks; current: its revision and the code's")

    demo = commands.add_parser("demo-catalog", help="build the demo catalogue from offline photos")
    demo.add_argument("folder", type=Path)
    demo.add_argument("--seed", type=int, default=0)

    importer = commands.add_parser("import", help="a rec-a-sketch folder (model_urls.psv, model_likes_anon.psv, "
                                   "model_thumbs/) straight into the catalogue, no HTTP")
    importer.add_argument("folder", type=Path)
    show = commands.add_parser("show", help="print some models with their top recommendations")
    show.add_argument("--models", type=_positive, default=5)
    show.add_argument("--top-k", type=_positive, default=3)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env().with_overrides(
        backbone=getattr(args, "backbone", None), top_k=getattr(args, "top_k", None),
        min_likes=getattr(args, "min_likes", None), chunk_size=getattr(args, "chunk_size", None))


def _serve(args: argparse.Namespace) -> int:
    from recsketch.sketchfab.server import Catalog, Faults, SketchfabServer

    faults = Faults(rate_429=args.fault_429, retry_after=args.retry_after, rate_5xx=args.fault_5xx,
                    rate_truncate=args.fault_truncate, rate_bad_json=args.fault_bad_json,
                    latency_s=args.latency_ms / 1000.0, seed=args.seed)
    catalog = Catalog(args.folder)
    server = SketchfabServer(catalog, (args.host, args.port), faults, now=args.now,
                             thumbnail_url=args.thumbnail_url.rstrip("/") if args.thumbnail_url else None)
    print(f"serving {len(catalog.models)} models from {args.folder} at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from recsketch.db import migrate, store

    engine = store.engine_for(settings.resolved_database_url)
    try:
        if args.action == "upgrade":
            before, after = migrate.upgrade(engine)
            print(f"schema: {before or 'none'} -> {after} (head {migrate.head()})")
        else:
            print(f"schema: {migrate.current(engine) or 'none'} (this code needs {migrate.head()})")
    except RecsketchError:
        raise
    except Exception as exc:
        raise store.unavailable(engine, exc) from exc
    return 0


def _similar(args: argparse.Namespace, settings: Settings) -> int:
    from recsketch.db import store

    engine = store.connect(settings.resolved_database_url, read_only=True)
    results = store.similar(engine, args.mid, args.top_k, method=args.method)
    if args.json:
        print(json.dumps(results))
    else:
        for row in results:
            print(f"{row['rank']:3d}  {row['score']:.4f}  {row['mid']}  {row['name']}")
    return 0


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from recsketch import pipeline
    from recsketch.evaluation import EvaluationConfig

    for name, share in (("--holdout", args.holdout), ("--cold", args.cold)):
        if not 0 <= share < 1:
            raise ConfigError(f"{name} is a share of likes or models: between 0 and 1, not {share}")
    config = EvaluationConfig(holdout=args.holdout, cold_items=args.cold, seed=args.seed,
                              max_users=args.max_users or settings.eval_max_users, threads=settings.effective_threads)
    if args.run_id:
        folder = pipeline.run_dir(settings, args.run_id)
        pipeline.evaluate_stage(settings, folder, config=config)
        report = json.loads((folder / pipeline.EVALUATION_FILE).read_text())
    else:
        versions, _, likes = pipeline.valid_models(settings)
        report = pipeline.evaluate_catalogue(settings, versions, config=config, likes=likes)
    if args.json:
        print(json.dumps(report))
        return 0
    ks = report["k"]
    names = [f"{m}@{k}" for k in ks for m in ("precision", "recall", "ndcg", "coverage")]
    print(f"split: {json.dumps(report['split'])}")
    print(f"{'':<22}" + "".join(f"{n:>14}" for n in names))
    for section, title in (("methods", "warm"), ("cold_start", "cold start")):
        for method, values in report.get(section, {}).items():
            print(f"{title + ' ' + method:<22}" + "".join(f"{values[n]:>14.4f}" for n in names))
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
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
        picked = conn.execute(query, {"n": args.models}).all()
    for mid, name in picked:
        print(f"\n{name}  [{mid}]")
        for row in store.similar(engine, mid, args.top_k):
            print(f"  {row['rank']}. {row['score']:.3f}  {row['name']}")
    return 0


def _stage(args: argparse.Namespace, settings: Settings) -> int:
    from recsketch import pipeline
    from recsketch.db import store

    if args.command in ("crawl", "threshold", "load"):
        store.connect(settings.resolved_database_url)  # an unreachable DB fails here, before any state
    folder = pipeline.run_dir(settings, args.run_id)
    if args.command == "crawl":
        result: object = pipeline.crawl_stage(settings, folder, published_since=args.published_since,
                                              published_before=args.published_before)
    elif args.command == "threshold":
        result = pipeline.threshold_stage(settings, folder)
    elif args.command == "plan":
        result = pipeline.plan_stage(settings, folder)
    elif args.command == "extract":
        task_ids = args.chunk or list(ChunkPlan.read(folder).tasks)
        result = [pipeline.extract_stage(settings, folder, t) for t in sorted(task_ids)]
    elif args.command == "similarity":
        result = pipeline.similarity_stage(settings, folder)
    elif args.command == "hybrid":
        result = pipeline.hybrid_stage(settings, folder)
    else:
        result = pipeline.load_stage(settings, folder, args.run_id, force=args.force)
    print(json.dumps(result, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "serve-sketchfab":
            return _serve(args)
        if args.command == "demo-catalog":
            from recsketch.demo import build_demo_catalog

            groups = build_demo_catalog(args.folder, seed=args.seed)
            print(f"demo catalogue: {len(groups)} models in {len(set(groups.values()))} groups at {args.folder}")
            return 0
        settings = _settings(args)
        if args.command == "similar":
            return _similar(args, settings)
        if args.command == "import":
            from recsketch.importer import import_folder

            stats = import_folder(settings, args.folder)
            print(json.dumps(stats.as_dict(), indent=1, default=str))
            return 0
        if args.command == "show":
            return _show(args, settings)
        if args.command == "db":
            return _db(args, settings)
        if args.command == "evaluate":
            return _evaluate(args, settings)
        if args.command == "run":
            from recsketch.db import store
            from recsketch.pipeline import run_pipeline

            store.connect(settings.resolved_database_url)  # an unreachable DB fails here, before any state
            summary = run_pipeline(settings, args.run_id)
            print(json.dumps(summary["load"]))
            return 0
        return _stage(args, settings)
    except (UnknownModel, InvalidModelId, ConfigError) as exc:
        print(f"recsketch: {exc}", file=sys.stderr)
        return 2
    except RecsketchError as exc:
        print(f"recsketch: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
