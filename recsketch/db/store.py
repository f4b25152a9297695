"""Writes and reads of the catalogue DB: upserts, the atomic recommendations load, queries."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, Union

import numpy as np
from sqlalchemy import bindparam, create_engine, delete, event, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from recsketch.config import normalise_database_url
from recsketch.db import migrate
from recsketch.db.schema import (
    SIMILAR_MODELS_VIEW,
    crawl_state,
    likes,
    models,
    recommendations,
    run_metrics,
    runs,
)
from recsketch.errors import DatabaseUnavailable, SchemaBehind, UnknownModel
from recsketch.ids import validate_model_id

log = logging.getLogger(__name__)

BATCH_ROWS = 1000
LIKES_READ_ROWS = 4_000_000  # likes parsed at a time when reading them all
COPY_BLOCK_MODELS = 50_000  # models per block streamed into COPY (≈ 60 MB at top-10)


class TopKArrays(Protocol):
    """A top-k result as arrays (``recsketch.contracts.TopK``): row i of indices/scores is mids[i]'s."""

    @property
    def mids(self) -> list[str]: ...
    @property
    def indices(self) -> np.ndarray: ...
    @property
    def scores(self) -> np.ndarray: ...


Rows = Union[Sequence[tuple[str, int, str, float]], TopKArrays]  # noqa: UP007


PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
PGCOPY_TRAILER = (-1).to_bytes(2, "big", signed=True)


def _csv_blocks(run_id: str, backbone: str, rows: Sequence[tuple[str, int, str, float]],
                method: str = "visual") -> Iterator[bytes]:
    """COPY's CSV input from (mid, rank, similar mid, score) tuples, in blocks."""
    for start in range(0, len(rows), 200_000):
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for mid, rank, similar_mid, score in rows[start : start + 200_000]:
            writer.writerow((run_id, mid, rank, similar_mid, repr(float(score)), backbone, method))
        yield buffer.getvalue().encode()


def _binary_blocks(run_id: str, backbone: str, rows: TopKArrays, method: str = "visual") -> Iterator[bytes]:
    """COPY's binary input built by numpy from the top-k arrays, block by block: no Python object
    per row. A binary row is fixed-width once the lengths of its two mids are fixed, so each block
    is split by (mid length, similar mid length), at most a few groups (ids are 26, 27 or 32
    characters), each filled as one structured array. Scores go in as float8, the exact value
    ``repr(float(score))`` would carry through text."""
    run, bb, how = run_id.encode(), backbone.encode(), method.encode()
    encoded = [mid.encode() for mid in rows.mids]
    lengths = np.fromiter((len(m) for m in encoded), np.int64, len(encoded))
    by_length = {int(n): np.array([m if len(m) == n else b"" for m in encoded], dtype=f"S{int(n)}")
                 for n in np.unique(lengths)}
    n, k = rows.indices.shape
    yield PGCOPY_HEADER
    for start in range(0, n, COPY_BLOCK_MODELS):
        stop = min(n, start + COPY_BLOCK_MODELS)
        owner = np.repeat(np.arange(start, stop), k)
        similar = rows.indices[start:stop].ravel().astype(np.int64)
        rank = np.tile(np.arange(1, k + 1, dtype=np.int32), stop - start)
        score = rows.scores[start:stop].ravel().astype(np.float64)
        parts = []
        for a in np.unique(lengths[start:stop]):
            for b in np.unique(lengths[similar]):
                pick = (lengths[owner] == a) & (lengths[similar] == b)
                if not pick.any():
                    continue
                dtype = np.dtype([("fields", ">i2"), ("l1", ">i4"), ("run", f"S{len(run)}"),
                                  ("l2", ">i4"), ("mid", f"S{a}"), ("l3", ">i4"), ("rank", ">i4"),
                                  ("l4", ">i4"), ("similar", f"S{b}"), ("l5", ">i4"), ("score", ">f8"),
                                  ("l6", ">i4"), ("backbone", f"S{len(bb)}"), ("l7", ">i4"),
                                  ("method", f"S{len(how)}")])
                block = np.empty(int(pick.sum()), dtype)
                block["fields"], block["l1"], block["run"] = 7, len(run), run
                block["l2"], block["mid"] = a, by_length[int(a)][owner[pick]]
                block["l3"], block["rank"] = 4, rank[pick]
                block["l4"], block["similar"] = b, by_length[int(b)][similar[pick]]
                block["l5"], block["score"] = 8, score[pick]
                block["l6"], block["backbone"] = len(bb), bb
                block["l7"], block["method"] = len(how), how
                parts.append(block.tobytes())
        yield b"".join(parts)
    yield PGCOPY_TRAILER


