"""``kaiku simulate PROGRAM EVENTS.jsonl``: the trigger's decisions over an event log, with no
side effects, to tune a program before it goes live.

It runs the very handler the trigger's worker runs (rules, priority, coalescing, cancel_on,
suppression, fatigue limits, quiet hours, quotas, the decision ledger) against an in-memory SQLite
database, in batches of events in time order, with the clock set to the events' own times. Nothing
is published and nothing is sent; invitations are taken as delivered at their send time. Answers
and opt-outs are not in an event log, so cool-downs and opt-outs do not come into play.
"""

from __future__ import annotations

import gzip
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from services.common.config import DatabaseSettings
from services.common.db import create_engine, create_sessionmaker, create_tables, unit_of_work
from services.common.events import CloudEvent
from services.common.kafka import Incoming
from services.common.program import Program
from services.common.tokens import LinkKeys
from services.trigger import repository
from services.trigger.handlers import EventHandler
from services.trigger.models import Base, Decision, Invitation


def read_events(path: Path) -> Iterator[tuple[int, CloudEvent | str]]:
    """(line number, event or the reason it is invalid) for each line of a JSONL (or .gz) file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield number, CloudEvent.model_validate_json(line)
            except ValidationError as exc:
                first = exc.errors(include_input=False)[0]
                where = ".".join(str(p) for p in first["loc"]) or "(line)"
                yield number, f"{where}: {first['msg']}"


def _batches(events: list[CloudEvent], size: int, span: timedelta) -> Iterator[list[CloudEvent]]:
    """Consecutive events, at most ``size`` of them and at most ``span`` apart in time: the
    simulated clock of a batch is its last event's time."""
    batch: list[CloudEvent] = []
    for event in events:
        assert event.time is not None and (not batch or batch[0].time is not None)
        if batch and (len(batch) >= size or event.time - batch[0].time > span):  # type: ignore[operator]
            yield batch
            batch = []
        batch.append(event)
    if batch:
        yield batch


async def simulate(
    program: Program,
    path: Path,
    *,
    batch_size: int = 200,
    window: timedelta = timedelta(days=30),
    span: timedelta = timedelta(minutes=5),
) -> dict[str, Any]:
    valid: list[CloudEvent] = []
    invalid: list[str] = []
    for number, item in read_events(path):
        if isinstance(item, str):
            invalid.append(f"line {number}: {item}")
        else:
            valid.append(item)
    undated = [e for e in valid if e.time is None]
    events = sorted((e for e in valid if e.time is not None), key=lambda e: e.time)  # type: ignore[arg-type,return-value]

    engine = create_engine(DatabaseSettings(url="sqlite+aiosqlite://"))
    sessions = create_sessionmaker(engine)
    await create_tables(engine, Base.metadata, None)
    clock: list[datetime] = [datetime.min]
    handler = EventHandler(
        program, LinkKeys.parse("s:simulation-only-key-0123456789"), clock=lambda: clock[0]
    )
    try:
        for batch in _batches(events, batch_size, span):
            clock[0] = max(e.time for e in batch if e.time is not None)
            async with unit_of_work(sessions) as session:
                await handler([Incoming(None, e) for e in batch], session)
                # Invitations count as delivered when they are sent (for "delivered" clocks).
                await repository.deliver_due(session, clock[0])
        async with sessions() as session:
            decisions = await repository.all_decisions(session)
            invitations = await repository.live_invitations(session)
    finally:
        await engine.dispose()
    return _report(program, events, undated, invalid, decisions, invitations, window)


def _per_window(times_by_key: dict[str, list[datetime]], window: timedelta) -> dict[int, int]:
    """How many keys had at most N surveys in any rolling window: {N: keys}."""
    counts: Counter[int] = Counter()
    for times in times_by_key.values():
        times.sort()
        peak, first = 0, 0
        for last, at in enumerate(times):
            while times[first] <= at - window:
                first += 1
            peak = max(peak, last - first + 1)
        counts[peak] += 1
    return dict(sorted(counts.items()))


