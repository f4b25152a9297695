"""Resumable crawls and the reasons of incomplete likes (the crawler's second release).

Databases made by releases between 0001 and this one carry no revision but may already have
these: each step is skipped when its column or table is there.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = sa.inspect(op.get_bind())
    if "likes_reason" not in {c["name"] for c in existing.get_columns("models")}:
        op.add_column("models", sa.Column("likes_reason", sa.Text))
    if not existing.has_table("crawl_state"):
        op.create_table(
            "crawl_state",
            sa.Column("window", sa.String(120), primary_key=True),
            sa.Column("next_url", sa.Text, nullable=False),
            sa.Column("pages", sa.Integer, nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        )