class _BlockStream(io.RawIOBase):
    """A file over an iterator of byte blocks, for COPY ... FROM STDIN: one block in memory."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray) -> int:  # type: ignore[override]
        while not len(self._pending):
            try:
                self._pending = memoryview(next(self._blocks))
            except StopIteration:
                return 0
        size = min(len(target), len(self._pending))
        target[:size] = self._pending[:size]
        self._pending = self._pending[size:]  # a view: no copy of the rest of the block
        return size


def engine_for(url: str) -> Engine:
    """An engine, nothing checked or created. SQLite gets WAL so readers never block a load;
    a bare ``postgresql://`` gets the driver the project uses (``config.normalise_database_url``)."""
    url = normalise_database_url(url)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def connect(url: str, *, read_only: bool = False) -> Engine:
    """An engine on a database at the code's schema revision; one behind is refused
    (SchemaBehind names `recsketch db upgrade`). Writers create the schema in an empty
    database; ``read_only`` runs no DDL at all, and never creates an SQLite file."""
    parsed = make_url(normalise_database_url(url))
    database = parsed.database
    if read_only and parsed.get_backend_name() == "sqlite" and database and database != ":memory:" \
            and not Path(database).is_file():  # checked before any engine: a reader creates no folder
        raise SchemaBehind(f"the recommendations DB at {database} is empty: run the pipeline first (`recsketch run`, "
                           "or `make demo`): there is no such file; or point RECSKETCH_DATA_DIR or "
                           "RECSKETCH_DATABASE_URL at the one it wrote (the demo's is demo-data/data)")
    engine = engine_for(url)
    try:
        migrate.check(engine, initialise=not read_only)
    except SchemaBehind:
        raise
    except Exception as exc:
        raise unavailable(engine, exc) from exc
    return engine


def unavailable(engine: Engine, exc: Exception) -> DatabaseUnavailable:
    return DatabaseUnavailable(f"cannot open the recommendations DB at {engine.url!r}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


def insert_for(conn: Connection):
    """The dialect's INSERT (PostgreSQL's or SQLite's), which has ``on_conflict_do_*``."""
    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert


def _batches(rows: Sequence[dict], size: int = BATCH_ROWS) -> Iterable[Sequence[dict]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def transaction(bind: Engine | Connection) -> AbstractContextManager[Connection]:
    """A transaction of its own on an engine, or the caller's on a connection (which commits or
    rolls back everything it did together: ``recsketch import``)."""
    return nullcontext(bind) if isinstance(bind, Connection) else bind.begin()


def upsert_models(bind: Engine | Connection, rows: Sequence[dict]) -> None:
    """Insert or update models by mid; columns absent from a row are left as stored."""
    if not rows:
        return
    by_columns: dict[tuple[str, ...], list[dict]] = {}
    for row in rows:  # a multi-row INSERT needs the same columns in every row
        by_columns.setdefault(tuple(sorted(row)), []).append(row)
    with transaction(bind) as conn:
        insert = insert_for(conn)
        for columns, group in by_columns.items():
            for batch in _batches(group):
                stmt = insert(models).values(list(batch))
                stmt = stmt.on_conflict_do_update(
                    index_elements=["mid"],
                    set_={c: stmt.excluded[c] for c in columns if c != "mid"},
                )
                conn.execute(stmt)


def replace_likes(engine: Engine, likers: Mapping[str, Iterable[str]],
                  fetched: dict[str, tuple[int | None, datetime]] | None = None) -> None:
    """Make the stored likers of each mid exactly the given uids and mark them complete.

    ``fetched`` gives each mid's listed likeCount and fetch time, written in the same
    transaction as the likers, so the two never disagree after a kill. One transaction for
    all of them: a crawl page costs one commit, not one per model.
    """
    if not likers:
        return
    mids = sorted(likers)
    rows = [{"mid": mid, "uid": uid} for mid in mids for uid in sorted(set(likers[mid]))]
    with engine.begin() as conn:
        conn.execute(delete(likes).where(likes.c.mid.in_(mids)))
        insert = insert_for(conn)
        for batch in _batches(rows):
            conn.execute(insert(likes).values(list(batch)))
        conn.execute(update(models).where(models.c.mid.in_(mids)).values(likes_complete=True, likes_reason=None))
        if fetched:
            conn.execute(update(models).where(models.c.mid == bindparam("b_mid"))
                         .values(like_count=bindparam("b_count"), likes_fetched_at=bindparam("b_at")),
                         [{"b_mid": mid, "b_count": count, "b_at": at} for mid, (count, at) in fetched.items()])


def stored_model_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {str(mid) for (mid,) in conn.execute(select(models.c.mid))}


def delete_models(engine: Engine, mids: Iterable[str]) -> int:
    """Models deleted from Sketchfab, with their likes, in one transaction: they no longer count
    in thresholding, and the next run serves them nowhere. Returns how many were stored."""
    wanted = sorted(set(mids))
    deleted = 0
    with engine.begin() as conn:
        for first in range(0, len(wanted), BATCH_ROWS):
            ids = wanted[first : first + BATCH_ROWS]
            conn.execute(delete(likes).where(likes.c.mid.in_(ids)))
            deleted += conn.execute(delete(models).where(models.c.mid.in_(ids))).rowcount or 0
    return deleted


def saved_crawl_position(engine: Engine, window: str) -> tuple[str, int] | None:
    """(next page URL, pages done) of an unfinished crawl of ``window``, if any."""
    with engine.connect() as conn:
        row = conn.execute(select(crawl_state.c.next_url, crawl_state.c.pages)
                           .where(crawl_state.c.window == window)).first()
    return (row.next_url, row.pages) if row else None


def save_crawl_position(engine: Engine, window: str, next_url: str | None, pages: int) -> None:
    """Remember where the crawl of ``window`` goes on; ``None`` marks it finished."""
    with engine.begin() as conn:
        conn.execute(delete(crawl_state).where(crawl_state.c.window == window))
        if next_url is not None:
            conn.execute(crawl_state.insert().values(window=window, next_url=next_url, pages=pages,
                                                     updated_at=datetime.now(UTC)))


def likers_of(engine: Engine, mids: Iterable[str]) -> dict[str, set[str]]:
    """The stored likers of ``mids`` (mids without any are absent)."""
    found: dict[str, set[str]] = {}
    with engine.connect() as conn:
        for mid, uid in conn.execute(select(likes.c.mid, likes.c.uid).where(likes.c.mid.in_(list(mids)))):
            found.setdefault(mid, set()).add(uid)
    return found


def read_likes(engine: Engine) -> list[tuple[str, str]]:
    """Every like as (mid, uid) tuples: for small catalogues and checks; the pipeline uses
    :func:`read_likes_frame`."""
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(likes.c.mid, likes.c.uid))]


