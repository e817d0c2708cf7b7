"""A local 46elks API that holds kaiku to 46elks' documented contract.

``POST /a1/sms`` (https://46elks.com/docs/send-sms) wants HTTP Basic ``API username:API password``
and an ``application/x-www-form-urlencoded`` body with ``from``, ``to`` and ``message``; ``to`` is
E.164; ``from`` is E.164 or a text sender id (https://46elks.com/kb/text-sender-id: A–Z, a–z, 0–9,
3–11 characters, not starting with a digit); ``whendelivered``, when given, an absolute http(s)
URL. It answers ``200`` with the SMS object (https://46elks.com/docs/show-sms-id): ``id``,
``status`` ``created``, ``direction`` ``outgoing``, ``from``, ``to``, ``message``, ``created``,
``parts``, ``cost``.

46elks documents no error statuses or bodies. This server refuses a request that breaks the
contract with a short plain-text ``400`` (``401`` for wrong credentials) — its own stand-ins, not
46elks' words — so a test that breaks the contract fails. ``fail_next`` makes the next calls answer
with any status (429 with ``Retry-After``, 5xx, or a 4xx whose text repeats the number).

``report`` and ``incoming`` make the requests 46elks makes to kaiku
(https://46elks.com/docs/sms-delivery-reports, https://46elks.com/docs/receive-sms): form-encoded
POSTs to the ``whendelivered`` URL (or the number's ``sms_url``), with the Basic credentials that
URL's userinfo carries ("https://username:password@yourserver.example").
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from services.common.webhooks import basic_credentials
from tests.dispatcher.twilio_api import Receiver, webhook_request
from tests.vendor_api import LocalApi

__all__ = ["ElksApi", "Receiver", "post_as_46elks", "webhook_request"]

USERNAME = "u" + "6c1f3e9a" * 4
PASSWORD = "2b7d" * 8  # a placeholder API password
FORM = "application/x-www-form-urlencoded"

E164 = re.compile(r"^\+[1-9]\d{1,14}$")
TEXT_SENDER = re.compile(r"^[A-Za-z][A-Za-z0-9]{2,10}$")


@dataclass
class Failure:
    status: int
    text: str
    headers: dict[str, str]


@dataclass
class ElksApi:
    username: str = USERNAME
    password: str = PASSWORD
    delay: float = 0.0
    api: LocalApi = field(default_factory=LocalApi)
    # Every SMS 46elks accepted: the form fields and the id it answered with.
    messages: list[dict[str, str]] = field(default_factory=list)
    refusals: list[tuple[int, str]] = field(default_factory=list)
    _failures: list[Failure] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.api.route("POST", "/a1/sms")(self._send)

    @property
    def url(self) -> str:
        return self.api.url

    def __enter__(self) -> ElksApi:
        self.api.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.api.__exit__(*exc)

    def fail_next(
        self, status: int, text: str = "", *, times: int = 1, headers: dict[str, str] | None = None
    ) -> None:
        """Answer the next ``times`` valid sends with ``status`` and ``text`` (``{to}`` is
        replaced by the request's number)."""
        for _ in range(times):
            self._failures.append(Failure(status, text, headers or {}))

    def _refuse(self, status: int, text: str) -> Response:
        self.refusals.append((status, text))
        return PlainTextResponse(text, status_code=status)

    async def _send(self, request: Request) -> Response:
        if self.delay:
            await asyncio.sleep(self.delay)
        if basic_credentials(request.headers.get("authorization")) != (
            self.username,
            self.password,
        ):
            return self._refuse(401, "Unauthorized")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != FORM:
            return self._refuse(400, f"Expected {FORM}")
        form = dict(parse_qsl((await request.body()).decode("utf-8"), keep_blank_values=True))
        for key in ("from", "to", "message"):
            if not form.get(key):
                return self._refuse(400, f"Missing key {key}")
        to, sender = form["to"], form["from"]
        if not E164.match(to):
            return self._refuse(400, f"Invalid to number: {to}")
        if not (E164.match(sender) or TEXT_SENDER.match(sender)):
            return self._refuse(400, "Invalid from")
        report_url = form.get("whendelivered")
        if report_url is not None:
            parts = urlsplit(report_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                return self._refuse(400, "Invalid whendelivered")
        if self._failures:
            failure = self._failures.pop(0)
            text = failure.text.format(to=to)
            self.refusals.append((failure.status, text))
            return PlainTextResponse(text, failure.status, headers=failure.headers)
        sms_id = "s" + uuid.uuid4().hex
        self.messages.append({**form, "id": sms_id})
        return JSONResponse(
            {
                "status": "created",
                "direction": "outgoing",
                "from": sender,
                "created": datetime.now(UTC).replace(tzinfo=None).isoformat(),
                "parts": 1,
                "to": to,
                "cost": 3500,
                "message": form["message"],
                "id": sms_id,
            }
        )

    # -- what 46elks sends to kaiku ---------------------------------------------------------------

    def message(self, sms_id: str) -> dict[str, str]:
        return next(m for m in self.messages if m["id"] == sms_id)

    async def report(
        self, sms_id: str, status: str, delivered: datetime | None = None
    ) -> httpx.Response:
        """POST the delivery report of ``sms_id`` to its ``whendelivered`` URL."""
        form: dict[str, Any] = {"id": sms_id, "status": status}
        if status == "delivered":
            when = delivered or datetime.now(UTC)
            form["delivered"] = when.astimezone(UTC).replace(tzinfo=None).isoformat()
        return await post_as_46elks(self.message(sms_id)["whendelivered"], form)

    async def incoming(
        self, sms_url: str, sender: str, message: str, to: str = "+46766861004"
    ) -> httpx.Response:
        """POST an incoming SMS from ``sender`` to the number's ``sms_url``."""
        return await post_as_46elks(
            sms_url,
            {
                "direction": "incoming",
                "id": "s" + uuid.uuid4().hex,
                "from": sender,
                "to": to,
                "created": datetime.now(UTC).replace(tzinfo=None).isoformat(),
                "message": message,
            },
        )


async def post_as_46elks(url: str, form: dict[str, Any]) -> httpx.Response:
    """POST as 46elks does: the URL's userinfo becomes HTTP Basic credentials."""
    parts = urlsplit(url)
    auth = None
    if parts.username is not None:
        auth = httpx.BasicAuth(unquote(parts.username), unquote(parts.password or ""))
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    async with httpx.AsyncClient(timeout=5) as http:
        return await http.post(bare, data=form, auth=auth)
