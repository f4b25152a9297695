"""Every run measured: the offline metrics of each loaded run (docs/contracts.md §5).

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


def upgrade() -> None:
    if not sa.inspect(op.get_bind()).has_table("run_metrics"):
        op.create_table(
            "run_metrics",
            sa.Column("run_id", sa.String(250), primary_key=True),
            sa.Column("method", sa.String(32), primary_key=True),
            sa.Column("metric", sa.String(32), primary_key=True),
            sa.Column("split", sa.String(16), primary_key=True),  # warm | cold_start
            sa.Column("value", sa.Float, nullable=False),
            sa.Column("measured_at", sa.DateTime(timezone=True), nullable=False),
        )