def read_likes_frame(engine: Engine) -> Any:  # a pandas DataFrame (pandas is untyped here)
    """Every like as a DataFrame of two categorical columns, mid and uid: on PostgreSQL one
    ``COPY ... TO STDOUT`` through a temp file parsed by pandas' C reader, never a Python tuple
    per like (60 M likes are ~1 GB of codes, not ~10 GB of tuples)."""
    import tempfile

    import pandas as pd

    with engine.connect() as conn:
        if conn.dialect.name != "postgresql":
            return pd.read_sql(select(likes.c.mid, likes.c.uid), conn).astype("category")
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        with tempfile.TemporaryFile() as handle:
            dbapi.cursor().copy_expert("COPY (SELECT mid, uid FROM likes) TO STDOUT WITH (FORMAT csv)", handle)
            handle.seek(0)
            # as strings (a uid "007" stays "007"), a few million rows at a time, each part
            # turned into categories at once: memory holds one part's strings, not all of them
            parts = [part.astype("category") for part in pd.read_csv(
                handle, names=["mid", "uid"], header=None, dtype=str, na_filter=False, engine="c",
                chunksize=LIKES_READ_ROWS)]
        if not parts:
            return pd.DataFrame({"mid": pd.Categorical([]), "uid": pd.Categorical([])})
        union = pd.api.types.union_categoricals
        return pd.DataFrame({column: union([part[column] for part in parts]) for column in ("mid", "uid")})


def models_with_thumbnails(engine: Engine) -> dict[str, str | None]:
    """mid -> the stored thumbnail's version (None when an older release stored it)."""
    with engine.connect() as conn:
        stmt = (select(models.c.mid, models.c.thumbnail_version).where(models.c.thumbnail_status == "ok")
                .order_by(models.c.mid))
        return dict(conn.execute(stmt).tuples().all())


