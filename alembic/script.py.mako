"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
"""

from db.schema import apply_migration

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("NNNN_name.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
