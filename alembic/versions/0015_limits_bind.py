"""Shared limits that bind: token blocks ahead of time, spread backlogs, normalised hosts, parks by index.

Revision ID: 0015
Revises: 0014
"""

from pgdispatch.db.schema import apply_migration

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0015_limits_bind.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