def load_recommendations(engine: Engine, run_id: str, backbone: str, top_k: int, rows: Rows,
                         metrics: Sequence[dict] = (), more: Mapping[str, Rows] | None = None) -> None:
    """Replace the served recommendations with ``rows``: (mid, rank, similar_mid, score) tuples, or
    a top-k result as arrays, streamed into COPY block by block (memory: one block, not N × k).

    One transaction, so a reader sees the old set or the new one, never a mix, and a failure
    (or a kill) changes nothing. On PostgreSQL: COPY into a staging table, build its indexes,
    then swap it in; the old table stays served until the swap commits. On SQLite the new
    rows are inserted and the old ones deleted in the same transaction. The run's ``metrics``
    (rows of ``run_metrics``) are stored in the same transaction. ``rows`` are the visual
    neighbours; ``more`` maps another method (``hybrid``) to its rows.
    """
    try:
        _load(engine, run_id, backbone, top_k, {"visual": rows, **(more or {})}, metrics)
    except DBAPIError as exc:
        if not (exc.connection_invalidated or isinstance(exc, OperationalError)):
            raise
        raise DatabaseUnavailable(
            f"lost the recommendations DB at {engine.url!r} while loading run {run_id}: nothing of it was "
            f"committed and the previous run stays served; rerun the load ({str(exc.orig).splitlines()[0]})"
        ) from exc


def _tuples(rows: Rows, block: int = 10_000) -> Iterator[list[tuple[str, int, str, float]]]:
    """(mid, rank, similar mid, score) in blocks, for SQLite's inserts."""
    if isinstance(rows, Sequence):
        for start in range(0, len(rows), block):
            yield list(rows[start : start + block])
        return
    k = rows.indices.shape[1] if rows.indices.ndim == 2 else 0
    per = max(1, block // max(k, 1))
    for start in range(0, len(rows.mids), per):
        yield [(rows.mids[i], rank + 1, rows.mids[int(j)], float(score))
               for i in range(start, min(len(rows.mids), start + per))
               for rank, (j, score) in enumerate(zip(rows.indices[i], rows.scores[i], strict=True))]


def _load(engine: Engine, run_id: str, backbone: str, top_k: int, by_method: Mapping[str, Rows],
          metrics: Sequence[dict]) -> None:
    now = datetime.now(UTC)
    rows = by_method["visual"]
    n_models = len({row[0] for row in rows}) if isinstance(rows, Sequence) else len(rows.mids)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            _swap_in_postgres(conn, run_id, backbone, by_method)
        else:  # the table holds the live run only: the old rows go, in the same transaction
            conn.execute(delete(recommendations))
            for method, method_rows in by_method.items():
                for block in _tuples(method_rows):
                    conn.execute(recommendations.insert(), [
                        {"run_id": run_id, "mid": m, "rank": r, "similar_mid": s, "score": sc, "backbone": backbone,
                         "method": method}
                        for m, r, s, sc in block
                    ])
        conn.execute(delete(runs).where(runs.c.run_id == run_id))
        conn.execute(runs.insert().values(run_id=run_id, backbone=backbone, top_k=top_k,
                                          n_models=n_models, loaded_at=now, is_live=False))
        conn.execute(update(runs).values(is_live=runs.c.run_id == run_id))
        conn.execute(delete(run_metrics).where(run_metrics.c.run_id == run_id))
        if metrics:
            conn.execute(run_metrics.insert(), [{**row, "run_id": run_id, "measured_at": now} for row in metrics])


def live_metric(engine: Engine, method: str, metric: str, split: str = "warm") -> tuple[str, float] | None:
    """(run id, value) of one metric of the live run, if it was measured."""
    with engine.connect() as conn:
        row = conn.execute(select(runs.c.run_id, run_metrics.c.value)
                           .join(run_metrics, run_metrics.c.run_id == runs.c.run_id)
                           .where(runs.c.is_live, run_metrics.c.method == method, run_metrics.c.metric == metric,
                                  run_metrics.c.split == split)).first()
    return (row.run_id, float(row.value)) if row else None


def metrics_history(engine: Engine, limit: int = 30) -> list[dict]:
    """The metrics of the last ``limit`` loaded runs, oldest first: {run_id, loaded_at, is_live, metrics}."""
    with engine.connect() as conn:
        recent = conn.execute(select(runs).order_by(runs.c.loaded_at.desc()).limit(limit)).mappings().all()
        ids = [r["run_id"] for r in recent]
        values = conn.execute(select(run_metrics).where(run_metrics.c.run_id.in_(ids))).mappings().all()
    by_run: dict[str, dict[str, float]] = {run_id: {} for run_id in ids}
    for row in values:
        by_run[row["run_id"]][f"{row['split']}/{row['method']}/{row['metric']}"] = row["value"]
    return [{"run_id": r["run_id"], "loaded_at": r["loaded_at"], "is_live": r["is_live"],
             "metrics": by_run[r["run_id"]]} for r in reversed(recent)]


def _swap_in_postgres(conn: Connection, run_id: str, backbone: str, by_method: Mapping[str, Rows]) -> None:
    """Staging table, COPY, its key, then the swap; readers wait only for the renames."""
    conn.execute(text("SELECT pg_advisory_xact_lock(727275)"))  # one load at a time
    conn.execute(text("DROP TABLE IF EXISTS recommendations_staging"))
    conn.execute(text("CREATE TABLE recommendations_staging (LIKE recommendations INCLUDING DEFAULTS)"))
    for method, rows in by_method.items():
        copy_rows(conn, "recommendations_staging", run_id, backbone, rows, method)
    conn.execute(text("ALTER TABLE recommendations_staging ADD CONSTRAINT recommendations_staging_pkey "
                      "PRIMARY KEY (mid, method, rank)"))
    conn.execute(text("ANALYZE recommendations_staging"))
    # readers lock the view, then its tables: take the locks in that order, or deadlock
    conn.execute(text("LOCK TABLE similar_models IN ACCESS EXCLUSIVE MODE"))
    conn.execute(text("DROP VIEW similar_models"))
    conn.execute(text("DROP TABLE recommendations"))
    conn.execute(text("ALTER TABLE recommendations_staging RENAME TO recommendations"))
    conn.execute(text("ALTER TABLE recommendations RENAME CONSTRAINT recommendations_staging_pkey "
                      "TO recommendations_pkey"))
    conn.execute(text(SIMILAR_MODELS_VIEW))


def copy_rows(conn: Connection, table: str, run_id: str, backbone: str, rows: Rows, method: str = "visual") -> None:
    """COPY rows into ``table`` (a fixed name of ours, never user input), streamed block by block."""
    if isinstance(rows, Sequence):
        stream, form = _BlockStream(_csv_blocks(run_id, backbone, rows, method)), "csv"
    else:
        stream, form = _BlockStream(_binary_blocks(run_id, backbone, rows, method)), "binary"
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None  # an open Connection always has one
    cursor = dbapi.cursor()
    cursor.copy_expert(
        f"COPY {table} (run_id, mid, rank, similar_mid, score, backbone, method) FROM STDIN WITH (FORMAT {form})",
        stream,
        size=1 << 20)


def loaded_runs(engine: Engine) -> list[dict]:
    """Every loaded run still recorded (retention deletes the rows of the runs it deletes), newest first."""
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(select(runs).order_by(runs.c.loaded_at.desc())).mappings()]


