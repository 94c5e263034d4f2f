"""Limits shared by every worker: rate limits, concurrency caps, breakers and pauses in PostgreSQL.

Revision ID: 0007
Revises: 0006
"""

from pgdispatch.db.schema import apply_migration

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0007_limits.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