def _report(
    program: Program,
    events: list[CloudEvent],
    undated: list[CloudEvent],
    invalid: list[str],
    decisions: list[Decision],
    invitations: list[Invitation],
    window: timedelta,
) -> dict[str, Any]:
    by_survey: Counter[str] = Counter(f"{i.survey_id} ({i.channel})" for i in invitations)
    skips: Counter[str] = Counter(d.reason for d in decisions if d.decision == "skipped")
    outcomes: Counter[str] = Counter(d.decision for d in decisions)
    per_customer: dict[str, list[datetime]] = defaultdict(list)
    per_account: dict[str, list[datetime]] = defaultdict(list)
    for i in invitations:
        per_customer[i.customer_id].append(i.send_at)
        if i.account_id:
            per_account[i.account_id].append(i.send_at)
    zone = program.defaults.timezone
    hours: Counter[str] = Counter()
    for i in invitations:
        local = i.send_at.astimezone(ZoneInfo(zone)) if zone else i.send_at
        hours[local.strftime("%H:00")] += 1
    delays = [(i.send_at - i.created_at).total_seconds() / 3600 for i in invitations]
    customers = {e.customer_id for e in events}
    accounts = {e.data.customer.account_id for e in events if e.data.customer.account_id}
    return {
        "events": len(events),
        "skipped_lines": {
            "invalid": invalid[:20],
            "invalid_count": len(invalid),
            "without_time": len(undated),
        },
        "period": {
            "from": events[0].time.isoformat() if events and events[0].time else None,
            "to": events[-1].time.isoformat() if events and events[-1].time else None,
        },
        "customers": len(customers),
        "accounts": len(accounts),
        "decisions": dict(outcomes.most_common()),
        "invitations": len(invitations),
        "invitations_by_survey": dict(by_survey.most_common()),
        "skips_by_reason": dict(skips.most_common()),
        "window": _duration(window),
        "surveys_per_customer_per_window": _per_window(per_customer, window),
        "surveys_per_account_per_window": _per_window(per_account, window),
        "customers_never_surveyed": len(customers - per_customer.keys()),
        "busiest_hours": dict(hours.most_common(5)),
        "hours_of_day_timezone": zone or "UTC",
        "median_hours_from_event_to_send": round(statistics.median(delays), 2) if delays else None,
    }


def _duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def render(report: dict[str, Any]) -> str:
    lines = [
        f"events: {report['events']} from {report['period']['from']} to {report['period']['to']}"
        f" ({report['customers']} customers, {report['accounts']} accounts)",
    ]
    skipped = report["skipped_lines"]
    if skipped["invalid_count"] or skipped["without_time"]:
        lines.append(
            f"not simulated: {skipped['invalid_count']} invalid lines, "
            f"{skipped['without_time']} events without a time"
        )
        lines += [f"  {line}" for line in skipped["invalid"]]
    lines.append("decisions: " + ", ".join(f"{k} {v}" for k, v in report["decisions"].items()))
    lines.append(f"\ninvitations: {report['invitations']}")
    lines += [f"  {k:<40} {v:>7}" for k, v in report["invitations_by_survey"].items()]
    lines.append("\nskips by reason:")
    lines += [f"  {k:<40} {v:>7}" for k, v in report["skips_by_reason"].items()]
    for who in ("customer", "account"):
        lines.append(f"\nsurveys per {who} in any {report['window']} window: {who}s with that many")
        lines += [
            f"  {n:>3}: {count}" for n, count in report[f"surveys_per_{who}_per_window"].items()
        ]
    lines.append(f"  customers never surveyed: {report['customers_never_surveyed']}")
    lines.append(
        f"\nbusiest hours ({report['hours_of_day_timezone']}): "
        + ", ".join(f"{h} {n}" for h, n in report["busiest_hours"].items())
    )
    lines.append(f"median hours from event to send: {report['median_hours_from_event_to_send']}")
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str)
