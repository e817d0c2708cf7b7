"""The trigger's own tables."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, String, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common.db import UtcDateTime, metadata


class Base(DeclarativeBase):
    metadata = metadata()


class ProcessedEvent(Base):
    """Marks an event as handled (source + id is the CloudEvents identity) and keeps what was
    published for it, so a redelivered event publishes the same messages again."""

    __tablename__ = "trigger_processed_events"

    source: Mapped[str] = mapped_column(String(500), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(200))
    event_type: Mapped[str] = mapped_column(String(200))
    processed_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # [{"topic": ..., "key": ..., "value": <json text>}, ...]
    published: Mapped[list[dict[str, Any]]] = mapped_column(JSON)


class Decision(Base):
    """The decision ledger: why a customer was (or was not) invited."""

    __tablename__ = "trigger_decisions"
    __table_args__ = (Index(None, "customer_id", "decided_at"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(String(200))
    account_id: Mapped[str | None] = mapped_column(String(200))
    event_source: Mapped[str] = mapped_column(String(500))
    event_id: Mapped[str] = mapped_column(String(200))
    event_type: Mapped[str] = mapped_column(String(200))
    trigger_id: Mapped[str | None] = mapped_column(String(100))
    survey_id: Mapped[str | None] = mapped_column(String(100))
    decision: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(String(100))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    invitation_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    next_eligible_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    decided_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Invitation(Base):
    """Invitations this trigger issued: for coalescing and ``cancel_on`` (which are still
    pending, which case they are about) and the fatigue history (the reservations that limits
    are counted on, by customer, account and contact point)."""

    __tablename__ = "trigger_invitations"
    __table_args__ = (
        Index(None, "customer_id", "trigger_id", "created_at"),
        Index(None, "account_id", "send_at"),
        Index(None, "contact", "send_at"),
    )

    invitation_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(200))
    trigger_id: Mapped[str] = mapped_column(String(100))
    survey_id: Mapped[str] = mapped_column(String(100))
    case_id: Mapped[str | None] = mapped_column(String(200))
    event_id: Mapped[str] = mapped_column(String(200))
    send_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # The time of the event that caused it (the coalescing window counts from here).
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    cancelled_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    account_id: Mapped[str | None] = mapped_column(String(200))
    # The email address or phone number it goes to (contact-point fatigue rules).
    contact: Mapped[str | None] = mapped_column(String(320))
    channel: Mapped[str] = mapped_column(String(10), default="email")
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    failed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    responded_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class Customer(Base):
    """What the trigger remembers of a customer between events."""

    __tablename__ = "trigger_customers"

    customer_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    timezone: Mapped[str | None] = mapped_column(String(64))
    last_unhappy_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Case(Base):
    """Open and closed cases per customer, from the events' case ids."""

    __tablename__ = "trigger_cases"

    customer_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    case_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    open: Mapped[bool] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class OptOut(Base):
    """Contact points (or whole customers, when the contact point is not known) that asked for
    no more surveys on a channel."""

    __tablename__ = "trigger_optouts"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(String(200), index=True)
    contact: Mapped[str | None] = mapped_column(String(320), index=True)
    channel: Mapped[str] = mapped_column(String(10))
    source: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
