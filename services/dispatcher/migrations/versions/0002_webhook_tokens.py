"""webhook tokens: Mailgun's one-use tokens, remembered to refuse a replayed signature

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 20:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import services.common.db

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dispatcher_webhook_tokens",
        sa.Column("provider", sa.String(length=40), nullable=False),
        sa.Column("token", sa.String(length=200), nullable=False),
        sa.Column("body_sha256", sa.String(length=64), nullable=False),
        sa.Column("seen_at", services.common.db.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("provider", "token", name=op.f("pk_dispatcher_webhook_tokens")),
    )
    op.create_index(
        "ix_dispatcher_webhook_tokens_seen_at",
        "dispatcher_webhook_tokens",
        ["provider", "seen_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_dispatcher_webhook_tokens_seen_at", table_name="dispatcher_webhook_tokens")
    op.drop_table("dispatcher_webhook_tokens")
