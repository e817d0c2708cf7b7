"""The answers themselves: ``GET /v1/responses`` (filtered, newest first, cursor-paged),
``GET /v1/responses.csv`` (the same filters, streamed) and ``PATCH /v1/responses/{id}`` (the
follow-up of an answer: open, contacted, resolved, with a note).

The cursor is opaque (``cursors.py``): the position of the last answer of the page
(submitted_at, response_id), bound to the filters it was made for and signed.
"""

from __future__ import annotations

import csv
import io
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.collector import alerts, repository
from services.collector.cursors import Cursors
from services.collector.models import Response
from services.collector.repository import ResponseQuery
from services.common.db import unit_of_work
from services.common.events import Metric, utcnow
from services.common.http import ApiError, error_responses, field_path, read_body

log = logging.getLogger(__name__)

FollowupStatus = Literal["open", "contacted", "resolved"]
MAX_LIMIT = 500
CSV_BATCH = 1000
MAX_PATCH_BYTES = 64 * 1024
# Cells a spreadsheet would read as a formula (OWASP "CSV injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
CSV_COLUMNS = (
    "response_id",
    "invitation_id",
    "customer_id",
    "survey",
    "metric",
    "score",
    "comment",
    "locale",
    "submitted_at",
    "revision",
    "touchpoint",
    "channel",
    "team",
    "agent",
    "account_id",
    "case_id",
    "suspected_bot",
    "bot_reason",
    "followup_status",
    "followup_note",
    "alerted_at",
    "alert_rules",
    "contacted_at",
    "resolved_at",
)


class Segments(BaseModel):
    touchpoint: str | None
    channel: str | None
    team: str | None
    agent: str | None
    account_id: str | None
    case_id: str | None


class Followup(BaseModel):
    status: FollowupStatus | None
    note: str | None
    alerted_at: datetime | None
    alert_rules: list[str]
    contacted_at: datetime | None
    resolved_at: datetime | None
    updated_at: datetime | None


class ResponseOut(BaseModel):
    response_id: uuid.UUID
    invitation_id: uuid.UUID
    customer_id: str | None = Field(description="None once the customer has been erased")
    survey: str
    metric: Metric
    score: int | None
    comment: str | None
    locale: str
    submitted_at: datetime
    revision: int
    segments: Segments
    suspected_bot: bool
    bot_reason: str | None
    followup: Followup


class ResponsePage(BaseModel):
    items: list[ResponseOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; None: done")


class FollowupIn(BaseModel):
    """A change of an answer's follow-up; a field left out stays as it is."""

    model_config = ConfigDict(extra="forbid")

    status: FollowupStatus | None = None
    note: str | None = Field(default=None, max_length=5000)


def item(r: Response) -> ResponseOut:
    erased = r.erased_at is not None
    return ResponseOut(
        response_id=r.response_id,
        invitation_id=r.invitation_id,
        customer_id=None if erased else r.customer_id,
        survey=r.survey_id,
        metric=r.metric,
        score=r.score,
        comment=None if erased else r.comment,
        locale=r.locale,
        submitted_at=r.submitted_at,
        revision=r.revision,
        segments=Segments(**{f: getattr(r, f) for f in repository.CONTEXT_FIELDS}),
        suspected_bot=r.suspected_bot,
        bot_reason=r.bot_reason,
        followup=Followup(
            status=r.followup_status,
            note=r.followup_note,
            alerted_at=r.alerted_at,
            alert_rules=alerts.split_rules(r.alert_rules),
            contacted_at=r.contacted_at,
            resolved_at=r.resolved_at,
            updated_at=r.followup_updated_at,
        ),
    )


def safe_cell(value: object) -> str:
    """A CSV cell a spreadsheet shows as text: one that would start a formula gets a ``'``."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    text = str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def csv_row(r: Response) -> list[str]:
    out = item(r)
    values: dict[str, object] = {
        **out.model_dump(exclude={"segments", "followup"}),
        **out.segments.model_dump(),
        "followup_status": out.followup.status,
        "followup_note": out.followup.note,
        "alerted_at": out.followup.alerted_at,
        "alert_rules": ",".join(out.followup.alert_rules),
        "contacted_at": out.followup.contacted_at,
        "resolved_at": out.followup.resolved_at,
    }
    return [safe_cell(values[c]) for c in CSV_COLUMNS]


def _last(r: Response) -> list[str]:
    """A page's position for its cursor: (submitted_at, response_id) of its last answer."""
    return [r.submitted_at.isoformat(), r.response_id.hex]


def _position(values: list[Any]) -> tuple[datetime, uuid.UUID]:
    at, response_id = values
    return datetime.fromisoformat(at), uuid.UUID(hex=response_id)


def _aware(value: datetime | None, name: str) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ApiError(422, "invalid", "give a time zone (e.g. 2026-11-01T00:00:00Z)", name)
    return value


def response_query(
    survey: str | None = Query(default=None, max_length=100, description="Survey id"),
    metric: Metric | None = None,
    from_: datetime | None = Query(
        default=None, alias="from", description="Submitted at or after (with a time zone)"
    ),
    to: datetime | None = Query(default=None, description="Submitted before (with a time zone)"),
    score_min: int | None = Query(default=None, ge=0, le=10),
    score_max: int | None = Query(default=None, ge=0, le=10),
    status: FollowupStatus | None = Query(default=None, description="Follow-up status"),
    alerted: bool | None = Query(default=None, description="An alert rule matched (or not)"),
    suspected_bot: Literal["exclude", "include", "only"] = Query(
        default="exclude", description="Answers that look automated: left out by default"
    ),
    has_comment: bool | None = None,
    touchpoint: str | None = Query(default=None, max_length=200),
    channel: str | None = Query(default=None, max_length=200),
    team: str | None = Query(default=None, max_length=200),
    agent: str | None = Query(default=None, max_length=200),
    account: str | None = Query(default=None, max_length=200, description="Account id"),
) -> ResponseQuery:
    since, until = _aware(from_, "from"), _aware(to, "to")
    if since is not None and until is not None and since >= until:
        raise ApiError(422, "invalid", "'to' must be later than 'from'", "to")
    if score_min is not None and score_max is not None and score_min > score_max:
        raise ApiError(422, "invalid", "score_max is below score_min", "score_max")
    segments = {
        "touchpoint": touchpoint,
        "channel": channel,
        "team": team,
        "agent": agent,
        "account_id": account,
    }
    return ResponseQuery(
        survey_id=survey,
        metric=metric,
        since=since,
        until=until,
        score_min=score_min,
        score_max=score_max,
        followup_status=status,
        alerted=alerted,
        bots=suspected_bot,
        has_comment=has_comment,
        segments=tuple((k, v) for k, v in segments.items() if v is not None),
    )


PATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": FollowupIn.model_json_schema()}},
    }
}


