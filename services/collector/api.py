"""The collector's JSON API: scores (docs/scores.md).

``GET /v1/scores`` reads pre-aggregated counts only (sums grouped in SQL), never the answers
one by one: the roll-ups of a grouping set when one covers its segments, the full cells
otherwise (``repository.rollup_set``); the close-the-loop figures come from the same counts
and, for the median wait, from ``collector_contact_waits``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import date, datetime, timedelta
from typing import Any, Literal, NamedTuple
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.collector import repository, scoring
from services.collector.cursors import MAX_CURSOR, Cursors
from services.collector.repository import CellGroup, CellQuery, CellSums, KeyRange, floor, step
from services.common.db import unit_of_work
from services.common.events import Metric
from services.common.http import ApiError, error_responses
from services.common.program import Program, Survey

Period = Literal["none", "day", "week", "month"]
# The group_by names of the API and their columns.
GROUPS = {
    "touchpoint": "touchpoint",
    "channel": "channel",
    "team": "team",
    "agent": "agent",
    "account": "account_id",
}
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# Rows of a page: by default enough for a year by month of every agent, or of every team and
# agent; an account report is paged (a page is scored, serialized and sent while the next is
# asked for: tens of thousands of rows at once would take seconds and tens of megabytes).
DEFAULT_LIMIT = 5000
MAX_LIMIT = 50000


class ScoreRow(BaseModel):
    survey: str
    metric: Metric
    target: float | None = Field(description="The survey's target from the program")
    period_start: date | None = Field(
        description="First day of the row's day, ISO week (Monday) or month; null for period=none"
    )
    group: dict[str, str | None] = Field(
        description="The value of each group_by segment (null: the answers did not carry it)"
    )
    n: int = Field(description="Counted answers: with a score, not suspected bots")
    value: float | None = Field(description="NPS −100…100, CSAT % 0…100, CES mean 1…7")
    ci_low: float | None = Field(description="95% confidence interval")
    ci_high: float | None
    promoters: int | None = None
    passives: int | None = None
    detractors: int | None = None
    top_box: int | None = Field(default=None, description="CSAT 4–5, CES 5–7")
    previous: float | None = Field(
        description="The value of the previous period of the same length, same group"
    )
    change: float | None = Field(description="value − previous, in the score's own unit")
    p_value: float | None = Field(description="Two-sided p-value of the change")
    low_n: bool = Field(description="n is below KAIKU_COLLECTOR_MIN_N")
    responses: int = Field(description="Answers by persons, skipped scores included")
    delivered: int = Field(description="Invitations delivered (by the day of delivery)")
    response_rate: float | None = Field(description="responses / delivered; null if none")
    suspected_bots: int = Field(description="Answers kept apart as suspected bots")
    alerts: int = Field(description="Answers that raised a close-the-loop alert")
    loop_closure_rate: float | None = Field(description="Share of alerts with contacted_at")
    median_minutes_to_contact: float | None = Field(
        description="Median minutes from alerted_at to contacted_at of the contacted alerts"
    )


class ScoresOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    time_zone: str = Field(description="The reporting time zone of the days")
    from_: date | None = Field(
        alias="from", description="First day counted (inclusive), widened to a period start"
    )
    to: date | None = Field(description="First day not counted (exclusive)")
    period: Period
    group_by: list[str]
    min_n: int
    rows: list[ScoreRow]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= (same other parameters) for the next page; null: done"
    )


def _day(value: str | None, name: str, zone: ZoneInfo) -> date | None:
    if value is None or value == "":
        return None
    try:
        if not DATE.fullmatch(value):
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise ApiError(
            422,
            "invalid",
            f"{name} must be a date YYYY-MM-DD (a day in the reporting time zone, {zone.key})",
            name,
        ) from None


def _split(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for value in values or ():
        for part in value.split(","):
            if part.strip() and part.strip() not in out:
                out.append(part.strip())
    return out


def _earlier(group: CellGroup, period: str) -> CellGroup:
    """The same group a period earlier (itself for ``none``: its earlier read is of other
    days)."""
    survey, start, segments = group
    return group if start is None else (survey, step(start, period, back=True), segments)


def _span(groups: Sequence[CellGroup], period: str) -> tuple[date, date]:
    """The days of the periods of ``groups`` (of a period other than ``none``): from the first
    one's start to the end of the last."""
    starts = [start for _, start, _ in groups if start is not None]
    return min(starts), step(max(starts), period)


