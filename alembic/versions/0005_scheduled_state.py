"""The 'scheduled' job state (committed before 0006 uses it).

Revision ID: 0005
Revises: 0004
"""

from pgdispatch.db.schema import apply_migration

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0005_scheduled_state.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
