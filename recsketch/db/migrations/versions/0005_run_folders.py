"""Retention: every run folder a stage makes is registered (``run_folders``), so that
``recsketch gc`` finds the folders to delete by name, on an object store too, without listing.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("run_folders"):
        return
    op.create_table(
        "run_folders",
        sa.Column("folder", sa.String(250), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("deleting_at", sa.DateTime(timezone=True)),
    )