def _surveys(program: Program, ids: list[str], metric: str | None) -> list[Survey]:
    if not ids:
        chosen = [s for s in program.surveys if metric is None or s.metric == metric]
        if not chosen:
            raise ApiError(422, "invalid", f"no survey in the program measures {metric}", "metric")
        return chosen
    chosen = []
    for survey_id in ids:
        try:
            chosen.append(program.survey(survey_id))
        except KeyError:
            raise ApiError(
                404, "unknown_survey", f"no survey {survey_id!r} in the program", "survey"
            ) from None
    if metric is not None and any(s.metric != metric for s in chosen):
        raise ApiError(422, "invalid", f"not every survey given measures {metric}", "metric")
    return chosen


EMPTY = CellSums({}, 0, 0, 0, 0, 0)


def _minutes(microseconds: int) -> float:
    """As ``(contacted_at − alerted_at).total_seconds() / 60`` computes it."""
    return microseconds / 10**6 / 60


class _Read:
    """What the cells say about each group of one read (its counts as read, made a
    ``CellSums`` only for the groups a page shows or compares with), and each group's score
    (computed once, also when the group is the previous period of another)."""

    def __init__(self) -> None:
        self.counts: dict[CellGroup, repository.ReadCounts] = {}
        self.medians: dict[CellGroup, float] = {}
        self._scores: dict[CellGroup, scoring.Score] = {}

    def sums(self, group: CellGroup) -> CellSums:
        counts = self.counts.get(group)
        return EMPTY if counts is None else repository.sums(counts)

    def score(self, metric: str, group: CellGroup, sums: CellSums) -> scoring.Score:
        found = self._scores.get(group)
        if found is None:
            found = self._scores[group] = scoring.score(metric, sums.hist)
        return found


async def _read(
    session: AsyncSession, q: CellQuery, r: KeyRange = repository.EVERY, *, waits: bool = True
) -> _Read:
    """The groups of ``q`` in ``r``, in order, and (``waits``) their median waits."""
    read = _Read()
    read.counts = dict(await repository.cell_counts(session, q, r))
    if waits and read.counts:
        first, last = next(iter(read.counts)), next(reversed(read.counts))
        if q.period != "none":  # the days of the page's periods only
            since, until = _span(list(read.counts), q.period)
            q = replace(q, since=since, until=until)
        for group, found in await repository.contact_waits(session, q, KeyRange(first, True, last)):
            # The exact median: the mean of the two middle waits (one when the count is odd).
            read.medians[group] = (_minutes(found.lower_us) + _minutes(found.upper_us)) / 2
    return read


def _row(
    survey: Survey,
    labels: dict[str, str | None],
    group: CellGroup,
    current: _Read,
    before: CellGroup,
    previous: _Read,
    min_n: int,
) -> dict[str, Any]:
    """One row as ``ScoreRow``'s fields, in order; ``labels`` its ``group`` (the segment values
    by name)."""
    metric = survey.metric
    sums = current.sums(group)
    result = current.score(metric, group, sums)
    earlier = previous.sums(before)
    then = previous.score(metric, before, earlier)
    moved = scoring.compare(metric, result, then, sums.hist, earlier.hist)
    responses = sums.skipped + sum(sums.hist.values())
    nps = metric == "nps"
    return {
        "survey": survey.id,
        "metric": metric,
        "target": survey.target,
        "period_start": group[1],
        "group": labels,
        "n": result.n,
        "value": result.value,
        "ci_low": result.ci_low,
        "ci_high": result.ci_high,
        "promoters": result.promoters if nps else None,
        "passives": result.passives if nps else None,
        "detractors": result.detractors if nps else None,
        "top_box": None if nps else result.top_box,
        "previous": moved.previous,
        "change": moved.change,
        "p_value": moved.p_value,
        "low_n": result.n < min_n,
        "responses": responses,
        "delivered": sums.delivered,
        "response_rate": responses / sums.delivered if sums.delivered else None,
        "suspected_bots": sums.bots,
        "alerts": sums.alerted,
        "loop_closure_rate": sums.contacted / sums.alerted if sums.alerted else None,
        "median_minutes_to_contact": current.medians.get(group),
    }


def widen(since: date | None, until: date | None, period: str) -> tuple[date | None, date | None]:
    """With a period, ``from`` and ``to`` are widened to whole periods (every row then covers
    a whole day, week or month, and so does the previous one it is compared with)."""
    if period == "none":
        return since, until
    if since is not None:
        since = floor(since, period)
    if until is not None and floor(until, period) != until:
        until = step(floor(until, period), period)
    return since, until


