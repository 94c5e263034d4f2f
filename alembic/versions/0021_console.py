"""The operators' console: accounts, sessions, its role, audited actions, cancellation, charts.

Revision ID: 0021
Revises: 0020
"""

from pgdispatch.db.schema import apply_migration

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0021_console.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
