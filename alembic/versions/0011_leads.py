"""Lead fan-out (seed 002): leads, credentials, batches, deliveries.

Revision ID: 0011
Revises: 0010
"""

from pgdispatch.db.schema import apply_migration

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0011_leads.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
