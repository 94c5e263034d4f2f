"""Processes under review: finishes by the lease holder only, step versions, the quiet window moved.

Revision ID: 0017
Revises: 0016
"""

from pgdispatch.db.schema import apply_migration

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0017_processes_review.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
