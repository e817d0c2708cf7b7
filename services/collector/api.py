"""The collector's routes: the survey page and its answer, and the scores API."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.collector import repository, scoring
from services.collector.models import Invitation
from services.collector.pages import Pages, pick_locale
from services.common.db import unit_of_work
from services.common.events import Metric, utcnow
from services.common.http import ApiError, ErrorResponse, read_body
from services.common.logging import bound
from services.common.program import Program
from services.common.tokens import InvalidToken, LinkKeys

log = logging.getLogger(__name__)

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex, nofollow",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
}
MAX_FORM_BYTES = 64 * 1024


class ScoreOut(BaseModel):
    survey: str
    metric: Metric
    n: int
    value: float | None
    ci_low: float | None
    ci_high: float | None
    promoters: int | None = None
    passives: int | None = None
    detractors: int | None = None
    top_box: int | None = None
    low_n: bool
    target: float | None = None


def _page(html: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)


def router(
    *,
    program: Program,
    links: LinkKeys,
    pages: Pages,
    sessions: async_sessionmaker[AsyncSession],
    auth: Any,
    min_n: int,
    on_answer: Callable[[], None],
    clock: Callable[[], datetime] = utcnow,
) -> APIRouter:
    api = APIRouter()
    default_locale = program.defaults.locale

    def message(kind: str, status: int, locale: str | None = None) -> HTMLResponse:
        return _page(pages.message(locale=pick_locale(locale, default_locale), kind=kind), status)

    async def load(
        session: AsyncSession, token: str, *, unsubscribe: bool = False
    ) -> Invitation | HTMLResponse:
        try:
            links.verify(token)
        except InvalidToken:
            return message("not_found", 404)
        invitation = await repository.invitation_by_token(session, token)
        if invitation is None:
            return message("not_found", 404)
        if unsubscribe:  # unsubscribe links work for as long as the invitation is kept
            return invitation
        if invitation.expires_at <= clock() or invitation.cancelled_at is not None:
            return message("expired", 410, invitation.locale)
        if invitation.survey_id not in {s.id for s in program.surveys}:
            return message("not_found", 404, invitation.locale)
        return invitation

    @api.get("/s/{token}", response_class=HTMLResponse, summary="The survey page")
    async def survey_page(
        token: str,
        score: str | None = None,
        lang: str | None = None,
    ) -> Response:
        async with unit_of_work(sessions) as session:
            found = await load(session, token)
            if isinstance(found, HTMLResponse):
                return found
            previous = await repository.response_for(session, found.invitation_id)
        survey = program.survey(found.survey_id)
        low, high = survey.scale
        selected: int | None = previous.score if previous else None
        if score is not None and score.isdigit() and low <= int(score) <= high:
            selected = int(score)  # a score button in the email: shown selected, not recorded
        locale = pick_locale(lang or found.locale, default_locale)
        html = pages.survey(
            survey=survey,
            token=token,
            locale=locale,
            selected=selected,
            comment=(previous.comment or "") if previous else "",
            action_url=f"/s/{token}",
        )
        return _page(html)

    @api.post(
        "/s/{token}",
        response_class=HTMLResponse,
        summary="Answer the survey",
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "score": {"type": "integer"},
                                "comment": {"type": "string"},
                                "locale": {"type": "string"},
                            },
                        }
                    }
                }
            }
        },
    )
    async def answer(token: str, request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise ApiError(
                415, "unsupported_media_type", "post the form as application/x-www-form-urlencoded"
            )
        body = await read_body(request, MAX_FORM_BYTES)
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "bad_form", "the form could not be read") from None
        raw_score = (form.get("score") or [""])[0].strip()
        comment = (form.get("comment") or [""])[0].strip()[:5000] or None
        async with unit_of_work(sessions) as session:
            found = await load(session, token)
            if isinstance(found, HTMLResponse):
                return found
            survey = program.survey(found.survey_id)
            locale = pick_locale((form.get("locale") or [found.locale])[0], default_locale)
            low, high = survey.scale
            score: int | None = None
            if raw_score:
                if not raw_score.isdigit() or not low <= int(raw_score) <= high:
                    html = pages.survey(
                        survey=survey,
                        token=token,
                        locale=locale,
                        selected=None,
                        comment=comment or "",
                        error="score",
                        action_url=f"/s/{token}",
                    )
                    return _page(html, 422)
                score = int(raw_score)
            elif comment is None:
                html = pages.survey(
                    survey=survey,
                    token=token,
                    locale=locale,
                    selected=None,
                    comment="",
                    error="empty",
                    action_url=f"/s/{token}",
                )
                return _page(html, 422)
            with bound(invitation_id=str(found.invitation_id), customer_id=found.customer_id):
                saved = await repository.save_response(
                    session, found, score=score, comment=comment, now=clock()
                )
                log.info("answer stored (revision %d)", saved.revision)
        on_answer()
        return RedirectResponse(
            f"/s/{token}/thanks?lang={locale}", status_code=303, headers=PAGE_HEADERS
        )

    @api.get("/s/{token}/thanks", response_class=HTMLResponse, summary="The thank-you page")
    async def thanks(token: str, lang: str | None = None) -> Response:
        async with unit_of_work(sessions) as session:
            found = await load(session, token)
            if isinstance(found, HTMLResponse):
                return found
            previous = await repository.response_for(session, found.invitation_id)
        survey = program.survey(found.survey_id)
        locale = pick_locale(lang or found.locale, default_locale)
        return _page(
            pages.thanks(
                survey=survey,
                token=token,
                locale=locale,
                score=previous.score if previous else None,
            )
        )

    @api.get("/u/{token}", response_class=HTMLResponse, summary="The unsubscribe page")
    async def unsubscribe_page(token: str, lang: str | None = None) -> Response:
        async with unit_of_work(sessions) as session:
            found = await load(session, token, unsubscribe=True)
            if isinstance(found, HTMLResponse):
                return found
            done = await repository.has_optout(session, found.invitation_id)
        locale = pick_locale(lang or found.locale, default_locale)
        return _page(pages.unsubscribe(token=token, locale=locale, done=done))

    @api.post(
        "/u/{token}",
        response_class=HTMLResponse,
        summary="Unsubscribe (the page's button, or a mail client's RFC 8058 one-click POST)",
    )
    async def unsubscribe(token: str, request: Request) -> Response:
        body = await read_body(request, MAX_FORM_BYTES)
        one_click = b"List-Unsubscribe=One-Click" in body
        async with unit_of_work(sessions) as session:
            found = await load(session, token, unsubscribe=True)
            if isinstance(found, HTMLResponse):
                return found
            with bound(invitation_id=str(found.invitation_id), customer_id=found.customer_id):
                await repository.record_optout(
                    session,
                    found,
                    source="one_click" if one_click else "unsubscribe_page",
                    now=clock(),
                )
                log.info("opt-out recorded (%s)", "one-click" if one_click else "page")
        on_answer()
        try:
            form = parse_qs(body.decode("utf-8"), max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            form = {}
        locale = pick_locale((form.get("locale") or [found.locale])[0], default_locale)
        return _page(pages.unsubscribe(token=token, locale=locale, done=True))

    @api.get(
        "/v1/scores",
        response_model=ScoreOut,
        dependencies=[Depends(auth)],
        responses={
            401: {"model": ErrorResponse},
            404: {"model": ErrorResponse},
            422: {"model": ErrorResponse},
        },
        summary="The score of a survey",
    )
    async def scores(
        survey: str = Query(description="Survey id from the program"),
        from_: datetime | None = Query(default=None, alias="from"),
        to: datetime | None = None,
    ) -> ScoreOut:
        try:
            definition = program.survey(survey)
        except KeyError:
            raise ApiError(
                404, "unknown_survey", f"no survey {survey!r} in the program", "survey"
            ) from None
        for name, value in (("from", from_), ("to", to)):
            if value is not None and value.tzinfo is None:
                raise ApiError(422, "invalid", "give a time zone (e.g. 2026-11-01T00:00:00Z)", name)
        async with unit_of_work(sessions) as session:
            hist = await repository.score_histogram(session, survey, from_, to)
        result = scoring.score(definition.metric, hist)
        counts: dict[str, int | None] = (
            {
                "promoters": result.promoters,
                "passives": result.passives,
                "detractors": result.detractors,
            }
            if definition.metric == "nps"
            else {"top_box": result.top_box}
        )
        return ScoreOut(
            survey=survey,
            metric=definition.metric,
            n=result.n,
            value=None if result.value is None else round(result.value, 2),
            ci_low=None if result.ci_low is None else round(result.ci_low, 2),
            ci_high=None if result.ci_high is None else round(result.ci_high, 2),
            low_n=result.n < min_n,
            target=definition.target,
            **counts,
        )

    return api
