"""The dispatcher's own tables."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, Integer, String, Text, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common.db import UtcDateTime, metadata

# pending → sending → sent | failed; sending with no outcome after a crash → in_doubt
STATUSES = ("pending", "sending", "sent", "failed", "in_doubt", "cancelled")


class Base(DeclarativeBase):
    metadata = metadata()


class Send(Base):
    """One invitation to send: scheduled, claimed, sent. Its delivery event is published from here
    (``delivery_published_at`` is the outbox marker)."""

    __tablename__ = "dispatcher_sends"
    __table_args__ = (
        Index(None, "status", "send_at"),
        Index("ix_dispatcher_sends_unpublished", "status", "delivery_published_at"),
    )

    invitation_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(200), index=True)
    survey_id: Mapped[str] = mapped_column(String(100))
    channel: Mapped[str] = mapped_column(String(10))
    invitation: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(12), default="pending")
    send_at: Mapped[datetime] = mapped_column(UtcDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    provider: Mapped[str | None] = mapped_column(String(40))
    provider_message_id: Mapped[str | None] = mapped_column(String(300))
    reason: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claimed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    delivery_published_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
