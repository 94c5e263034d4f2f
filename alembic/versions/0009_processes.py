"""Processes (seed 001): types registered by workers, instances, the journal, operator actions.

Revision ID: 0009
Revises: 0008
"""

from pgdispatch.db.schema import apply_migration

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0009_processes.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