def live_run(engine: Engine) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(select(runs).where(runs.c.is_live)).mappings().first()
        return dict(row) if row else None


def models_with_recommendations(engine: Engine, limit: int) -> list[dict]:
    """Some models of the live run (mid, name), to start browsing from."""
    query = text("SELECT DISTINCT s.mid, m.name FROM similar_models s JOIN models m ON m.mid = s.mid "
                 "ORDER BY s.mid LIMIT :limit")
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query, {"limit": limit}).mappings()]


def similar(engine: Engine, mid: str, top_k: int | None = None, *, links: bool = False,
            method: str = "visual") -> list[dict]:
    """The live run's recommendations for ``mid`` by ``method`` (visual | hybrid), best first
    (bound parameters only); with ``links``, each also carries its Sketchfab page as
    ``viewer_url`` (the gallery)."""
    validate_model_id(mid)
    query = text(
        "SELECT rank, similar_mid, similar_name, score, similar_viewer_url FROM similar_models "
        "WHERE mid = :mid AND method = :method ORDER BY rank" + (" LIMIT :k" if top_k else "")
    )
    params: dict[str, object] = {"mid": mid, "method": method}
    if top_k:
        params["k"] = top_k
    with engine.connect() as conn:
        found = conn.execute(query, params).all()
        if not found:
            if not conn.execute(select(models.c.mid).where(models.c.mid == mid)).first():
                raise UnknownModel(f"unknown model id {mid!r}: not in the catalogue")
            raise UnknownModel(f"model {mid!r} has no recommendations in the live run ({method}) "
                               "(filtered out by the like threshold, or no usable thumbnail"
                               f"{'; hybrid ones come from runs that evaluated' if method != 'visual' else ''})")
    results = [{"rank": r, "mid": s, "name": n, "score": round(float(sc), 6)} for r, s, n, sc, _ in found]
    if links:
        for result, row in zip(results, found, strict=True):
            result["viewer_url"] = row[4]
    return results
