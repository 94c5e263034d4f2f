"""Channels and secrets: one masking, vendor limits as vendors keep them, safe OAuth refreshes.

Revision ID: 0020
Revises: 0019
"""

from pgdispatch.db.schema import apply_migration

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0020_channels_secrets.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
