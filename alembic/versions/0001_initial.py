"""The engine: queues, jobs, dead letters, history, workers, the SQL API and roles.

Revision ID: 0001
Revises:
"""

import sql
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.get_bind().connection.driver_connection.execute(sql.read("migrations/0001_initial.sql").encode())


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
