"""``GET /dashboard``: live scores, trends against targets, the detractor queue and suspected
bots, server-rendered (SVG charts, no front-end build step).

Who may look: a request with the API bearer token, or a browser session opened at
``/dashboard/login`` with that token (an HttpOnly, SameSite=Strict cookie signed with a key
derived from the token, valid ``KAIKU_COLLECTOR_DASHBOARD_SESSION_HOURS``; rotating the token
ends every session). The page works without JavaScript; with it, a small inline script listens
to ``/dashboard/events`` (server-sent events) and swaps in the fresh page whenever an answer or a
follow-up changes, on this replica (at once) or another (within ``poll_seconds``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.collector import api, charts, repository
from services.collector.repository import ResponseQuery
from services.common.db import unit_of_work
from services.common.http import ApiError, read_body
from services.common.program import Program, Survey

log = logging.getLogger(__name__)

COOKIE = "kaiku_dashboard"
TEMPLATES = Path(__file__).parent / "templates"
WEEKS = 12  # the trend charts' span
QUEUE = 50  # answers in the detractor queue and the bot list
DOMAINS = {"nps": (-100.0, 100.0), "csat": (0.0, 100.0), "ces": (1.0, 7.0)}


@dataclass
class Changes:
    """Wakes the dashboards' event streams when an answer or a follow-up changes here."""

    version: int = 0
    _waiters: set[asyncio.Event] = field(default_factory=set)

    def notify(self) -> None:
        self.version += 1
        for waiter in list(self._waiters):
            waiter.set()

    async def wait(self, timeout: float) -> None:
        waiter = asyncio.Event()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)


