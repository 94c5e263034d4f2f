"""Cost per job: the checks on a job's kind and args run when they are written, not at every
claim and finish.

Revision ID: 0022
Revises: 0021
"""

from pgdispatch.db.schema import apply_migration

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    apply_migration("0022_cost.sql")


def downgrade() -> None:
    raise RuntimeError("pgdispatch migrations are forward-only")