def router(
    *,
    sessions: async_sessionmaker[AsyncSession],
    auth: Any,
    cursor_key: bytes,
    clock: Callable[[], datetime] = utcnow,
) -> APIRouter:
    api = APIRouter(dependencies=[Depends(auth)])
    cursors = Cursors(cursor_key)
    errors = error_responses({401: "No or a wrong bearer token", 422: "A bad parameter"})

    @api.get(
        "/v1/responses",
        response_model=ResponsePage,
        responses=errors,
        summary="Answers, newest first, filtered and paged",
    )
    async def list_responses(
        query: ResponseQuery = Depends(response_query),
        cursor: str | None = Query(default=None, max_length=500),
        limit: int = Query(default=100, ge=1, le=MAX_LIMIT),
    ) -> ResponsePage:
        after = cursors.read(repr(query), cursor, _position) if cursor else None
        async with unit_of_work(sessions) as session:
            rows = await repository.find_responses(session, query, after=after, limit=limit + 1)
        page = rows[:limit]
        more = len(rows) > limit
        return ResponsePage(
            items=[item(r) for r in page],
            next_cursor=cursors.make(repr(query), _last(page[-1])) if more else None,
        )

    @api.get(
        "/v1/responses.csv",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/csv": {}}}, **errors},
        summary="Every answer the filters select, as CSV (UTF-8, a header row)",
    )
    async def export_csv(query: ResponseQuery = Depends(response_query)) -> StreamingResponse:
        async def lines() -> AsyncIterator[bytes]:
            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(CSV_COLUMNS)
            yield buf.getvalue().encode()
            after: tuple[datetime, uuid.UUID] | None = None
            while True:
                async with unit_of_work(sessions) as session:
                    batch = await repository.find_responses(
                        session, query, after=after, limit=CSV_BATCH
                    )
                buf.seek(0)
                buf.truncate()
                writer.writerows(csv_row(r) for r in batch)
                if batch:
                    yield buf.getvalue().encode()
                if len(batch) < CSV_BATCH:
                    return
                after = (batch[-1].submitted_at, batch[-1].response_id)

        stamp = clock().strftime("%Y%m%dT%H%M%SZ")
        return StreamingResponse(
            lines(),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": f'attachment; filename="kaiku-responses-{stamp}.csv"',
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @api.patch(
        "/v1/responses/{response_id}",
        response_model=ResponseOut,
        responses=error_responses(
            {
                401: "No or a wrong bearer token",
                404: "No such answer",
                413: "The body is too large",
                415: "The body is not JSON",
                422: "A bad field",
            }
        ),
        summary="Record the follow-up of an answer: status (open, contacted, resolved), note",
        openapi_extra=PATCH_BODY,
    )
    async def update_followup(response_id: uuid.UUID, request: Request) -> ResponseOut:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, "unsupported_media_type", "send the change as application/json")
        body = await read_body(request, MAX_PATCH_BYTES)
        try:
            change = FollowupIn.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            raise ApiError(422, "invalid", first["msg"], field_path(first["loc"])) from None
        if not change.model_fields_set:
            raise ApiError(422, "invalid", "give a status, a note or both", "status")
        async with unit_of_work(sessions) as session:
            found = await repository.response_by_id(session, response_id, for_update=True)
            if found is None:
                raise ApiError(404, "not_found", f"no answer {response_id}", "response_id")
            now = clock()
            status = change.status
            if status is not None:
                await repository.set_followup_status(session, found, status, now)
            if "note" in change.model_fields_set:
                found.followup_note = change.note
            found.followup_updated_at = now
            log.info("follow-up of answer %s: %s", response_id, found.followup_status)
            return item(found)

    return api
