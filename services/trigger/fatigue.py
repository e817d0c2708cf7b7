"""Fatigue rules and quiet hours. Pure: functions of the program's rules, the customer's history
and ``now``; the trigger's repository loads the history and reserves the result atomically.

A fatigue rule says: no more than ``limit`` surveys for one ``key`` (customer, account or contact
point) within any rolling ``window``, counting the surveys of its ``scope`` (all, the same survey,
the same trigger) on its ``channel``, on its ``clock`` (when invited, delivered or answered). Every
rule applies and the strictest wins: a ``drop`` rule that bites drops the invitation; otherwise a
``defer`` rule that bites moves it to the first moment no rule bites any more.

Limits are checked over every window the new survey would fall into, not only the one ending at
its send time, so a survey scheduled in the future counts against the surveys before and after it.

Quiet hours are in the recipient's local time zone (from the event, else the customer's last known,
else the program default). When none is known the send must be outside quiet hours in every zone
of ``unknown_timezone_zones``: an unknown zone never leads to a night-time send.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from datetime import time as clock_time
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo

from services.common.program import Fatigue, FatigueRule, Suppression
from services.common.quiet_hours import allowed_from, wall_time_at

__all__ = ["allowed_from"]

Channel = Literal["email", "sms"]

# Counted statuses: a cancelled or failed invitation was never a survey the customer received.
COUNTED = ("pending", "sent")


class Touched(Protocol):
    """A survey the customer had, or has scheduled: what the rules read of it (the trigger
    passes its own records of invitations; no copy is made per check)."""

    @property
    def customer_id(self) -> str: ...
    @property
    def account_id(self) -> str | None: ...
    @property
    def contact(self) -> str | None: ...  # the email address or phone number it went to
    @property
    def channel(self) -> str: ...
    @property
    def survey_id(self) -> str: ...
    @property
    def trigger_id(self) -> str: ...
    @property
    def invited_at(self) -> datetime: ...  # when it is (or was) to be sent
    @property
    def delivered_at(self) -> datetime | None: ...
    @property
    def responded_at(self) -> datetime | None: ...
    @property
    def status(self) -> str: ...  # counted when one of COUNTED


@dataclass(frozen=True)
class Candidate:
    """An invitation the rules are about to allow, drop or defer."""

    customer_id: str
    account_id: str | None
    contact: str | None
    channel: Channel
    survey_id: str
    trigger_id: str
    send_at: datetime


@dataclass(frozen=True)
class Verdict:
    action: Literal["allow", "drop", "defer"]
    send_at: datetime | None = None  # allow/defer: when to send
    rule: str | None = None  # the rule that decided (drop/defer)
    next_eligible_at: datetime | None = None
    seen: dict[str, Any] = field(default_factory=dict)  # what the deciding rule counted
    deferring: tuple[str, ...] = ()  # defer: every rule that bit


def _key(rule: FatigueRule, c: Candidate | Touched) -> str | None:
    if rule.key == "customer":
        return c.customer_id
    if rule.key == "account":
        return c.account_id
    return c.contact


def _applies(rule: FatigueRule, candidate: Candidate) -> bool:
    return (rule.channel in ("any", candidate.channel)) and _key(rule, candidate) is not None


def _clock(rule: FatigueRule, touch: Touched) -> datetime | None:
    if touch.status not in COUNTED:
        return None
    if rule.clock == "invited":
        return touch.invited_at
    if rule.clock == "delivered":
        # A scheduled survey will be delivered at about its send time: count it from then, so a
        # limit holds before the delivery receipt arrives.
        return touch.delivered_at or (touch.invited_at if touch.status == "pending" else None)
    return touch.responded_at


def counted_times(
    rule: FatigueRule, candidate: Candidate, history: Iterable[Touched]
) -> list[datetime]:
    """The clock times of the history's surveys this rule counts for this candidate."""
    key = _key(rule, candidate)
    times = []
    for t in history:
        if _key(rule, t) != key or rule.channel not in ("any", t.channel):
            continue
        if rule.scope == "survey" and t.survey_id != candidate.survey_id:
            continue
        if rule.scope == "trigger" and t.trigger_id != candidate.trigger_id:
            continue
        at = _clock(rule, t)
        if at is not None:
            times.append(at)
    return sorted(times)


