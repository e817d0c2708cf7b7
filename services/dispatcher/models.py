"""The dispatcher's own tables."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, Integer, String, Text, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common.db import UtcDateTime, metadata

# pending → claimed → sending → sent | failed; sending with no outcome after a crash → in_doubt;
# claimed and never started at a crash → pending again
STATUSES = ("pending", "claimed", "sending", "sent", "failed", "in_doubt", "cancelled")
KINDS = ("invitation", "reminder")


class Base(DeclarativeBase):
    metadata = metadata()


class Send(Base):
    """One message to send, the invitation or its reminder: scheduled, claimed, sent. Its delivery
    event is published from here (``delivery_published_at`` is the outbox marker)."""

    __tablename__ = "dispatcher_sends"
    __table_args__ = (
        Index(None, "status", "send_at"),
        Index("ix_dispatcher_sends_unpublished", "status", "delivery_published_at"),
        Index(None, "provider", "provider_message_id"),
        Index(None, "contact", "channel"),
    )

    invitation_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    kind: Mapped[str] = mapped_column(String(12), primary_key=True, default="invitation")
    customer_id: Mapped[str] = mapped_column(String(200), index=True)
    survey_id: Mapped[str] = mapped_column(String(100))
    channel: Mapped[str] = mapped_column(String(10))
    # The email address or E.164 number the message goes to: opt-outs and STOP replies are
    # matched on it.
    contact: Mapped[str | None] = mapped_column(String(320))
    invitation: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(12), default="pending")
    send_at: Mapped[datetime] = mapped_column(UtcDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # SMS: the encoding (GSM-7 or UCS-2) and the number of segments billed for the message.
    sms_encoding: Mapped[str | None] = mapped_column(String(8))
    sms_segments: Mapped[int | None] = mapped_column(Integer)
    provider: Mapped[str | None] = mapped_column(String(40))
    provider_message_id: Mapped[str | None] = mapped_column(String(300))
    reason: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claimed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    delivery_published_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class OptOut(Base):
    """A contact point that must not get surveys on a channel, checked at the moment of sending.

    From ``kaiku.optouts`` (the unsubscribe page: the contact is resolved from the invitation's
    send) and from the providers (STOP, hard bounces, spam reports, invalid numbers); those are
    published to ``kaiku.optouts`` from here (``published_at`` is the outbox marker; rows that
    came from the topic are born published). ``contact`` is ``customer:<id>`` when only the
    customer is known."""

    __tablename__ = "dispatcher_optouts"

    channel: Mapped[str] = mapped_column(String(10), primary_key=True)
    contact: Mapped[str] = mapped_column(String(320), primary_key=True)
    customer_id: Mapped[str | None] = mapped_column(String(200), index=True)
    invitation_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    survey_id: Mapped[str | None] = mapped_column(String(100))
    source: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(String(40))
    optout_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class WebhookToken(Base):
    """A provider webhook's one-use token and the body it came with, kept while a replay of it
    could still pass the timestamp check (Mailgun: its signature covers only a timestamp and
    this token, not the body)."""

    __tablename__ = "dispatcher_webhook_tokens"
    __table_args__ = (Index("ix_dispatcher_webhook_tokens_seen_at", "provider", "seen_at"),)

    provider: Mapped[str] = mapped_column(String(40), primary_key=True)
    token: Mapped[str] = mapped_column(String(200), primary_key=True)
    # SHA-256 of the request's body: the same body again is a retry, another one a forgery.
    body_sha256: Mapped[str] = mapped_column(String(64))
    seen_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Receipt(Base):
    """A provider's report about a message (delivered, bounced, STOP, ...), idempotent on the
    provider's event id. Published to ``kaiku.deliveries`` from here (``published_at``)."""

    __tablename__ = "dispatcher_receipts"
    __table_args__ = (Index("ix_dispatcher_receipts_unpublished", "published_at"),)

    provider: Mapped[str] = mapped_column(String(40), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    invitation_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    kind: Mapped[str] = mapped_column(String(12), default="invitation")
    customer_id: Mapped[str | None] = mapped_column(String(200))
    survey_id: Mapped[str | None] = mapped_column(String(100))
    channel: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(12))
    reason: Mapped[str | None] = mapped_column(Text)
    provider_message_id: Mapped[str | None] = mapped_column(String(300))
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime())
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
