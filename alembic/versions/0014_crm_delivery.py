"""CRM call events delivered: a webhook CRM, default RetailCRM limits, logs and status.

Revision ID: 0014
Revises: 0013
"""

from pgdispatch.db.schema import apply_migration

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0014_crm_delivery.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
