"""Lease extension that never waits; no function executable by PUBLIC.

Revision ID: 0012
Revises: 0011
"""

from pgdispatch.db.schema import apply_migration

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0012_extend_leases.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
