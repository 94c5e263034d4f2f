"""A released job may come back after a delay (finish_jobs_v1 'release' honours its delay).

Revision ID: 0003
Revises: 0002
"""

from pgdispatch.db.schema import apply_migration

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0003_release_delay.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
