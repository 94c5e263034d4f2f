"""Periodic commands (seed 001): exactly once per tick, locks as leases, switches as data, the audit log.

Revision ID: 0008
Revises: 0007
"""

from pgdispatch.db.schema import apply_migration

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0008_commands.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
