"""Suspected bots: each rule on its own and in combination, with an injected clock."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.collector import repository
from services.collector.bots import BotRules
from services.collector.config import CollectorSettings
from services.collector.models import Hit, Invitation
from services.collector.outbox import ResponseRelay
from services.common.db import unit_of_work

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
RULES = BotRules.of(
    CollectorSettings(
        bot_min_seconds=10, trap_window_seconds=120, burst_window_seconds=60, burst_scores=3
    )
)


def invitation(delivered: float | None = None, trap: float | None = None) -> Invitation:
    return Invitation(
        invitation_id=uuid.uuid4(),
        delivered_at=None if delivered is None else T0 + timedelta(seconds=delivered),
        trap_hit_at=None if trap is None else T0 + timedelta(seconds=trap),
    )


def hits(*items: tuple[str, int | None, float]) -> list[Hit]:
    return [Hit(kind=k, score=s, at=T0 + timedelta(seconds=at)) for k, s, at in items]


CASES = [
    # name, delivered, trap, hits, POST at (seconds after T0), expected reason
    ("a person, a minute after delivery", 0, None, [("post", 9, 60)], 60, None),
    ("no delivery report: judged on the rest", None, None, [("post", 9, 1)], 1, None),
    ("two seconds after delivery", 0, None, [("post", 9, 2)], 2, "too_fast"),
    ("exactly at the threshold counts", 0, None, [("post", 9, 10)], 10, None),
    ("trap hit 30 s before", 0, 100, [("post", 9, 130)], 130, "trap"),
    ("trap hit long before: the person came later", 0, 100, [("post", 9, 400)], 400, None),
    (
        "every score link opened, then a POST",
        0,
        None,
        [("score_link", s, 3) for s in range(11)] + [("post", 7, 30)],
        30,
        "burst",
    ),
    (
        "a JS-driven POST burst with different scores",
        0,
        None,
        [("post", 1, 20), ("post", 5, 21), ("post", 9, 22)],
        22,
        "burst",
    ),
    (
        "a person clicks 9 in the email and answers 10",
        0,
        None,
        [("score_link", 9, 40), ("open", None, 41), ("post", 10, 70)],
        70,
        None,
    ),
    (
        "the scanner's burst is over; the person answers later",
        0,
        None,
        [("score_link", s, 3) for s in range(11)] + [("post", 8, 600)],
        600,
        None,
    ),
    (
        "the same score posted three times is not a burst",
        0,
        None,
        [("post", 9, t) for t in (20, 21, 22)],
        22,
        None,
    ),
    ("trap wins over too fast", 0, 1, [("post", 9, 2)], 2, "trap"),
]


@pytest.mark.parametrize(
    ("delivered", "trap", "seen", "at", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_judge(
    delivered: float | None,
    trap: float | None,
    seen: list[tuple[str, int | None, float]],
    at: float,
    expected: str | None,
) -> None:
    now = T0 + timedelta(seconds=at)
    recent = [h for h in hits(*seen) if h.at >= now - RULES.burst_window]
    assert RULES.judge(invitation(delivered, trap), recent, now) == expected


async def test_a_link_fetched_again_and_again_keeps_only_its_recent_hits(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    link, other = uuid.uuid4(), uuid.uuid4()
    keep = RULES.burst_window
    async with unit_of_work(sessions) as session:
        await repository.add_hit(session, other, "open", None, T0, keep=keep)
    for second in range(0, 600, 5):  # the page reloaded every 5 seconds for 10 minutes
        async with unit_of_work(sessions) as session:
            at = T0 + timedelta(seconds=second)
            await repository.add_hit(session, link, "score_link", second % 11, at, keep=keep)
    last = T0 + timedelta(seconds=595)
    async with unit_of_work(sessions) as session:
        stored = (await session.execute(select(Hit.invitation_id, Hit.at))).all()
        recent = await repository.recent_hits(session, link, last - keep)
    kept = sorted(at for i, at in stored if i == link)
    # The last minute's 13 requests: all that bot detection reads, nothing older.
    assert kept == [last - timedelta(seconds=s) for s in range(60, -1, -5)]
    assert [h.at for h in recent] == kept
    assert [at for i, at in stored if i == other] == [T0]  # another link's are its own


class _NoBroker:
    """The relay's producer when there is nothing to publish."""

    async def publish(self, messages: object) -> None:
        assert not messages, messages


async def test_the_relay_forgets_the_hits_of_links_nobody_fetches_again(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """A link opened once keeps no hit past the burst window: the relay sweeps them each round,
    oldest first and a batch at a time, and leaves the window's hits for bot detection."""
    once = [uuid.uuid4() for _ in range(3)]
    recent = uuid.uuid4()
    keep = RULES.burst_window
    async with unit_of_work(sessions) as session:
        for i, link in enumerate(once):
            await repository.add_hit(
                session, link, "open", None, T0 + timedelta(seconds=i), keep=keep
            )
        await repository.add_hit(session, recent, "post", 9, T0 + timedelta(seconds=590), keep=keep)

    async def links() -> list[uuid.UUID]:
        async with unit_of_work(sessions) as session:
            return list(
                (await session.execute(select(Hit.invitation_id).order_by(Hit.at))).scalars()
            )

    now = T0 + timedelta(seconds=600)
    async with unit_of_work(sessions) as session:
        await repository.sweep_hits(session, now - keep, limit=2)
    assert await links() == [once[2], recent]  # the two oldest first
    relay = ResponseRelay(sessions, _NoBroker(), clock=lambda: now, keep_hits=keep)  # type: ignore[arg-type]
    assert await relay.publish() == 0
    assert await links() == [recent]
