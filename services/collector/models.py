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
    text,
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
    # By link (bot detection reads a link's recent hits), and by time (the relay sweeps the
    # hits older than the burst window, of links nobody fetches again).
    __table_args__ = (Index(None, "invitation_id", "at"), Index("ix_collector_hits_at", "at"))

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
    with "" for a segment the event did not carry (so the key can be a primary key). Declared
    in the order of the primary key (before a table's own key columns), whose index makes a read
    of one survey over a range of days a range scan."""

    survey_id: Mapped[str] = mapped_column(String(100), primary_key=True, sort_order=-10)
    day: Mapped[date] = mapped_column(Date, primary_key=True, sort_order=-9)
    touchpoint: Mapped[str] = mapped_column(String(200), primary_key=True, sort_order=-8)
    channel: Mapped[str] = mapped_column(String(200), primary_key=True, sort_order=-7)
    team: Mapped[str] = mapped_column(String(200), primary_key=True, sort_order=-6)
    agent: Mapped[str] = mapped_column(String(200), primary_key=True, sort_order=-5)
    account_id: Mapped[str] = mapped_column(String(200), primary_key=True, sort_order=-4)


def _count(kind: Integer | None = None) -> Mapped[int]:
    """A count column: 0 until something is added (an upsert inserts and sets only the columns
    it changes; a default on the Python side would add every other one to the INSERT)."""
    return mapped_column(kind if kind is not None else Integer(), server_default="0")


class ScoreCell(CellKey, Base):
    """How many answers (the last revision of each) have this score on this day in this
    segment; ``score`` is -1 for an answer without one. Kept in the same transaction as the
    answer, so ``/v1/scores`` sums cells instead of scanning every answer. ``alerted``: how
    many of them raised a close-the-loop alert (``alerted_at`` set), ``contacted``: how many
    of those were contacted since (``contacted_at`` set too)."""

    __tablename__ = "collector_score_cells"

    score: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    suspected_bot: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    n: Mapped[int] = _count(BigInteger().with_variant(Integer, "sqlite"))
    alerted: Mapped[int] = _count()
    contacted: Mapped[int] = _count()


class ContactWait(Base):
    """One contacted alert: the answer's cell (survey, day in the reporting time zone, segments
    with "" for one the event did not carry) and ``wait_us``, the microseconds from its alert to
    its first contact (``contacted_at − alerted_at``; negative when the contact came first): the
    exact waits whose median is ``median_minutes_to_contact``. Kept with the answer like the
    cells (``repository.count_answer``); only contacted alerts have a row, so the table is small
    beside the score cells."""

    __tablename__ = "collector_contact_waits"
    __table_args__ = (Index("ix_collector_contact_waits_survey_day", "survey_id", "day"),)

    response_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    survey_id: Mapped[str] = mapped_column(String(100))
    day: Mapped[date] = mapped_column(Date)
    touchpoint: Mapped[str] = mapped_column(String(200))
    channel: Mapped[str] = mapped_column(String(200))
    team: Mapped[str] = mapped_column(String(200))
    agent: Mapped[str] = mapped_column(String(200))
    account_id: Mapped[str] = mapped_column(String(200))
    wait_us: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))


class DeliveryCell(CellKey, Base):
    """How many invitations were delivered (first reported sent or delivered) on this day in
    this segment: the denominator of the response rate."""

    __tablename__ = "collector_delivery_cells"

    n: Mapped[int] = _count(BigInteger().with_variant(Integer, "sqlite"))


class RollupKey:
    """The key of a roll-up: the cells summed over every segment but those of one grouping set
    (``dim``), by day, ISO week or month. Declared in the order of the primary key, whose index
    makes a read of one survey's roll-up of one grouping set over a range of days, weeks or
    months a range scan."""

    survey_id: Mapped[str] = mapped_column(String(100), primary_key=True, sort_order=-20)
    # 'day': ``bucket`` is the day; 'week': the Monday of its ISO week; 'month': the first day of
    # the month.
    grain: Mapped[str] = mapped_column(String(5), primary_key=True, sort_order=-19)
    # The grouping set, its segments joined by ",": "" (summed over every segment), one of
    # touchpoint, channel, team, agent, account_id, "touchpoint,channel", "team,agent" or
    # "touchpoint,channel,team,agent" (every segment but the account), and at the month grain
    # only the account with each other segment and "account_id,touchpoint,channel": see
    # ``repository.GRAIN_SETS``.
    dim: Mapped[str] = mapped_column(String(60), primary_key=True, sort_order=-18)
    bucket: Mapped[date] = mapped_column(Date, primary_key=True, sort_order=-17)
    # The segments of the grouping set as in the cells ("" when the answer did not carry one);
    # "" for a segment not in the set (summed over).
    touchpoint: Mapped[str] = mapped_column(String(200), primary_key=True, sort_order=-16)
    channel: Mapped[str] = mapped_column(String(200), primary_key=True, sort_order=-15)
    team: Mapped[str] = mapped_column(String(200), primary_key=True, sort_order=-14)
    agent: Mapped[str] = mapped_column(String(200), primary_key=True, sort_order=-13)
    account_id: Mapped[str] = mapped_column(String(200), primary_key=True, sort_order=-12)


# The grouping sets kept at the month grain only (``repository.MONTH_SETS``, which is built
# from these): the account with other segments, many rows per month.
MONTH_SET_DIMS = (
    "account_id,touchpoint",
    "account_id,channel",
    "account_id,team",
    "account_id,agent",
    "account_id,touchpoint,channel",
    "account_id,team,agent",
)


def month_sets_index(table: str, counts: list[str]) -> Index:
    """An index of the month rows of ``MONTH_SET_DIMS`` holding their counts too, on
    PostgreSQL (migration 0007): a read of such a row is then an index-only scan, where from the
    primary key each row cost a table page (its rows were written over the month among every
    other set's: one page per row). Its key is the primary key's but the grain (one value in
    it: a key column without a condition would stop the scan's bounds at it); the predicate's
    list is a constant array (PostgreSQL proves ``dim = '…'`` implies it; not a cast list)."""
    dims = ",".join(f'"{d}"' for d in MONTH_SET_DIMS)
    where = text(f"grain = 'month' AND dim::text = ANY ('{{{dims}}}'::text[])")
    return Index(
        f"ix_{table}_month_sets",
        "survey_id",
        "dim",
        "bucket",
        "touchpoint",
        "channel",
        "team",
        "agent",
        "account_id",
        postgresql_include=counts,
        postgresql_where=where,
    ).ddl_if(dialect="postgresql")


class ScoreRollup(RollupKey, Base):
    """``collector_score_cells`` summed per grouping set and per day, week or month, one row per
    key with a column per score: what ``/v1/scores`` reads when a grouping set covers its
    ``group_by`` (one row per group and period, nothing to pivot). Kept in the same transaction
    as the cells (``repository.count_answer``).

    ``no_score`` and ``score_0`` … ``score_10`` count the answers by persons (``no_score``: the
    question was skipped), ``bots`` the suspected bots' answers whatever their score;
    ``alerted`` and ``contacted`` are the cells' alert counts (persons and bots alike)."""

    __tablename__ = "collector_score_rollups"
    __table_args__ = (
        month_sets_index(
            "collector_score_rollups",
            ["no_score", *(f"score_{s}" for s in range(11)), "bots", "alerted", "contacted"],
        ),
    )

    no_score: Mapped[int] = _count()
    score_0: Mapped[int] = _count()
    score_1: Mapped[int] = _count()
    score_2: Mapped[int] = _count()
    score_3: Mapped[int] = _count()
    score_4: Mapped[int] = _count()
    score_5: Mapped[int] = _count()
    score_6: Mapped[int] = _count()
    score_7: Mapped[int] = _count()
    score_8: Mapped[int] = _count()
    score_9: Mapped[int] = _count()
    score_10: Mapped[int] = _count()
    bots: Mapped[int] = _count()
    alerted: Mapped[int] = _count()
    contacted: Mapped[int] = _count()


class DeliveryRollup(RollupKey, Base):
    """``collector_delivery_cells`` summed like ``collector_score_rollups``."""

    __tablename__ = "collector_delivery_rollups"
    __table_args__ = (month_sets_index("collector_delivery_rollups", ["n"]),)

    n: Mapped[int] = _count(BigInteger().with_variant(Integer, "sqlite"))


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
