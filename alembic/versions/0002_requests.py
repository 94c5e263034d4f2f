"""Outbound requests: signing keys, dispatch.send_request, dispatch.request_attempts.

Revision ID: 0002
Revises: 0001
"""

from pgdispatch.db.schema import apply_migration

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0002_requests.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
