"""A local Twilio Programmable Messaging API that holds kaiku to Twilio's documented contract.

``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``
(https://www.twilio.com/docs/messaging/api/message-resource) answers as Twilio documents:

- HTTP Basic ``AccountSid:AuthToken`` or ``401`` with error 20003; another account's path: ``404``
  with 20404;
- an ``application/x-www-form-urlencoded`` body (anything else reads as no parameters, so 21604:
  Twilio's 21604 page names a JSON body as a cause);
- ``To`` required (21604) and E.164 (21211), ``Body`` required (21602), ``From`` or
  ``MessagingServiceSid`` required and well-formed (21603: a number, an alphanumeric sender id of
  up to 11 letters, digits and spaces with at least one letter — error 21709's rules — or
  ``MG`` + 32 hex), ``StatusCallback`` an absolute http(s) URL of at most 4000 characters whose
  host has no underscore (21609);
- ``201 Created`` with the Message resource (``sid`` ``SM…``, ``status`` ``queued``, or
  ``accepted`` through a Messaging Service).

Errors are Twilio's JSON ``{"code", "message", "more_info", "status"}``
(https://www.twilio.com/docs/usage/twilios-response). ``fail_next`` makes the next calls answer
with any documented error. ``status_callback`` and ``incoming`` make the requests Twilio makes to
kaiku — form-encoded and signed with ``X-Twilio-Signature``, computed here independently of the
module under test (https://www.twilio.com/docs/usage/webhooks/webhooks-security).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.common.webhooks import WebhookRequest, basic_credentials
from tests.vendor_api import Call, LocalApi

ACCOUNT_SID = "AC" + "5e2b8d1f" * 4
AUTH_TOKEN = "9c4f0d2a7e1b" + "3" * 20  # a placeholder 32-character auth token
MESSAGING_SERVICE_SID = "MG" + "0a1b2c3d" * 4
FORM = "application/x-www-form-urlencoded"

E164 = re.compile(r"^\+[1-9]\d{1,14}$")
ALPHANUMERIC_SENDER = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")
SERVICE_SID = re.compile(r"^MG[0-9a-fA-F]{32}$")

# Documented errors of the create call: code → (HTTP status, Twilio's message). ``{to}`` is filled
# with the request's To, as Twilio does (so tests see that kaiku never repeats it).
ERRORS: dict[int, tuple[int, str]] = {
    20003: (401, "Authenticate"),
    20404: (404, "The requested resource was not found"),
    20429: (429, "Too Many Requests"),
    20500: (500, "Internal Server Error"),
    21211: (400, "The 'To' number {to} is not a valid phone number."),
    21265: (400, "'To' number cannot be a Short Code: {to}"),
    21266: (400, "'To' and 'From' number cannot be the same: {to}"),
    21408: (400, "Permission to send an SMS has not been enabled for the region indicated by {to}"),
    21602: (400, "Message body is required."),
    21603: (400, "A 'From' or 'MessagingServiceSid' parameter is required to send a message"),
    21604: (400, "A 'To' phone number is required."),
    21606: (400, "The 'From' phone number provided is not a valid message-capable Twilio number"),
    21608: (400, "The number {to} is unverified. Trial accounts may only send to verified numbers"),
    21609: (400, "Invalid 'StatusCallback'"),
    21610: (400, "Attempt to send to unsubscribed recipient"),
    21611: (400, "This 'From' number has exceeded the maximum number of queued messages"),
    21612: (400, "The 'To' phone number: {to}, is not currently reachable using the 'From'"),
    21614: (400, "'To' number {to} is not a valid mobile number"),
    21635: (400, "'To' number {to} cannot be a landline"),
    21659: (400, "'From' is not a Twilio phone number or Short Code country mismatch"),
}


def error_body(code: int, to: str = "+15005550001", status: int | None = None) -> dict[str, Any]:
    http_status, message = ERRORS[code]
    return {
        "code": code,
        "message": message.format(to=to),
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status or http_status,
    }


def twilio_signature(auth_token: str, url: str, params: list[tuple[str, str]]) -> str:
    """Twilio's documented recipe, written out separately from the module under test."""
    data = url
    for name, value in sorted(params):
        data += name + value
    digest = hmac.new(auth_token.encode("utf-8"), data.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def webhook_request(call: Call, base_url: str) -> WebhookRequest:
    """What kaiku's route hands to a receipt source for a request the receiver recorded."""
    query = f"?{urlencode(call.query)}" if call.query else ""
    return WebhookRequest(
        method=call.method,
        url=f"{base_url}{call.path}{query}",
        headers=Headers(headers=call.headers),
        body=call.body,
        received_at=datetime.now(UTC),
    )


@dataclass
class Failure:
    status: int
    body: dict[str, Any] | None
    headers: dict[str, str]
    code: int | None


@dataclass
class TwilioApi:
    account_sid: str = ACCOUNT_SID
    auth_token: str = AUTH_TOKEN
    # Seconds to wait before answering (timeouts).
    delay: float = 0.0
    api: LocalApi = field(default_factory=LocalApi)
    # Every create Twilio accepted: the form fields and the sid it answered with.
    messages: list[dict[str, str]] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    _failures: list[Failure] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.api.route("POST", "/2010-04-01/Accounts/{account_sid}/Messages.json")(self._create)

    @property
    def url(self) -> str:
        return self.api.url

    def __enter__(self) -> TwilioApi:
        self.api.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.api.__exit__(*exc)

    def fail_next(
        self,
        code: int | None = None,
        *,
        status: int | None = None,
        times: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next ``times`` valid creates with Twilio error ``code`` (its documented
        status and body), or with a bare ``status`` (a proxy's 502, say)."""
        if code is None and status is None:
            raise ValueError("a code or a status")
        http_status = status or ERRORS[code][0]  # type: ignore[index]
        for _ in range(times):
            self._failures.append(Failure(http_status, None, headers or {}, code))

    def _refuse(self, code: int, to: str = "") -> Response:
        body = error_body(code, to)
        self.refusals.append(body)
        return JSONResponse(body, status_code=body["status"])

    async def _create(self, request: Request) -> Response:
        if self.delay:
            await asyncio.sleep(self.delay)
        credentials = basic_credentials(request.headers.get("authorization"))
        if credentials != (self.account_sid, self.auth_token):
            return self._refuse(20003)
        if request.path_params["account_sid"] != self.account_sid:
            return self._refuse(20404)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw = (await request.body()).decode("utf-8")
        form = dict(parse_qsl(raw, keep_blank_values=True)) if content_type == FORM else {}
        to = form.get("To", "")
        if not to:
            return self._refuse(21604)
        if not E164.match(to):
            return self._refuse(21211, to)
        if not form.get("Body"):
            return self._refuse(21602, to)
        sender, service = form.get("From"), form.get("MessagingServiceSid")
        if not (sender or service):
            return self._refuse(21603, to)
        if service is not None and not SERVICE_SID.match(service):
            return self._refuse(21603, to)
        if sender is not None and not (E164.match(sender) or ALPHANUMERIC_SENDER.match(sender)):
            return self._refuse(21603, to)
        callback = form.get("StatusCallback")
        if callback is not None and not _valid_callback(callback):
            return self._refuse(21609, to)
        if self._failures:
            failure = self._failures.pop(0)
            body = failure.body
            if body is None and failure.code is not None:
                body = error_body(failure.code, to, failure.status)
            self.refusals.append(body or {"status": failure.status})
            if body is None:
                return Response(b"upstream error", failure.status, headers=failure.headers)
            return JSONResponse(body, failure.status, headers=failure.headers)
        sid = "SM" + uuid.uuid4().hex
        self.messages.append({**form, "sid": sid})
        now = format_datetime(datetime.now(UTC), usegmt=True)
        return JSONResponse(
            {
                "account_sid": self.account_sid,
                "api_version": "2010-04-01",
                "body": form["Body"],
                "date_created": now,
                "date_sent": None,
                "date_updated": now,
                "direction": "outbound-api",
                "error_code": None,
                "error_message": None,
                "from": sender,
                "messaging_service_sid": service,
                "num_media": "0",
                "num_segments": "0" if service else "1",
                "price": None,
                "price_unit": "USD",
                "sid": sid,
                "status": "accepted" if service else "queued",
                "subresource_uris": {
                    "media": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}/Media.json"
                },
                "to": to,
                "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
            },
            status_code=201,
        )

    # -- what Twilio sends to kaiku ---------------------------------------------------------------

    def message(self, sid: str) -> dict[str, str]:
        return next(m for m in self.messages if m["sid"] == sid)

    async def status_callback(
        self, sid: str, status: str, error_code: int | None = None, token: str | None = None
    ) -> httpx.Response:
        """POST the status callback of message ``sid`` to its StatusCallback, as Twilio does."""
        sent = self.message(sid)
        params = [
            ("AccountSid", self.account_sid),
            ("ApiVersion", "2010-04-01"),
            ("From", sent.get("From", "+15005550006")),
            ("MessageSid", sid),
            ("MessageStatus", status),
            ("SmsSid", sid),
            ("SmsStatus", status),
            ("To", sent["To"]),
        ]
        if "MessagingServiceSid" in sent:
            params.append(("MessagingServiceSid", sent["MessagingServiceSid"]))
        if error_code is not None:
            params.append(("ErrorCode", str(error_code)))
        return await self.post(sent["StatusCallback"], params, token)

    async def incoming(
        self, url: str, sender: str, body: str, token: str | None = None, **extra: str
    ) -> httpx.Response:
        """POST an incoming message from ``sender`` to ``url`` (the number's messaging webhook)."""
        sid = "SM" + uuid.uuid4().hex
        params = [
            ("AccountSid", self.account_sid),
            ("ApiVersion", "2010-04-01"),
            ("Body", body),
            ("From", sender),
            ("FromCountry", "SE"),
            ("MessageSid", sid),
            ("NumMedia", "0"),
            ("NumSegments", "1"),
            ("SmsMessageSid", sid),
            ("SmsSid", sid),
            ("SmsStatus", "received"),
            ("To", "+15005550006"),
            *extra.items(),
        ]
        return await self.post(url, params, token)

    async def post(
        self, url: str, params: list[tuple[str, str]], token: str | None = None
    ) -> httpx.Response:
        signature = twilio_signature(token or self.auth_token, url, params)
        async with httpx.AsyncClient(timeout=5) as http:
            return await http.post(
                url,
                content=urlencode(params),
                headers={
                    "content-type": FORM,
                    "x-twilio-signature": signature,
                    "user-agent": "TwilioProxy/1.1",
                },
            )


def _valid_callback(url: str) -> bool:
    parts = urlsplit(url)
    return (
        len(url) <= 4000
        and parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and "_" not in (parts.hostname or "")
    )


@dataclass
class Receiver:
    """kaiku's callback route, recorded: answers 204 and keeps every request."""

    path: str
    api: LocalApi = field(default_factory=LocalApi)

    def __post_init__(self) -> None:
        self.api.route("POST", self.path)(lambda request: Response(status_code=204))

    @property
    def url(self) -> str:
        return f"{self.api.url}{self.path}"

    def requests(self) -> list[WebhookRequest]:
        return [webhook_request(call, self.api.url) for call in self.api.calls]

    def __enter__(self) -> Receiver:
        self.api.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.api.__exit__(*exc)
