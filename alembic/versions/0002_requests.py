"""Outbound requests: signing keys, dispatch.send_request, dispatch.request_attempts.

Revision ID: 0002
Revises: 0001
"""

import sql
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.get_bind().connection.driver_connection.execute(sql.read("migrations/0002_requests.sql").encode())


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
