"""Hostile producers: absurd nesting refused at insert, header values checked by send_request.

Revision ID: 0016
Revises: 0015
"""

from pgdispatch.db.schema import apply_migration

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0016_hostile_producers.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
