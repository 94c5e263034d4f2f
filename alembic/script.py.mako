"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
"""

from alembic import op

import sql

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.get_bind().connection.driver_connection.execute(sql.read("migrations/FILE.sql").encode())


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