def _peak(times: Sequence[datetime], at: datetime, window: timedelta) -> int:
    """The most surveys in any window (t - window, t] that would also hold one at ``at``
    (``times`` sorted): the windows ending at ``at`` and at each survey in [at, at + window)."""
    ends = [at, *times[bisect_left(times, at) : bisect_left(times, at + window)]]
    return max(bisect_right(times, end) - bisect_right(times, end - window) for end in ends)


def bites(rule: FatigueRule, times: Sequence[datetime], at: datetime) -> bool:
    # The clock of a new survey starts at its send time for every clock: a survey counted on
    # delivery or answer cannot be delivered or answered before it is sent.
    return _peak(times, at, rule.window) + 1 > rule.limit


def _release_times(rule: FatigueRule, times: Sequence[datetime], after: datetime) -> list[datetime]:
    return [t + rule.window for t in times if t + rule.window > after]


def check(
    fatigue: Fatigue, candidate: Candidate, history: Sequence[Touched], *, ignore: bool = False
) -> Verdict:
    """Allow, drop or defer ``candidate`` given the customer's (and account's) history."""
    if ignore:
        return Verdict("allow", candidate.send_at)
    return _verdict(_counted(fatigue, candidate, history), candidate.send_at)


Counted = list[tuple[FatigueRule, list[datetime]]]


def _counted(fatigue: Fatigue, candidate: Candidate, history: Sequence[Touched]) -> Counted:
    """The rules that apply to ``candidate``, each with the times it counts (which do not
    depend on when the candidate is sent)."""
    return [
        (r, counted_times(r, candidate, history)) for r in fatigue.rules if _applies(r, candidate)
    ]


def _verdict(counted: Counted, at: datetime) -> Verdict:
    """``check`` of a send at ``at``, over the rules' counted times."""
    biting = [(r, times) for r, times in counted if bites(r, times, at)]
    if not biting:
        return Verdict("allow", at)
    first, first_times = biting[0]
    strictest = next(((r, times) for r, times in biting if r.action == "drop"), None)
    if strictest is not None:
        rule, times = strictest
        release = min(_release_times(rule, times, at), default=None)
        return Verdict("drop", None, rule.id, release, _seen(rule, times, at))
    # Defer to the first moment no rule bites: a window releases a survey at time + window.
    moments = sorted({m for r, times in counted for m in _release_times(r, times, at)})
    for moment in moments:
        if not any(bites(r, times, moment) for r, times in counted):
            seen = _seen(first, first_times, at)
            deferring = tuple(r.id for r, _ in biting)
            return Verdict("defer", moment, first.id, moment, seen, deferring)
    # unreachable with finite history; dropped to be safe
    return Verdict("drop", None, first.id, None, _seen(first, first_times, at))


