"""Workers may VACUUM dispatch.jobs (MAINTAIN, PostgreSQL 17+).

Revision ID: 0004
Revises: 0003
"""

from pgdispatch.db.schema import apply_migration

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0004_worker_vacuum.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
