"""Process steps taken and finished in batches.

Revision ID: 0010
Revises: 0009
"""

from pgdispatch.db.schema import apply_migration

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0010_process_batches.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
