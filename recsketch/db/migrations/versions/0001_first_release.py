"""The schema as first released: models, likes, runs, recommendations and the view.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# the view as it was then (later revisions replace it when it changes)
SIMILAR_MODELS_VIEW = """
CREATE VIEW similar_models AS
SELECT r.mid, r.rank, r.similar_mid, m.name AS similar_name, r.score,
       m.thumbnail_url AS similar_thumbnail_url, m.viewer_url AS similar_viewer_url,
       r.backbone, r.run_id
FROM recommendations r
JOIN runs u ON u.run_id = r.run_id AND u.is_live
LEFT JOIN models m ON m.mid = r.similar_mid
"""


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("mid", sa.String(32), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True)),
        sa.Column("like_count", sa.Integer),
        sa.Column("viewer_url", sa.Text),
        sa.Column("thumbnail_url", sa.Text),
        sa.Column("thumbnail_status", sa.String(16)),
        sa.Column("thumbnail_reason", sa.Text),
        sa.Column("likes_complete", sa.Boolean, nullable=False),
        sa.Column("crawled_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "likes",
        sa.Column("mid", sa.String(32), nullable=False),
        sa.Column("uid", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("mid", "uid", name="likes_pkey"),
    )
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(250), primary_key=True),
        sa.Column("backbone", sa.String(64), nullable=False),
        sa.Column("top_k", sa.Integer, nullable=False),
        sa.Column("n_models", sa.Integer, nullable=False),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("is_live", sa.Boolean, nullable=False),
    )
    op.create_table(
        "recommendations",
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("mid", sa.String(32), nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("similar_mid", sa.String(32), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("backbone", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "mid", "rank", name="recommendations_pkey"),
    )
    op.create_index("recommendations_mid", "recommendations", ["mid"])
    op.execute(SIMILAR_MODELS_VIEW)
