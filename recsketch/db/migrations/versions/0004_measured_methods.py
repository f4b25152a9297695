"""Every run measured, and more than one kind of neighbour: the offline metrics of each loaded
run (``run_metrics``), and a ``method`` (visual | hybrid) on each recommendation.

The served table holds the live run only (a load swaps it whole), so its key becomes
(mid, method, rank): the one index lookups by model need, where there were two to build on
every load. Rows of runs that are not live (none, unless a load was interrupted by an older
release) are dropped.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SIMILAR_MODELS_VIEW = """
CREATE VIEW similar_models AS
SELECT r.mid, r.method, r.rank, r.similar_mid, m.name AS similar_name, r.score,
       m.thumbnail_url AS similar_thumbnail_url, m.viewer_url AS similar_viewer_url,
       r.backbone, r.run_id
FROM recommendations r
JOIN runs u ON u.run_id = r.run_id AND u.is_live
LEFT JOIN models m ON m.mid = r.similar_mid
"""


def upgrade() -> None:
    bind = op.get_bind()
    existing = sa.inspect(bind)
    if not existing.has_table("run_metrics"):
        op.create_table(
            "run_metrics",
            sa.Column("run_id", sa.String(250), primary_key=True),
            sa.Column("method", sa.String(32), primary_key=True),
            sa.Column("metric", sa.String(32), primary_key=True),
            sa.Column("split", sa.String(16), primary_key=True),  # warm | cold_start
            sa.Column("value", sa.Float, nullable=False),
            sa.Column("measured_at", sa.DateTime(timezone=True), nullable=False),
        )
    if "method" in {c["name"] for c in existing.get_columns("recommendations")}:
        return
    op.execute("DROP VIEW IF EXISTS similar_models")
    op.create_table(
        "recommendations_new",
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("mid", sa.String(32), nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("similar_mid", sa.String(32), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("backbone", sa.String(64), nullable=False),
        sa.Column("method", sa.String(16), nullable=False, server_default="visual"),
        sa.PrimaryKeyConstraint("mid", "method", "rank", name="recommendations_new_pkey"),
    )
    op.execute("INSERT INTO recommendations_new (run_id, mid, rank, similar_mid, score, backbone, method) "
               "SELECT r.run_id, r.mid, r.rank, r.similar_mid, r.score, r.backbone, 'visual' FROM recommendations r "
               "JOIN runs u ON u.run_id = r.run_id AND u.is_live")
    op.drop_index("recommendations_mid", table_name="recommendations")
    op.drop_table("recommendations")
    op.rename_table("recommendations_new", "recommendations")
    if bind.dialect.name == "postgresql":
        op.execute("ALTER TABLE recommendations RENAME CONSTRAINT recommendations_new_pkey TO recommendations_pkey")
    op.execute(SIMILAR_MODELS_VIEW)
