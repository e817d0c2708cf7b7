"""The collector's own tables."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Boolean, Index, Integer, SmallInteger, String, Text, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common.db import UtcDateTime, metadata


class Base(DeclarativeBase):
    metadata = metadata()


class Segments:
    """The segment columns scores are grouped by, copied from the event."""

    touchpoint: Mapped[str | None] = mapped_column(String(200))
    channel: Mapped[str | None] = mapped_column(String(200))
    team: Mapped[str | None] = mapped_column(String(200))
    agent: Mapped[str | None] = mapped_column(String(200))
    account_id: Mapped[str | None] = mapped_column(String(200))
    case_id: Mapped[str | None] = mapped_column(String(200))


class Invitation(Segments, Base):
    """What the survey page and the scores need to know about an invitation."""

    __tablename__ = "collector_invitations"

    invitation_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    token: Mapped[str] = mapped_column(String(32), unique=True)
    survey_id: Mapped[str] = mapped_column(String(100))
    metric: Mapped[str] = mapped_column(String(8))
    customer_id: Mapped[str] = mapped_column(String(200), index=True)
    locale: Mapped[str] = mapped_column(String(8))
    survey_channel: Mapped[str] = mapped_column(String(10))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # Set when the trigger cancelled the invitation (its case reopened, a newer one replaced it).
    cancelled_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class OptOut(Base):
    """An unsubscribe from a survey link (one per invitation; repeated clicks change nothing).
    ``published_at`` is the outbox marker for ``kaiku.optouts``."""

    __tablename__ = "collector_optouts"

    invitation_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    optout_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    customer_id: Mapped[str] = mapped_column(String(200), index=True)
    survey_id: Mapped[str] = mapped_column(String(100))
    channel: Mapped[str] = mapped_column(String(10))
    source: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class Response(Segments, Base):
    """One answer per invitation; a changed answer updates it (the last one counts).
    ``published_at`` is the outbox marker for ``kaiku.responses``."""

    __tablename__ = "collector_responses"
    __table_args__ = (Index(None, "survey_id", "submitted_at"),)

    response_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    invitation_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    survey_id: Mapped[str] = mapped_column(String(100))
    metric: Mapped[str] = mapped_column(String(8))
    customer_id: Mapped[str] = mapped_column(String(200), index=True)
    score: Mapped[int | None] = mapped_column(SmallInteger)
    comment: Mapped[str | None] = mapped_column(Text)
    locale: Mapped[str] = mapped_column(String(8))
    revision: Mapped[int] = mapped_column(Integer, default=1)
    suspected_bot: Mapped[bool] = mapped_column(Boolean, default=False)
    first_submitted_at: Mapped[datetime] = mapped_column(UtcDateTime())
    submitted_at: Mapped[datetime] = mapped_column(UtcDateTime())
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
