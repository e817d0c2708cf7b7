"""Fatigue rules and quiet hours, table-driven, on the pure engine with an injected clock."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from services.common.program import Fatigue
from services.trigger.fatigue import Candidate, allowed_from, check, schedule

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def fatigue(*rules: dict[str, Any], quiet: list[dict[str, Any]] | None = None) -> Fatigue:
    base = {"scope": "global", "channel": "any", "clock": "invited", "action": "drop"}
    return Fatigue.model_validate(
        {
            "rules": [{"id": f"r{i}", **base, **r} for i, r in enumerate(rules)],
            "quiet_hours": quiet or [],
        }
    )


@dataclass(frozen=True)
class Touch:
    """A survey in the history (what ``fatigue.Touched`` describes)."""

    customer_id: str
    account_id: str | None
    contact: str | None
    channel: str
    survey_id: str
    trigger_id: str
    invited_at: datetime
    delivered_at: datetime | None = None
    responded_at: datetime | None = None
    status: str = "pending"


def touch(days_ago: float, **kw: Any) -> Touch:
    values: dict[str, Any] = {
        "customer_id": "c1",
        "account_id": "a1",
        "contact": "c1@example.com",
        "channel": "email",
        "survey_id": "csat",
        "trigger_id": "solved",
        "invited_at": T0 - timedelta(days=days_ago),
        "status": "sent",
    }
    values.update(kw)
    return Touch(**values)


def candidate(**kw: Any) -> Candidate:
    values: dict[str, Any] = {
        "customer_id": "c1",
        "account_id": "a1",
        "contact": "c1@example.com",
        "channel": "email",
        "survey_id": "csat",
        "trigger_id": "solved",
        "send_at": T0,
    }
    values.update(kw)
    return Candidate(**values)


CUSTOMER_30D = {"key": "customer", "window": "30d", "limit": 1}

CASES = [
    # (name, rules, history, candidate changes, expected action, expected rule)
    ("empty history", [CUSTOMER_30D], [], {}, "allow", None),
    ("one survey 10 days ago", [CUSTOMER_30D], [touch(10)], {}, "drop", "r0"),
    ("outside the window", [CUSTOMER_30D], [touch(31)], {}, "allow", None),
    ("limit 2 not reached", [{**CUSTOMER_30D, "limit": 2}], [touch(10)], {}, "allow", None),
    ("limit 2 reached", [{**CUSTOMER_30D, "limit": 2}], [touch(10), touch(5)], {}, "drop", "r0"),
    ("another customer", [CUSTOMER_30D], [touch(10, customer_id="c2")], {}, "allow", None),
    (
        "cancelled ones do not count",
        [CUSTOMER_30D],
        [touch(10, status="cancelled")],
        {},
        "allow",
        None,
    ),
    ("failed ones do not count", [CUSTOMER_30D], [touch(10, status="failed")], {}, "allow", None),
    (
        "a scheduled future survey counts",
        [CUSTOMER_30D],
        [touch(-10, status="pending")],
        {},
        "drop",
        "r0",
    ),
    # key
    (
        "account key across customers",
        [{"key": "account", "window": "7d", "limit": 1}],
        [touch(2, customer_id="c2")],
        {},
        "drop",
        "r0",
    ),
    (
        "account key without an account",
        [{"key": "account", "window": "7d", "limit": 1}],
        [touch(2, customer_id="c2")],
        {"account_id": None},
        "allow",
        None,
    ),
    (
        "contact key: same address, other customer",
        [{"key": "contact", "window": "7d", "limit": 1}],
        [touch(2, customer_id="c9")],
        {},
        "drop",
        "r0",
    ),
    (
        "contact key: other address",
        [{"key": "contact", "window": "7d", "limit": 1}],
        [touch(2)],
        {"contact": "other@example.com"},
        "allow",
        None,
    ),
    # scope
    (
        "survey scope, other survey",
        [{**CUSTOMER_30D, "scope": "survey"}],
        [touch(10, survey_id="nps")],
        {},
        "allow",
        None,
    ),
    (
        "survey scope, same survey",
        [{**CUSTOMER_30D, "scope": "survey"}],
        [touch(10)],
        {},
        "drop",
        "r0",
    ),
    (
        "trigger scope, other trigger",
        [{**CUSTOMER_30D, "scope": "trigger"}],
        [touch(10, trigger_id="closed")],
        {},
        "allow",
        None,
    ),
    # channel
    (
        "sms rule ignores email candidates",
        [{**CUSTOMER_30D, "channel": "sms"}],
        [touch(10, channel="sms")],
        {},
        "allow",
        None,
    ),
    (
        "sms rule counts only sms",
        [{**CUSTOMER_30D, "channel": "sms"}],
        [touch(10)],
        {"channel": "sms"},
        "allow",
        None,
    ),
    (
        "sms rule bites on sms",
        [{**CUSTOMER_30D, "channel": "sms"}],
        [touch(10, channel="sms")],
        {"channel": "sms"},
        "drop",
        "r0",
    ),
    # clock
    (
        "delivered clock: undelivered sent one does not count",
        [{**CUSTOMER_30D, "clock": "delivered"}],
        [touch(10)],
        {},
        "allow",
        None,
    ),
    (
        "delivered clock: delivered one counts",
        [{**CUSTOMER_30D, "clock": "delivered"}],
        [touch(10, delivered_at=T0 - 9 * DAY)],
        {},
        "drop",
        "r0",
    ),
    (
        "delivered clock: a pending one counts from its send time",
        [{**CUSTOMER_30D, "clock": "delivered"}],
        [touch(-3, status="pending")],
        {},
        "drop",
        "r0",
    ),
    (
        "responded clock: unanswered does not count",
        [{**CUSTOMER_30D, "clock": "responded"}],
        [touch(10)],
        {},
        "allow",
        None,
    ),
    (
        "responded clock: answered counts",
        [{**CUSTOMER_30D, "clock": "responded"}],
        [touch(40, responded_at=T0 - 20 * DAY)],
        {},
        "drop",
        "r0",
    ),
    # combination: the strictest wins
    (
        "drop beats defer",
        [{**CUSTOMER_30D, "action": "defer"}, {"key": "account", "window": "7d", "limit": 1}],
        [touch(3)],
        {},
        "drop",
        "r1",
    ),
    ("ignore_fatigue", [CUSTOMER_30D], [touch(1)], {"ignore": True}, "allow", None),
]


@pytest.mark.parametrize(
    ("name", "rules", "history", "changes", "action", "rule"), CASES, ids=[c[0] for c in CASES]
)
def test_rule_dimensions(
    name: str,
    rules: list[dict[str, Any]],
    history: list[Touch],
    changes: dict[str, Any],
    action: str,
    rule: str | None,
) -> None:
    ignore = changes.pop("ignore", False)
    verdict = check(fatigue(*rules), candidate(**changes), history, ignore=ignore)
    assert (verdict.action, verdict.rule) == (action, rule)


def test_drop_says_when_the_customer_is_eligible_again() -> None:
    verdict = check(fatigue(CUSTOMER_30D), candidate(), [touch(10)])
    assert verdict.next_eligible_at == T0 + 20 * DAY
    assert verdict.seen["counted"] == 1
    assert verdict.seen["limit"] == 1


def test_defer_moves_to_the_first_moment_every_rule_allows() -> None:
    rules = (
        {**CUSTOMER_30D, "action": "defer"},
        {"key": "account", "window": "40d", "limit": 2, "action": "defer"},
    )
    history = [touch(10), touch(35, customer_id="c2")]
    verdict = check(fatigue(*rules), candidate(), history)
    # The customer's own survey leaves its 30-day window in 20 days; by then the account's
    # 40-day window holds only one (the c2 survey leaves it in 5 days): send in 20 days.
    assert verdict.action == "defer"
    assert verdict.send_at == T0 + 20 * DAY
    assert verdict.next_eligible_at == T0 + 20 * DAY


def test_a_deferred_send_is_checked_against_surveys_scheduled_later() -> None:
    # Limit 1 in 30 days; one survey 10 days ago and one scheduled in 25 days. Deferring to day
    # 20 would put two in the window ending at day 25: the first free moment is day 55.
    history = [touch(10), touch(-25, status="pending")]
    verdict = check(fatigue({**CUSTOMER_30D, "action": "defer"}), candidate(), history)
    assert verdict.send_at == T0 + 55 * DAY


# A survey 10 days ago and one scheduled in 25 days, limit 1 in 30 days: the rules allow the
# next one on day 55 (as above), a postponement longer than the 30-day window.
QUEUED = [touch(10), touch(-25, status="pending")]
DEFER_30D = {**CUSTOMER_30D, "action": "defer"}
ACCOUNT_7D = {"key": "account", "window": "7d", "limit": 1, "action": "defer"}


@pytest.mark.parametrize(
    ("name", "rules", "history", "action", "send_at", "rule"),
    [
        ("nothing bites", [DEFER_30D], [], "allow", T0, None),
        ("within the window", [DEFER_30D], [touch(10)], "defer", T0 + 20 * DAY, "r0"),
        ("exactly one window", [DEFER_30D], [touch(0)], "defer", T0 + 30 * DAY, "r0"),
        ("past the window: dropped", [DEFER_30D], QUEUED, "drop", None, "r0"),
        (
            "max_defer allows it",
            [{**DEFER_30D, "max_defer": "60d"}],
            QUEUED,
            "defer",
            T0 + 55 * DAY,
            "r0",
        ),
        ("max_defer shorter", [{**DEFER_30D, "max_defer": "19d"}], [touch(10)], "drop", None, "r0"),
        # Both rules bite: the account's alone would wait 3 days, the customer's 20. Postponed
        # 20 days, past the account's 7-day limit: the account's rule is the one that drops it.
        (
            "the tighter limit decides",
            [DEFER_30D, ACCOUNT_7D],
            [touch(10), touch(4, customer_id="c2")],
            "drop",
            None,
            "r1",
        ),
    ],
)
def test_a_deferral_is_bounded_by_max_defer(
    name: str,
    rules: list[dict[str, Any]],
    history: list[Touch],
    action: str,
    send_at: datetime | None,
    rule: str | None,
) -> None:
    verdict = schedule(fatigue(*rules), candidate(), history, "Europe/Helsinki")
    assert (verdict.action, verdict.send_at, verdict.rule) == (action, send_at, rule)
    if action == "drop":  # the ledger says when it would have gone, and why it did not
        assert verdict.next_eligible_at is not None and verdict.next_eligible_at > T0
        assert verdict.seen["max_defer"] == str(fatigue(*rules).rules[int(rule[1:])].defer_limit)


def test_quiet_hours_do_not_count_against_max_defer() -> None:
    # A survey at 18:00 in Helsinki and a rule of one per 27 hours: the next may go at 21:00 the
    # day after (postponed exactly its window), inside the quiet hours, so it moves on to 09:00.
    # It waits 39 hours in all but is sent: only the rule's own postponement counts.
    rule = {"key": "customer", "window": "27h", "limit": 1, "action": "defer"}
    quiet = [{"start": "20:00", "end": "09:00"}]
    at = utc("2026-11-19T18:00:00+02:00")
    verdict = schedule(
        fatigue(rule, quiet=quiet),
        candidate(send_at=at),
        [touch(0, invited_at=at)],
        "Europe/Helsinki",
    )
    assert verdict.action == "defer"
    assert verdict.send_at == utc("2026-11-21T09:00:00+02:00")


def test_rolling_windows_hold_at_every_instant() -> None:
    # Limit 2 per 7 days: surveys 3 days ago and in 3 days (scheduled). No window ending now holds
    # three, but the one ending in 3 days would (-3, 0, +3): a new one now must not be allowed.
    rule = {"key": "customer", "window": "7d", "limit": 2}
    history = [touch(3), touch(-3, status="pending")]
    assert check(fatigue(rule), candidate(), history).action == "drop"
    assert check(fatigue(rule), candidate(), [touch(3)]).action == "allow"
    # 6 days ago and in 3 days span 9 days: no 7-day window holds all three.
    assert (
        check(fatigue(rule), candidate(), [touch(6), touch(-3, status="pending")]).action == "allow"
    )


# -- quiet hours ----------------------------------------------------------------------------------

NIGHT = [{"start": "21:00", "end": "08:00"}]
NIGHT_AND_WEEKENDS = [{"start": "21:00", "end": "08:00", "weekends": True}]


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@pytest.mark.parametrize(
    ("when", "zone", "quiet", "expected"),
    [
        # Helsinki is UTC+2 in winter: 23:30 local → 08:00 local next day.
        ("2026-11-20T21:30:00+00:00", "Europe/Helsinki", NIGHT, "2026-11-21T08:00:00+02:00"),
        ("2026-11-20T10:00:00+00:00", "Europe/Helsinki", NIGHT, "2026-11-20T10:00:00+00:00"),
        ("2026-11-20T05:59:00+00:00", "Europe/Helsinki", NIGHT, "2026-11-20T08:00:00+02:00"),
        ("2026-11-20T06:00:00+00:00", "Europe/Helsinki", NIGHT, "2026-11-20T06:00:00+00:00"),
        # New York, UTC-5 in November.
        ("2026-11-20T03:00:00+00:00", "America/New_York", NIGHT, "2026-11-20T08:00:00-05:00"),
        # Friday 22:00 Helsinki with quiet weekends → Monday 08:00.
        (
            "2026-11-20T20:00:00+00:00",
            "Europe/Helsinki",
            NIGHT_AND_WEEKENDS,
            "2026-11-23T08:00:00+02:00",
        ),
        (
            "2026-11-21T12:00:00+00:00",
            "Europe/Helsinki",
            NIGHT_AND_WEEKENDS,
            "2026-11-23T08:00:00+02:00",
        ),
        # Daylight saving starts in Helsinki on 2026-03-29 (03:00 → 04:00) and the night before is
        # one hour shorter: 02:30 local (00:30 UTC) waits until 08:00 EEST (05:00 UTC).
        ("2026-03-29T00:30:00+00:00", "Europe/Helsinki", NIGHT, "2026-03-29T08:00:00+03:00"),
        # Daylight saving ends in Helsinki on 2026-10-25 (04:00 → 03:00): 08:00 EET is 06:00 UTC.
        ("2026-10-25T01:30:00+00:00", "Europe/Helsinki", NIGHT, "2026-10-25T08:00:00+02:00"),
        # New York: DST starts 2026-03-08 (02:00 → 03:00), ends 2026-11-01 (02:00 → 01:00).
        ("2026-03-08T07:30:00+00:00", "America/New_York", NIGHT, "2026-03-08T08:00:00-04:00"),
        ("2026-11-01T06:30:00+00:00", "America/New_York", NIGHT, "2026-11-01T08:00:00-05:00"),
    ],
)
def test_quiet_hours_in_the_recipients_zone(
    when: str, zone: str, quiet: list[dict[str, Any]], expected: str
) -> None:
    assert allowed_from(fatigue(quiet=quiet), utc(when), "email", zone) == utc(expected)


def test_quiet_hours_that_end_in_a_skipped_hour() -> None:
    # Quiet until 03:30 on the night clocks jump from 03:00 to 04:00: 03:30 does not exist, the
    # first instant past it is 04:00 EEST (01:00 UTC).
    quiet = [{"start": "22:00", "end": "03:30"}]
    got = allowed_from(
        fatigue(quiet=quiet), utc("2026-03-28T22:00:00+00:00"), "sms", "Europe/Helsinki"
    )
    assert got == utc("2026-03-29T04:00:00+03:00")


def test_quiet_hours_per_channel() -> None:
    quiet = [{"channel": "sms", "start": "20:00", "end": "09:00"}]
    night = utc("2026-11-20T21:00:00+00:00")  # 23:00 in Helsinki
    assert allowed_from(fatigue(quiet=quiet), night, "email", "Europe/Helsinki") == night
    assert allowed_from(fatigue(quiet=quiet), night, "sms", "Europe/Helsinki") == utc(
        "2026-11-21T09:00:00+02:00"
    )


def test_an_unknown_time_zone_never_sends_at_night_anywhere_it_could_be() -> None:
    f = Fatigue.model_validate(
        {
            "quiet_hours": NIGHT,
            "unknown_timezone_zones": ["America/New_York", "Europe/Helsinki"],
        }
    )
    # 07:00 UTC is 09:00 in Helsinki but 02:00 in New York: wait for 08:00 New York (13:00 UTC),
    # which is 15:00 in Helsinki: daytime in both.
    got = allowed_from(f, utc("2026-11-20T07:00:00+00:00"), "email", None)
    assert got == utc("2026-11-20T13:00:00+00:00")
    for zone in ("America/New_York", "Europe/Helsinki"):
        assert 8 <= got.astimezone(ZoneInfo(zone)).hour < 21


# -- suppression and quotas -----------------------------------------------------------------------

SUPPRESSION = {
    "excluded_domains": ["competitor.example"],
    "open_case": {},
    "detractor_cooldown": "90d",
}


def suppression() -> Any:
    from services.common.program import Suppression

    return Suppression.model_validate(SUPPRESSION)


@pytest.mark.parametrize(
    ("state", "changes", "expected"),
    [
        ({}, {}, None),
        ({"opted_out": {("c1@example.com", "email")}}, {}, "opted_out"),
        ({"opted_out": {("c1@example.com", "sms")}}, {}, None),  # another channel
        ({"opted_out": {(None, "email")}}, {}, "opted_out"),  # the whole customer
        ({}, {"email": "boss@competitor.example"}, "excluded_domain"),
        ({}, {"email": "boss@eu.competitor.example"}, "excluded_domain"),
        ({}, {"email": "boss@notcompetitor.example"}, None),
        ({"open_cases": {"T-2"}}, {}, "open_case"),
        ({"open_cases": {"T-1"}}, {}, None),  # the case this survey is about
        ({"last_unhappy_at": T0 - 30 * DAY}, {}, "detractor_cooldown"),
        ({"last_unhappy_at": T0 - 91 * DAY}, {}, None),
        # A survey that ignores fatigue still respects opt-outs, not the cool-down.
        ({"last_unhappy_at": T0 - DAY}, {"ignore": True}, None),
        ({"opted_out": {(None, "email")}}, {"ignore": True}, "opted_out"),
    ],
)
def test_suppression(state: dict[str, Any], changes: dict[str, Any], expected: str | None) -> None:
    from services.trigger.fatigue import CustomerState, suppressed

    customer = CustomerState(
        opted_out=frozenset(state.get("opted_out", ())),
        open_cases=frozenset(state.get("open_cases", ())),
        last_unhappy_at=state.get("last_unhappy_at"),
    )
    got = suppressed(
        suppression(),
        candidate(),
        customer,
        case_id="T-1",
        email=changes.get("email", "c1@example.com"),
        now=T0,
        ignore_fatigue=changes.get("ignore", False),
    )
    assert (got.reason if got else None) == expected
    if expected == "detractor_cooldown":
        assert got is not None
        assert got.next_eligible_at == T0 + 60 * DAY


@pytest.mark.parametrize(
    ("at", "per", "zone", "start", "end"),
    [
        (
            "2026-11-20T23:30:00+00:00",
            "day",
            "Europe/Helsinki",
            "2026-11-21T00:00:00+02:00",
            "2026-11-22T00:00:00+02:00",
        ),
        (
            "2026-11-20T23:30:00+00:00",
            "day",
            None,
            "2026-11-20T00:00:00+00:00",
            "2026-11-21T00:00:00+00:00",
        ),
        (
            "2026-03-29T12:00:00+00:00",
            "day",
            "Europe/Helsinki",  # a 23-hour day
            "2026-03-29T00:00:00+02:00",
            "2026-03-30T00:00:00+03:00",
        ),
        (
            "2026-12-31T22:30:00+00:00",
            "month",
            "Europe/Helsinki",
            "2027-01-01T00:00:00+02:00",
            "2027-02-01T00:00:00+02:00",
        ),
    ],
)
def test_quota_periods_are_calendar_days_and_months(
    at: str, per: Any, zone: str | None, start: str, end: str
) -> None:
    from services.trigger.fatigue import quota_period

    assert quota_period(utc(at), per, zone) == (utc(start), utc(end))
