"""The routes behind the links in an invitation: the survey page and its answer, the thank-you
page, the hidden trap link, and the unsubscribe page (with RFC 8058 one-click).

Link scanners (Microsoft Safe Links and others) open every link, may run JavaScript and submit
forms, so: a GET never records an answer (a score button only pre-selects the score), every
request is noted in ``collector_hits``, and a POST that looks automated is stored as a suspected
bot (``bots.judge``): excluded from scores, counted apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, quote
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.collector import alerting, bots, repository
from services.collector.config import CollectorSettings, local_day
from services.collector.models import Invitation
from services.collector.pages import Pages, pick_locale
from services.common.db import unit_of_work
from services.common.events import utcnow
from services.common.http import ApiError, read_body
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
RESPONSES = Counter(
    "kaiku_responses_total",
    "Answers stored, by metric, kind (person or suspected_bot) and answer (new, or changed by "
    "a later submission)",
    ["metric", "kind", "answer"],
)
FORM_BODY = {
    "requestBody": {
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "score": {"type": "integer", "minimum": 0, "maximum": 10},
                        "comment": {"type": "string"},
                        "locale": {"type": "string"},
                    },
                }
            }
        }
    }
}


def documented(
    pages: dict[int, str], errors: dict[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of a link route: the pages it answers with (a damaged, unknown or
    expired link), and its JSON errors (``ErrorResponse``)."""
    out: dict[int | str, dict[str, Any]] = {
        code: {"description": text, "content": {"text/html": {"schema": {"type": "string"}}}}
        for code, text in pages.items()
    }
    for code, text in (errors or {}).items():
        entry = out.setdefault(code, {"description": text, "content": {}})
        if code in pages:
            entry["description"] += "; or " + text
        entry["content"]["application/json"] = {
            "schema": {"$ref": "#/components/schemas/ErrorResponse"}
        }
    return out


LINK_PAGES = {
    400: "A damaged or forged link (a page)",
    404: "An unknown or erased invitation (a page)",
}
SURVEY_PAGES = {**LINK_PAGES, 410: "An expired or cancelled invitation (a page)"}
PARAMETER_ERRORS = {422: "A parameter with a NUL character"}


def _page(html: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)


def _form(body: bytes) -> dict[str, list[str]]:
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "bad_form", "the form could not be read") from None
    # PostgreSQL text cannot hold a NUL: refused here rather than failing (500) in the database.
    if any("\x00" in name + "".join(values) for name, values in form.items()):
        raise ApiError(400, "bad_form", "the form holds a NUL character")
    return form