class Sessions:
    """Signed session cookies: ``<expiry>.<hmac>``, keyed by the API token."""

    def __init__(self, token: SecretStr, hours: float) -> None:
        secret = token.get_secret_value().encode()
        self._key = hmac.new(secret, b"kaiku-dashboard-session", hashlib.sha256).digest()
        self._token = secret
        self.seconds = int(hours * 3600)

    def _sign(self, expiry: int) -> str:
        return hmac.new(self._key, str(expiry).encode(), hashlib.sha256).hexdigest()

    def issue(self, now: float | None = None) -> str:
        expiry = int((now or time.time()) + self.seconds)
        return f"{expiry}.{self._sign(expiry)}"

    def valid(self, cookie: str | None, now: float | None = None) -> bool:
        if not self._token or not cookie or "." not in cookie:  # no API token: no sessions
            return False
        raw, _, sig = cookie.partition(".")
        if not raw.isdigit() or not hmac.compare_digest(sig, self._sign(int(raw))):
            return False
        return int(raw) > (now or time.time())

    def token_ok(self, given: str) -> bool:
        return bool(self._token) and hmac.compare_digest(given.encode(), self._token)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def router(
    *,
    program: Program,
    sessions: async_sessionmaker[AsyncSession],
    token: SecretStr | None,
    zone: ZoneInfo,
    min_n: int,
    changes: Changes,
    session_hours: float = 12.0,
    poll_seconds: float = 2.0,
    stream_seconds: float = 300.0,
    clock: Callable[[], datetime] | None = None,
) -> APIRouter:
    board = APIRouter(include_in_schema=False)
    env = SandboxedEnvironment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    cookies = Sessions(token or SecretStr(""), session_hours)

    def now() -> datetime:
        return clock() if clock is not None else datetime.now(zone)

    def allowed(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and cookies.token_ok(given.strip()):
            return True
        return cookies.valid(request.cookies.get(COOKIE))

    def refuse(request: Request) -> Response:
        if "text/html" in request.headers.get("accept", ""):
            return RedirectResponse("/dashboard/login", status_code=303)
        raise ApiError(401, "unauthorized", "a bearer token or a dashboard session is required")

    def headers(nonce: str | None = None) -> dict[str, str]:
        script = f" script-src 'nonce-{nonce}';" if nonce else ""
        return {
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
            f"img-src 'self' data:; connect-src 'self';{script} form-action 'self'; "
            "base-uri 'none'; frame-ancestors 'none'",
        }

    async def survey_card(session: AsyncSession, survey: Survey, today: date) -> dict[str, Any]:
        start = today - timedelta(days=today.weekday()) - timedelta(weeks=WEEKS - 1)
        end = today + timedelta(days=1)
        weekly = await api.score_rows(
            session, program, [survey], start, end, "week", [], zone, min_n
        )
        overall = await api.score_rows(
            session, program, [survey], start, end, "none", [], zone, min_n
        )
        row = overall[0] if overall else None
        by_week = {r.period_start: r for r in weekly}
        points = []
        for i in range(WEEKS):
            week = start + timedelta(weeks=i)
            r = by_week.get(week)
            points.append(
                charts.Point(
                    label=week.strftime("%d.%m."),
                    value=r.value if r else None,
                    low=r.ci_low if r else None,
                    high=r.ci_high if r else None,
                    n=r.n if r else 0,
                )
            )
        titles = survey.title or {}
        title = titles.get("en") or next(iter(titles.values()), survey.id)
        return {
            "id": survey.id,
            "title": title,
            "metric": survey.metric,
            "row": row,
            "rate": _pct(row.response_rate if row else None),
            "closure": _pct(row.loop_closure_rate if row else None),
            "since": start,
            "chart": charts.trend(
                points,
                domain=DOMAINS[survey.metric],
                target=survey.target,
                title=f"{survey.id}: {survey.metric.upper()} per week, with its 95% interval",
            ),
        }

    async def render(request: Request, nonce: str) -> str:
        today = now().astimezone(zone).date()
        async with unit_of_work(sessions) as session:
            cards = [await survey_card(session, s, today) for s in program.surveys]
            queue = await repository.find_responses(
                session, ResponseQuery(alerted=True), after=None, limit=QUEUE
            )
            bots = await repository.find_responses(
                session, ResponseQuery(bots="only"), after=None, limit=QUEUE
            )
        return env.get_template("dashboard.html.j2").render(
            cards=cards,
            queue=[r for r in queue if r.followup_status != "resolved"],
            bots=bots,
            zone=str(zone),
            updated=now().astimezone(zone).strftime("%Y-%m-%d %H:%M:%S"),
            nonce=nonce,
            min_n=min_n,
            local=lambda at: at.astimezone(zone),
        )

    @board.get("/dashboard", response_class=HTMLResponse)
    async def dashboard(request: Request) -> Response:
        if not allowed(request):
            return refuse(request)
        nonce = secrets.token_urlsafe(16)
        return HTMLResponse(await render(request, nonce), headers=headers(nonce))

    @board.get("/dashboard/login", response_class=HTMLResponse)
    async def login_page(failed: bool = False) -> Response:
        html = env.get_template("login.html.j2").render(failed=failed)
        return HTMLResponse(html, status_code=401 if failed else 200, headers=headers())

    @board.post("/dashboard/login")
    async def login(request: Request) -> Response:
        body = await read_body(request, 4096)
        try:
            given = (parse_qs(body.decode("utf-8")).get("token") or [""])[0]
        except UnicodeDecodeError:
            given = ""
        if not cookies.token_ok(given):
            log.info("dashboard login refused")
            html = env.get_template("login.html.j2").render(failed=True)
            return HTMLResponse(html, status_code=401, headers=headers())
        response = RedirectResponse("/dashboard", status_code=303)
        response.set_cookie(
            COOKIE,
            cookies.issue(),
            max_age=cookies.seconds,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/dashboard",
        )
        return response

    @board.post("/dashboard/logout")
    async def logout() -> Response:
        response = RedirectResponse("/dashboard/login", status_code=303)
        response.delete_cookie(COOKIE, path="/dashboard")
        return response

    async def stamp() -> tuple[Any, ...]:
        async with unit_of_work(sessions) as session:
            return await repository.latest_change(session, [s.id for s in program.surveys])

    @board.get("/dashboard/events")
    async def events(request: Request) -> Response:
        """Server-sent events: ``update`` whenever the dashboard's data changed."""
        if not allowed(request):
            raise ApiError(401, "unauthorized", "a bearer token or a dashboard session is required")

        async def stream() -> AsyncIterator[bytes]:
            seen = (changes.version, await stamp())
            ends = time.monotonic() + stream_seconds
            yield b"retry: 3000\n\n"
            while time.monotonic() < ends:
                await changes.wait(poll_seconds)
                if await request.is_disconnected():
                    return
                current = (changes.version, await stamp())
                if current != seen:
                    seen = current
                    yield f"event: update\ndata: {changes.version}\n\n".encode()
                else:
                    yield b": keep-alive\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return board
