"""CRM call events (seed 004): enterprises, their integrations config, call events.

Revision ID: 0013
Revises: 0012
"""

from pgdispatch.db.schema import apply_migration

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0013_crm.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
