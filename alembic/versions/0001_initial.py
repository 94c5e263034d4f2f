"""The engine: queues, jobs, dead letters, history, workers, the SQL API and roles.

Revision ID: 0001
Revises:
"""

from pgdispatch.db.schema import apply_migration

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0001_initial.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
