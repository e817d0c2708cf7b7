"""Quiet hours: the first instant a message may go out, in the recipient's local time.

Used by the trigger (when it schedules an invitation) and again by the dispatcher (at the moment
of sending, in case the program changed or a retry moved the send). Pure.

Quiet hours are in the recipient's time zone (from the event, else the customer's last known, else
the program default). When none is known the send must be outside quiet hours in every zone of
``unknown_timezone_zones``: an unknown zone never leads to a night-time send.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from datetime import time as clock_time
from zoneinfo import ZoneInfo

from services.common.program import Fatigue, QuietHours


def _quietwall_time_at(local: datetime, quiet: QuietHours) -> bool:
    if quiet.weekends and local.weekday() >= 5:
        return True
    now = local.time()
    if quiet.start <= quiet.end:
        return quiet.start <= now < quiet.end
    return now >= quiet.start or now < quiet.end  # the span crosses midnight


def _quiet_end(local: datetime, quiet: QuietHours, zone: ZoneInfo) -> datetime:
    """The first instant after ``local`` at which this quiet span is over (a UTC datetime)."""
    day = local.date()
    if quiet.weekends and local.weekday() >= 5:
        monday = day + timedelta(days=7 - local.weekday())
        return wall_time_at(monday, clock_time(0), zone)
    if quiet.start <= quiet.end or local.time() < quiet.end:
        return wall_time_at(day, quiet.end, zone)
    return wall_time_at(day + timedelta(days=1), quiet.end, zone)


def wall_time_at(day: date, wall: clock_time, zone: ZoneInfo) -> datetime:
    """``day`` at ``wall`` in ``zone``, as UTC. A wall time that happens twice (clocks go back)
    is its first occurrence; one that does not exist (clocks go forward) becomes the first
    instant whose wall clock is past it."""
    naive = datetime.combine(day, wall)
    first = min(naive.replace(tzinfo=zone, fold=f).astimezone(UTC) for f in (0, 1))
    instant = first
    while instant.astimezone(zone).replace(tzinfo=None) < naive:  # only in a gap: <= 3 h
        instant += timedelta(minutes=1)
    return instant


def allowed_from(fatigue: Fatigue, when: datetime, channel: str, timezone: str | None) -> datetime:
    """The first instant at or after ``when`` outside every quiet span for this channel, in the
    recipient's zone; with no zone known, outside every quiet span in every fallback zone."""
    spans = [q for q in fatigue.quiet_hours if q.channel in ("any", channel)]
    if not spans:
        return when
    zones = (
        [ZoneInfo(timezone)] if timezone else [ZoneInfo(z) for z in fatigue.unknown_timezone_zones]
    )
    at = when.astimezone(UTC)
    for _ in range(64):  # each step leaves one span; a week of spans is far fewer steps
        moved = False
        for zone in zones:
            local = at.astimezone(zone)
            for quiet in spans:
                if _quietwall_time_at(local, quiet):
                    at = max(at, _quiet_end(local, quiet, zone))
                    moved = True
        if not moved:
            return at
    raise ValueError("quiet hours leave no time to send: check the program's quiet_hours")


def quiet_now(fatigue: Fatigue, now: datetime, channel: str, timezone: str | None) -> bool:
    """Whether ``now`` falls inside quiet hours for this channel and zone."""
    return allowed_from(fatigue, now, channel, timezone) > now