async def score_rows(
    session: AsyncSession,
    program: Program,
    surveys: Sequence[Survey],
    since: date | None,
    until: date | None,
    period: str,
    group_by: Sequence[str],
    zone: ZoneInfo,
    min_n: int,
) -> list[ScoreRow]:
    """Every row of ``GET /v1/scores`` as models (what the dashboard shows): see
    ``score_row_dicts``."""
    rows, _ = await score_row_dicts(
        session, program, surveys, since, until, period, group_by, zone, min_n
    )
    return [ScoreRow(**row) for row in rows]


class Page(NamedTuple):
    """The reads of a page of ``GET /v1/scores``: its groups in order, the group to continue
    after (None: the last page), and what the cells say of them and of the same groups a period
    earlier."""

    groups: list[CellGroup]
    last: CellGroup | None
    current: _Read
    previous: _Read


async def read_page(
    session: AsyncSession,
    surveys: Sequence[Survey],
    q: CellQuery,
    zone: ZoneInfo,
    after: CellGroup | None,
    limit: int | None,
) -> Page:
    """The groups of ``q`` after ``after``, at most ``limit`` (None: all), with their counts and
    waits, and the same groups' counts a period earlier (for ``none``: over as many days just
    before ``q.since``)."""
    await repository.plan_for_reports(session)
    last = None
    if q.period == "none" and not q.segments:
        # A row per survey, also for a survey without answers: all of them, paged here.
        current = await _read(session, q)
        groups = sorted({*current.counts, *((s.id, None, ()) for s in surveys)})
        groups = [g for g in groups if after is None or g > after]
    else:
        page = KeyRange(after, limit=None if limit is None else limit + 1)
        current = await _read(session, q, page)
        groups = list(current.counts)
    if limit is not None and len(groups) > limit:
        groups = groups[:limit]
        last = groups[-1]
    previous = _Read()
    if groups and q.period == "none" and q.since is not None:
        # The same groups over the days just before, as many.
        end = q.until or datetime.now(zone).date() + timedelta(days=1)
        before = CellQuery(q.surveys, q.since - (end - q.since), q.since, "none", q.segments)
        previous = await _read(session, before, KeyRange(groups[0], True, groups[-1]), waits=False)
    elif groups and q.period != "none":
        # The same groups a period earlier: the range of the page, a period back.
        since, until = _span(groups, q.period)
        before = CellQuery(
            q.surveys,
            step(since, q.period, back=True),
            step(until, q.period, back=True),
            q.period,
            q.segments,
        )
        r = KeyRange(_earlier(groups[0], q.period), True, _earlier(groups[-1], q.period))
        previous = await _read(session, before, r, waits=False)
    return Page(groups, last, current, previous)


async def score_row_dicts(
    session: AsyncSession,
    program: Program,
    surveys: Sequence[Survey],
    since: date | None,
    until: date | None,
    period: str,
    group_by: Sequence[str],
    zone: ZoneInfo,
    min_n: int,
    *,
    after: CellGroup | None = None,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], CellGroup | None]:
    """The rows of ``GET /v1/scores``: ``surveys`` over days ``since <= day < until`` (widened
    to whole periods), by ``period`` and the ``group_by`` names of ``GROUPS``, each compared
    with the previous period of the same length and group; in the order of their groups
    (survey, period start, segment values in the order of ``repository.SEGMENTS``), those
    after the group ``after``, at most ``limit`` of them; and the group of the last row when
    more follow (else None). Plain dicts in the shape of ``ScoreRow`` (a page can be
    thousands: the API serializes them as they are, without building and validating a model
    per row)."""
    since, until = widen(since, until, period)
    names = list(group_by)
    # The segments in the order of the roll-ups' key (the order of the rows).
    segments = tuple(c for c in repository.SEGMENTS if c in {GROUPS[n] for n in names})
    q = CellQuery(tuple(s.id for s in surveys), since, until, period, segments)
    page = await read_page(session, surveys, q, zone, after, limit)
    by_id = {s.id: s for s in surveys}
    # Each segment-value combination's "group" object, made once (an account has a row a month).
    labels: dict[tuple[str, ...], dict[str, str | None]] = {}
    places = [segments.index(GROUPS[name]) for name in names]  # each name's value in a group
    rows = []
    for group in page.groups:
        survey = by_id[group[0]]
        label = labels.get(group[2])
        if label is None:
            values = group[2]
            label = labels[group[2]] = {
                name: values[i] or None for name, i in zip(names, places, strict=True)
            }
        before = _earlier(group, period)
        rows.append(_row(survey, label, group, page.current, before, page.previous, min_n))
    return rows, page.last


