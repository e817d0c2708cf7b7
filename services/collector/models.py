"""The collector's own tables."""

from __future__ import annotations

import uuid
from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    Uuid,
)
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
    # None once the customer has been erased.
    customer_id: Mapped[str | None] = mapped_column(String(200), index=True)
    locale: Mapped[str] = mapped_column(String(8))
    survey_channel: Mapped[str] = mapped_column(String(10))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # Set when the trigger cancelled the invitation (its case reopened, a newer one replaced it).
    cancelled_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # When the invitation (not a reminder) was first reported sent or delivered on kaiku.deliveries.
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # The last request to the hidden trap link in the email or the page (only scanners follow it).
    trap_hit_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # Set when the customer was erased: the link then answers "not found".
    erased_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


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
    ``published_at`` is the outbox marker for ``kaiku.responses``.

    ``day`` is the date of ``submitted_at`` in the reporting time zone: scores are grouped by
    it, and ``collector_score_cells`` counts the answers per day and segment.
    """

    __tablename__ = "collector_responses"
    __table_args__ = (
        Index("ix_collector_responses_survey_submitted", "survey_id", "submitted_at"),
        Index("ix_collector_responses_survey_alerted", "survey_id", "alerted_at"),
        Index("ix_collector_responses_followup_updated", "followup_updated_at"),
    )

    response_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    invitation_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    survey_id: Mapped[str] = mapped_column(String(100))
    metric: Mapped[str] = mapped_column(String(8))
    # None once the customer has been erased (the score stays, without identity).
    customer_id: Mapped[str | None] = mapped_column(String(200), index=True)
    score: Mapped[int | None] = mapped_column(SmallInteger)
    comment: Mapped[str | None] = mapped_column(Text)
    locale: Mapped[str] = mapped_column(String(8))
    revision: Mapped[int] = mapped_column(Integer, default=1)
    suspected_bot: Mapped[bool] = mapped_column(Boolean, default=False)
    # Why the answer looks automated: too_fast, burst or trap (None for a person's answer).
    bot_reason: Mapped[str | None] = mapped_column(String(20))
    day: Mapped[date] = mapped_column(Date)
    first_submitted_at: Mapped[datetime] = mapped_column(UtcDateTime())
    submitted_at: Mapped[datetime] = mapped_column(UtcDateTime())
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # Close the loop: an alert rule matched (``alerted_at``, the rules in ``alert_rules``), and
    # the follow-up's status: open, contacted or resolved, with a note.
    alerted_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    alert_rules: Mapped[str | None] = mapped_column(String(500))
    followup_status: Mapped[str | None] = mapped_column(String(12))
    followup_note: Mapped[str | None] = mapped_column(Text)
    contacted_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    resolved_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    followup_updated_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    erased_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class Hit(Base):
    """A request to a survey link that recorded nothing (a GET of the page, a score button, the
    trap link) or a POSTed score: what bot detection looks at. No IP address, no user agent."""

    __tablename__ = "collector_hits"
    __table_args__ = (Index(None, "invitation_id", "at"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    invitation_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    # open (the page), score_link (a score button: GET with ?score=N), trap, post
    kind: Mapped[str] = mapped_column(String(12))
    score: Mapped[int | None] = mapped_column(SmallInteger)
    at: Mapped[datetime] = mapped_column(UtcDateTime())


class CellKey:
    """The key of a pre-aggregated count: survey, day (reporting time zone) and the segments,
    with "" for a segment the event did not carry (so the key can be a primary key)."""

    survey_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    touchpoint: Mapped[str] = mapped_column(String(200), primary_key=True)
    channel: Mapped[str] = mapped_column(String(200), primary_key=True)
    team: Mapped[str] = mapped_column(String(200), primary_key=True)
    agent: Mapped[str] = mapped_column(String(200), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(200), primary_key=True)


class ScoreCell(CellKey, Base):
    """How many answers (the last revision of each) have this score on this day in this
    segment; ``score`` is -1 for an answer without one. Kept in the same transaction as the
    answer, so ``/v1/scores`` sums cells instead of scanning every answer."""

    __tablename__ = "collector_score_cells"

    score: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    suspected_bot: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))


class DeliveryCell(CellKey, Base):
    """How many invitations were delivered (first reported sent or delivered) on this day in
    this segment: the denominator of the response rate."""

    __tablename__ = "collector_delivery_cells"

    n: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))


class RollupKey:
    """The key of a roll-up: the cells summed over every segment but one (``dim``), by day or
    by month. Declared in the order of the primary key, whose index makes a read of one
    survey's roll-up of one segment over a range of days or months a range scan."""

    survey_id: Mapped[str] = mapped_column(String(100), primary_key=True, sort_order=-10)
    # 'day': ``bucket`` is the day; 'month': the first day of the month.
    grain: Mapped[str] = mapped_column(String(5), primary_key=True, sort_order=-9)
    # '' (summed over every segment) or one of touchpoint, channel, team, agent, account_id.
    dim: Mapped[str] = mapped_column(String(12), primary_key=True, sort_order=-8)
    bucket: Mapped[date] = mapped_column(Date, primary_key=True, sort_order=-7)
    # The segment's value: "" when ``dim`` is "" or the answer did not carry the segment.
    value: Mapped[str] = mapped_column(String(200), primary_key=True, sort_order=-6)


class ScoreRollup(RollupKey, Base):
    """``collector_score_cells`` summed per single segment (or none) and per day or month:
    what ``/v1/scores`` reads when it groups by at most one segment. Kept in the same
    transaction as the cells (``repository.count_answer``)."""

    __tablename__ = "collector_score_rollups"

    score: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    suspected_bot: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))


class DeliveryRollup(RollupKey, Base):
    """``collector_delivery_cells`` summed like ``collector_score_rollups``."""

    __tablename__ = "collector_delivery_rollups"

    n: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))


class EarlyDelivery(Base):
    """A delivery report for an invitation the collector has not stored yet (the two arrive on
    different topics); applied when the invitation arrives."""

    __tablename__ = "collector_early_deliveries"

    invitation_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    delivered_at: Mapped[datetime] = mapped_column(UtcDateTime())
    day: Mapped[date] = mapped_column(Date)


class Erasure(Base):
    """An erasure request (``DELETE /v1/customers/{id}``), and the outbox marker of its
    ``CustomerErased`` event on ``kaiku.optouts``. The customer id is kept only until the event
    is published; ``customer_hash`` (the salted hash) stays."""

    __tablename__ = "collector_erasures"

    erasure_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    customer_id: Mapped[str | None] = mapped_column(String(200))
    customer_hash: Mapped[str] = mapped_column(String(80), index=True)
    requested_at: Mapped[datetime] = mapped_column(UtcDateTime())
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class AlertDelivery(Base):
    """One alert to one webhook (the outbox of close-the-loop alerts): written in the answer's
    transaction, posted by ``alerting.AlertSender``. ``id`` is the ``webhook-id``, the same on
    every retry. ``rules`` are the rules that newly matched with this revision."""

    __tablename__ = "collector_alert_deliveries"
    __table_args__ = (Index(None, "status", "next_attempt_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    response_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    revision: Mapped[int] = mapped_column(Integer)
    rules: Mapped[str] = mapped_column(String(500))
    url: Mapped[str] = mapped_column(String(2000))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # pending (waiting or being posted), delivered, failed (for good)
    status: Mapped[str] = mapped_column(String(10), default="pending")
    last_error: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
