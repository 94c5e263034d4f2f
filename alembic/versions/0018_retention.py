"""Retention for every table that grows; commands scheduled at a constant cost.

Revision ID: 0018
Revises: 0017
"""

from pgdispatch.db.schema import apply_migration

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0018_retention.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
