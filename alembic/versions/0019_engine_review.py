"""The engine under review: rescued requests wait their interval, bulk revivals say what they skip.

Revision ID: 0019
Revises: 0018
"""

from pgdispatch.db.schema import apply_migration

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0019_engine_review.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