def schedule(
    fatigue: Fatigue,
    candidate: Candidate,
    history: Sequence[Touched],
    zone: str | None,
    *,
    ignore: bool = False,
) -> Verdict:
    """When ``candidate`` may be sent. Fatigue rules and quiet hours (in ``zone``) each move the
    send only forward, so they take turns until both allow it. ``allow``: at the requested time or
    moved by quiet hours alone; ``defer``: moved by a rule (the last one that moved it is named);
    ``drop``: by a dropping rule, or by a deferring rule whose ``max_defer`` (default: its
    window) the rules' postponement would exceed (quiet hours' moves are not counted),
    ``next_eligible_at`` then being when it would have gone."""
    at, deferred, deferring = candidate.send_at, None, set[str]()
    postponed = timedelta(0)
    counted = [] if ignore else _counted(fatigue, candidate, history)
    for _ in range(16):
        at = allowed_from(fatigue, at, candidate.channel, zone)
        verdict = _verdict(counted, at)
        if verdict.action == "drop":
            return verdict
        if verdict.action == "allow":
            break
        assert verdict.send_at is not None
        postponed += verdict.send_at - at
        at, deferred = verdict.send_at, verdict
        deferring.update(verdict.deferring)
    if deferred is None:
        return Verdict("allow", at)
    exceeded = [(r, t) for r, t in counted if r.id in deferring and postponed > r.defer_limit]
    if exceeded:
        rule, times = min(exceeded, key=lambda pair: pair[0].defer_limit)
        seen = _seen(rule, times, candidate.send_at)
        return Verdict("drop", None, rule.id, at, {**seen, "max_defer": str(rule.defer_limit)})
    return replace(deferred, send_at=at, next_eligible_at=at)


def _seen(rule: FatigueRule, times: Sequence[datetime], at: datetime) -> dict[str, Any]:
    return {
        "rule": rule.id,
        "key": rule.key,
        "scope": rule.scope,
        "channel": rule.channel,
        "clock": rule.clock,
        "window": str(rule.window),
        "limit": rule.limit,
        "counted": _peak(times, at, rule.window),
    }


# -- suppression and quotas -----------------------------------------------------------------------


@dataclass(frozen=True)
class CustomerState:
    """What suppression looks at, loaded for the customer by the repository."""

    # (contact point, channel) pairs that opted out; a None contact means the whole customer.
    opted_out: frozenset[tuple[str | None, str]] = frozenset()
    open_cases: frozenset[str] = frozenset()
    last_unhappy_at: datetime | None = None


@dataclass(frozen=True)
class Suppressed:
    reason: str
    detail: dict[str, Any]
    next_eligible_at: datetime | None = None


def suppressed(
    suppression: Suppression,
    candidate: Candidate,
    state: CustomerState,
    *,
    case_id: str | None,
    email: str | None,
    now: datetime,
    ignore_fatigue: bool = False,
) -> Suppressed | None:
    """Why this candidate must not be surveyed at all, or None. Opt-outs and excluded domains
    hold even for surveys that ignore fatigue; open cases and the cool-down do not."""
    if (candidate.contact, candidate.channel) in state.opted_out or (
        None,
        candidate.channel,
    ) in state.opted_out:
        return Suppressed("opted_out", {"channel": candidate.channel})
    domain = email.rsplit("@", 1)[1].lower() if email and "@" in email else None
    for excluded in suppression.excluded_domains:
        if domain and (domain == excluded.lower() or domain.endswith("." + excluded.lower())):
            return Suppressed("excluded_domain", {"domain": excluded})
    if ignore_fatigue:
        return None
    if suppression.open_case is not None:
        others = sorted(state.open_cases - {case_id} if case_id else state.open_cases)
        if others:
            return Suppressed("open_case", {"open_cases": len(others)})
    cooldown = suppression.detractor_cooldown
    if cooldown and state.last_unhappy_at and now < state.last_unhappy_at + cooldown:
        until = state.last_unhappy_at + cooldown
        return Suppressed("detractor_cooldown", {"cooldown": str(cooldown)}, until)
    return None


def quota_period(
    at: datetime, per: Literal["day", "month"], timezone: str | None
) -> tuple[datetime, datetime]:
    """The calendar day or month holding ``at`` (in ``timezone``, else UTC), as UTC bounds."""
    zone = ZoneInfo(timezone) if timezone else ZoneInfo("UTC")
    local = at.astimezone(zone)
    if per == "day":
        start_day = local.date()
        end_day = start_day + timedelta(days=1)
    else:
        start_day = local.date().replace(day=1)
        end_day = (start_day + timedelta(days=32)).replace(day=1)
    return wall_time_at(start_day, clock_time(0), zone), wall_time_at(end_day, clock_time(0), zone)