def _scope(
    surveys: Sequence[Survey], since: date | None, until: date | None, period: str, names: list[str]
) -> str:
    """What a scores cursor is bound to: the request but for its page size."""
    return repr(("scores", [s.id for s in surveys], since, until, period, names))


def _position(values: list[Any]) -> CellGroup:
    """The group a scores cursor continues after, from its JSON (``_last``)."""
    survey, start, segments = values
    if not isinstance(survey, str) or not all(isinstance(v, str) for v in segments):
        raise TypeError("not a group")
    return (survey, None if start is None else date.fromisoformat(start), tuple(segments))


def _last(group: CellGroup) -> list[Any]:
    return [group[0], None if group[1] is None else group[1].isoformat(), list(group[2])]


def router(
    *,
    program: Program,
    sessions: async_sessionmaker[AsyncSession],
    auth: Any,
    min_n: int,
    cursor_key: bytes,
    zone: ZoneInfo | None = None,
) -> APIRouter:
    api = APIRouter()
    tz = zone or ZoneInfo("UTC")
    cursors = Cursors(cursor_key)

    @api.get(
        "/v1/scores",
        response_model=ScoresOut,
        response_model_by_alias=True,
        dependencies=[Depends(auth)],
        responses=error_responses(
            {
                401: "No or a wrong bearer token",
                404: "A survey not in the program",
                422: "A parameter is invalid (``field`` names it)",
            }
        ),
        summary="Scores by survey, period and segment",
        description=(
            "NPS, CSAT or CES with n, a 95% interval and the change from the previous period "
            "(two-sided p-value), response rate, suspected bots and close-the-loop figures. "
            "Days are in the reporting time zone; ``from`` is inclusive, ``to`` exclusive. "
            "With a period, both are widened to whole periods. Rows come in pages of "
            "``limit`` (by survey, period start and segment values); ``next_cursor`` asks for "
            "the next. See docs/scores.md."
        ),
    )
    async def scores(
        survey: list[str] | None = Query(
            default=None,
            description="Survey ids (repeat or comma-separate); all surveys when left out",
        ),
        metric: Metric | None = Query(
            default=None, description="Only the surveys of this metric (when no survey is given)"
        ),
        from_: str | None = Query(
            default=None, alias="from", description="First day (YYYY-MM-DD), inclusive"
        ),
        to: str | None = Query(default=None, description="End day (YYYY-MM-DD), exclusive"),
        period: Period = Query(default="none", description="none, day, week (ISO) or month"),
        group_by: list[str] | None = Query(
            default=None,
            description="touchpoint, channel, team, agent, account (repeat or comma-separate)",
        ),
        limit: int = Query(
            default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="Rows of a page at most"
        ),
        cursor: str | None = Query(
            default=None,
            max_length=MAX_CURSOR,
            description="next_cursor of the previous page (with the same other parameters)",
        ),
    ) -> Response:
        surveys = _surveys(program, _split(survey), metric)
        names = _split(group_by)
        for name in names:
            if name not in GROUPS:
                raise ApiError(
                    422,
                    "invalid",
                    f"cannot group by {name!r}; choose from {', '.join(GROUPS)}",
                    "group_by",
                )
        since, until = _day(from_, "from", tz), _day(to, "to", tz)
        if since is not None and until is not None and since >= until:
            raise ApiError(422, "invalid", "to must be after from (to is exclusive)", "to")
        since, until = widen(since, until, period)
        scope = _scope(surveys, since, until, period, names)
        after = cursors.read(scope, cursor, _position) if cursor else None
        async with unit_of_work(sessions) as session:
            rows, last = await score_row_dicts(
                session,
                program,
                surveys,
                since,
                until,
                period,
                names,
                tz,
                min_n,
                after=after,
                limit=limit,
            )
        # ScoresOut's fields, serialized as they are (by pydantic-core): tens of thousands of
        # rows would otherwise each be built, validated and turned into a dict first.
        out = {
            "time_zone": tz.key,
            "from": since,
            "to": until,
            "period": period,
            "group_by": names,
            "min_n": min_n,
            "rows": rows,
            "next_cursor": None if last is None else cursors.make(scope, _last(last)),
        }
        return Response(content=to_json(out), media_type="application/json")

    return api
