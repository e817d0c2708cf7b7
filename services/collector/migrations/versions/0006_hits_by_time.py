"""hits by time: an index on collector_hits.at

The response relay sweeps the hits older than the burst window (``repository.sweep_hits``):
a link fetched once and never again kept its hits for ever before, since only the next
request to the same link pruned them. The index makes each sweep a range of it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 10:50:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_collector_hits_at", "collector_hits", ["at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_collector_hits_at", table_name="collector_hits")
