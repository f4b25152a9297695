"""Tables (SQLAlchemy Core) and the ``similar_models`` view that people query directly.

This is the schema the code reads and writes; the migrations under ``migrations/versions``
build it (a test compares the two), and ``recsketch.db.migrate`` applies them.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from recsketch.ids import MAX_UID_LENGTH

metadata = MetaData()

models = Table(
    "models",
    metadata,
    Column("mid", String(32), primary_key=True),
    Column("name", Text, nullable=False),
    Column("published_at", DateTime(timezone=True)),
    Column("like_count", Integer),
    Column("viewer_url", Text),
    Column("thumbnail_url", Text),
    # ok | missing | failed; the reason says why when it is not ok
    Column("thumbnail_status", String(16)),
    Column("thumbnail_reason", Text),
    Column("thumbnail_version", String(16)),  # content hash of the stored file: features are keyed by it
    Column("likes_complete", Boolean, nullable=False, default=False),
    Column("likes_reason", Text),  # why the likers are incomplete, when they are
    Column("crawled_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True)),
    # when the stored likers were fetched: they are refetched once older than the max age
    Column("likes_fetched_at", DateTime(timezone=True)),
)

likes = Table(
    "likes",
    metadata,
    Column("mid", String(32), nullable=False),
    Column("uid", String(MAX_UID_LENGTH), nullable=False),
    PrimaryKeyConstraint("mid", "uid", name="likes_pkey"),
)

# Where an interrupted crawl of a publication window resumes: the next page's URL.
crawl_state = Table(
    "crawl_state",
    metadata,
    Column("window", String(120), primary_key=True),
    Column("next_url", Text, nullable=False),
    Column("pages", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# The deployment's one request budget (recsketch.ratelimit): the next free request start.
rate_budget = Table(
    "rate_budget",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("next_at", Float, nullable=False),  # seconds since the epoch
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(250), primary_key=True),
    Column("backbone", String(64), nullable=False),
    Column("top_k", Integer, nullable=False),
    Column("n_models", Integer, nullable=False),
    Column("loaded_at", DateTime(timezone=True), nullable=False),
    Column("is_live", Boolean, nullable=False, default=False),
)

run_folders = Table(  # every run folder a stage made: what retention (recsketch.retention) weighs and deletes
    "run_folders",
    metadata,
    Column("folder", String(250), primary_key=True),  # its name under <data dir>/runs/
    Column("kind", String(16), nullable=False),  # crawl | recommendations
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),  # loaded: no longer in flight
    Column("deleting_at", DateTime(timezone=True)),  # retention began deleting it: no stage may write to it
)

run_metrics = Table(  # offline metrics of each loaded run: one row per (method, metric, split)
    "run_metrics",
    metadata,
    Column("run_id", String(250), primary_key=True),
    Column("method", String(32), primary_key=True),
    Column("metric", String(32), primary_key=True),
    Column("split", String(16), primary_key=True),  # warm | cold_start
    Column("value", Float, nullable=False),
    Column("measured_at", DateTime(timezone=True), nullable=False),
)

recommendations = Table(
    "recommendations",
    metadata,
    Column("run_id", String(250), nullable=False),
    Column("mid", String(32), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("similar_mid", String(32), nullable=False),
    Column("score", Float, nullable=False),
    Column("backbone", String(64), nullable=False),
    Column("method", String(16), nullable=False, server_default="visual"),  # visual | hybrid
    # the table holds the live run only (a load swaps it whole): one key serves lookups by model
    PrimaryKeyConstraint("mid", "method", "rank", name="recommendations_pkey"),
)

SIMILAR_MODELS_VIEW = """
CREATE VIEW similar_models AS
SELECT r.mid, r.method, r.rank, r.similar_mid, m.name AS similar_name, r.score,
       m.thumbnail_url AS similar_thumbnail_url, m.viewer_url AS similar_viewer_url,
       r.backbone, r.run_id
FROM recommendations r
JOIN runs u ON u.run_id = r.run_id AND u.is_live
LEFT JOIN models m ON m.mid = r.similar_mid
"""
