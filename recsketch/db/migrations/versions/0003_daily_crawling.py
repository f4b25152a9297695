"""Daily operation: when likers were fetched, creation times, thumbnail versions, and the
deployment's shared request budget.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = sa.inspect(op.get_bind())
    present = {c["name"] for c in existing.get_columns("models")}
    for column in (sa.Column("created_at", sa.DateTime(timezone=True)),
                   sa.Column("likes_fetched_at", sa.DateTime(timezone=True)),
                   sa.Column("thumbnail_version", sa.String(16))):
        if column.name not in present:
            op.add_column("models", column)
    if not existing.has_table("rate_budget"):
        op.create_table(
            "rate_budget",
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("next_at", sa.Float, nullable=False),
        )