def router(
    *,
    program: Program,
    links: LinkKeys,
    pages: Pages,
    sessions: async_sessionmaker[AsyncSession],
    settings: CollectorSettings,
    zone: ZoneInfo,
    on_change: Callable[[], None],
    clock: Callable[[], datetime] = utcnow,
) -> APIRouter:
    api = APIRouter()
    default_locale = program.defaults.locale
    rules = bots.BotRules.of(settings)

    def message(kind: str, status: int, locale: str | None = None) -> HTMLResponse:
        return _page(pages.message(locale=pick_locale(locale, default_locale), kind=kind), status)

    async def load(
        session: AsyncSession, token: str, request: Request | None, *, unsubscribe: bool = False
    ) -> Invitation | HTMLResponse:
        """The invitation of a link, or the page that says why there is none: 400 for a
        damaged or forged token, 404 for an unknown one, 410 for an expired or cancelled one."""
        asked = request.headers.get("accept-language") if request is not None else None
        try:
            links.verify(token)
        except InvalidToken:
            return message("tampered", 400, asked)
        invitation = await repository.invitation_by_token(session, token)
        if invitation is None or invitation.erased_at is not None:
            return message("not_found", 404, asked)
        if unsubscribe:  # unsubscribe links work for as long as the invitation is kept
            return invitation
        if invitation.expires_at <= clock() or invitation.cancelled_at is not None:
            return message("expired", 410, invitation.locale)
        if invitation.survey_id not in {s.id for s in program.surveys}:
            return message("not_found", 404, invitation.locale)
        return invitation

    def survey_form(
        found: Invitation,
        token: str,
        locale: str,
        *,
        selected: int | None,
        comment: str,
        error: str | None = None,
        status: int = 200,
    ) -> HTMLResponse:
        html = pages.survey(
            survey=program.survey(found.survey_id),
            token=token,
            locale=locale,
            selected=selected,
            comment=comment,
            error=error,
            action_url=f"/s/{quote(token, safe='')}",
        )
        return _page(html, status)

    @api.get(
        "/s/{token}",
        response_class=HTMLResponse,
        responses=documented(SURVEY_PAGES, PARAMETER_ERRORS),
        summary="The survey page",
    )
    async def survey_page(
        token: str, request: Request, score: str | None = None, lang: str | None = None
    ) -> Response:
        async with unit_of_work(sessions) as session:
            found = await load(session, token, request)
            if isinstance(found, HTMLResponse):
                return found
            low, high = program.survey(found.survey_id).scale
            clicked = (
                int(score) if score and score.isdigit() and low <= int(score) <= high else None
            )
            await repository.add_hit(
                session,
                found.invitation_id,
                "open" if clicked is None else "score_link",
                clicked,
                clock(),
                keep=rules.burst_window,
            )
            previous = await repository.response_for(session, found.invitation_id)
        selected = previous.score if previous else None
        if clicked is not None:
            selected = clicked  # a score button in the email: shown selected, not recorded
        return survey_form(
            found,
            token,
            pick_locale(lang or found.locale, default_locale),
            selected=selected,
            comment=(previous.comment or "") if previous else "",
        )

    @api.post(
        "/s/{token}",
        response_class=HTMLResponse,
        responses={
            303: {"description": "The answer is stored: on to the thank-you page"},
            **documented(
                {**SURVEY_PAGES, 422: "The form again, saying what is missing or wrong"},
                {
                    400: "A form that cannot be read",
                    413: "Body too large",
                    415: "Not a form",
                    **PARAMETER_ERRORS,
                },
            ),
        },
        summary="Answer the survey",
        openapi_extra=FORM_BODY,
    )
    async def answer(token: str, request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise ApiError(
                415, "unsupported_media_type", "post the form as application/x-www-form-urlencoded"
            )
        form = _form(await read_body(request, MAX_FORM_BYTES))
        raw_score = (form.get("score") or [""])[0].strip()
        comment = (form.get("comment") or [""])[0].strip()[:5000] or None
        async with unit_of_work(sessions) as session:
            found = await load(session, token, request)
            if isinstance(found, HTMLResponse):
                return found
            locale = pick_locale((form.get("locale") or [found.locale])[0], default_locale)
            low, high = program.survey(found.survey_id).scale
            score: int | None = None
            if raw_score:
                if not raw_score.isdigit() or not low <= int(raw_score) <= high:
                    return survey_form(
                        found, token, locale, selected=None, comment=comment or "",
                        error="score", status=422,
                    )  # fmt: skip
                score = int(raw_score)
            elif comment is None:
                return survey_form(
                    found, token, locale, selected=None, comment="", error="empty", status=422
                )
            now = clock()
            await repository.add_hit(
                session, found.invitation_id, "post", score, now, keep=rules.burst_window
            )
            hits = await repository.recent_hits(
                session, found.invitation_id, now - rules.burst_window
            )
            reason = rules.judge(found, hits, now)
            with bound(invitation_id=str(found.invitation_id), customer_id=found.customer_id):
                saved = await repository.save_response(
                    session,
                    found,
                    score=score,
                    comment=comment,
                    now=now,
                    day=local_day(now, zone),
                    bot_reason=reason,
                )
                await alerting.record(session, program, saved, now, hold=rules.trap_window)
                if reason is None:
                    log.info("answer stored (revision %d)", saved.revision)
                else:
                    log.info("answer stored as a suspected bot: %s", reason)
        # Counted once the answer is committed.
        RESPONSES.labels(
            metric=saved.metric,
            kind="person" if reason is None else "suspected_bot",
            answer="new" if saved.revision == 1 else "changed",
        ).inc()
        on_change()
        return RedirectResponse(
            f"/s/{quote(token, safe='')}/thanks?lang={locale}",
            status_code=303,
            headers=PAGE_HEADERS,
        )

    @api.get(
        "/s/{token}/thanks",
        response_class=HTMLResponse,
        responses=documented(SURVEY_PAGES, PARAMETER_ERRORS),
        summary="The thank-you page",
    )
    async def thanks(token: str, request: Request, lang: str | None = None) -> Response:
        async with unit_of_work(sessions) as session:
            found = await load(session, token, request)
            if isinstance(found, HTMLResponse):
                return found
            previous = await repository.response_for(session, found.invitation_id)
        locale = pick_locale(lang or found.locale, default_locale)
        return _page(
            pages.thanks(
                survey=program.survey(found.survey_id),
                token=token,
                locale=locale,
                score=previous.score if previous else None,
            )
        )

    @api.get(
        "/s/{token}/trap",
        response_class=HTMLResponse,
        responses=documented(LINK_PAGES, PARAMETER_ERRORS),
        summary="The hidden link in the email and the page that only link scanners follow",
    )
    async def trap(token: str) -> Response:
        async with unit_of_work(sessions) as session:
            found = await load(session, token, None, unsubscribe=True)
            if isinstance(found, HTMLResponse):
                return found
            now = clock()
            await repository.add_hit(
                session, found.invitation_id, "trap", None, now, keep=rules.burst_window
            )
            found.trap_hit_at = now
            # An answer POSTed just before the scanner reached the trap is its answer too.
            previous = await repository.response_for(session, found.invitation_id)
            if (
                previous is not None
                and not previous.suspected_bot
                and now - previous.submitted_at <= rules.trap_window
            ):
                await repository.flag_bot(session, previous, "trap")
                log.info("answer re-marked as a suspected bot: trap")
        on_change()
        return _page("<!doctype html><title>.</title>", 200)

    @api.get(
        "/u/{token}",
        response_class=HTMLResponse,
        responses=documented(LINK_PAGES, PARAMETER_ERRORS),
        summary="The unsubscribe page",
    )
    async def unsubscribe_page(token: str, request: Request, lang: str | None = None) -> Response:
        async with unit_of_work(sessions) as session:
            found = await load(session, token, request, unsubscribe=True)
            if isinstance(found, HTMLResponse):
                return found
            done = await repository.has_optout(session, found.invitation_id)
        locale = pick_locale(lang or found.locale, default_locale)
        return _page(pages.unsubscribe(token=token, locale=locale, done=done))

    @api.post(
        "/u/{token}",
        response_class=HTMLResponse,
        responses=documented(LINK_PAGES, {413: "Body too large", **PARAMETER_ERRORS}),
        summary="Unsubscribe (the page's button, or a mail client's RFC 8058 one-click POST)",
    )
    async def unsubscribe(token: str, request: Request) -> Response:
        body = await read_body(request, MAX_FORM_BYTES)
        one_click = b"List-Unsubscribe=One-Click" in body
        async with unit_of_work(sessions) as session:
            found = await load(session, token, request, unsubscribe=True)
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
        on_change()
        try:
            form = parse_qs(body.decode("utf-8"), max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            form = {}
        locale = pick_locale((form.get("locale") or [found.locale])[0], default_locale)
        return _page(pages.unsubscribe(token=token, locale=locale, done=True))

    return api
