"""Engine review: scheduled state, v2 functions, history maintenance that never blocks, grants.

Revision ID: 0006
Revises: 0005
"""

from pgdispatch.db.schema import apply_migration

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0006_engine_review.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
