"""A local Mailgun Messages API that holds requests to what Mailgun documents, and Mailgun's side
of its webhooks (documented payloads, signed as Mailgun signs them).

Contract (https://documentation.mailgun.com/docs/mailgun/api-reference/send/mailgun/messages/
post-v3--domain-name--messages, the OpenAPI description also in mailgun/mailgun-mcp-server
``src/openapi.yaml``; https://documentation.mailgun.com/docs/mailgun/quickstart-guide/responses):
``POST /v3/{domain_name}/messages`` with HTTP Basic ``api:<key>`` (else 401 ``Forbidden``), for
the configured domain, a ``multipart/form-data`` body (the only one described) with ``from``,
``to`` (valid addresses: else 400 "to parameter is not a valid address. please check
documentation."), ``subject`` and at least one of ``text``, ``html``, ``amp-html``,
``template``; ``o:``/``h:``/``v:``/``t:`` options at most 16KB in all. A good request gets
``200 {"id": "<...>", "message": "Queued. Thank you."}``; a broken one 400 ``{"message"}``.

``fail_next(status)`` makes the next calls that keep the contract answer with a documented error
instead (the examples of the OpenAPI description where it has one).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parseaddr
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from tests.vendor_api import Call, LocalApi

API_KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"  # the placeholder key of Mailgun's docs
DOMAIN = "mg.kaiku.test"
SIGNING_KEY = "whsk-kaiku-test-0123456789abcdef"  # a placeholder webhook signing key

# The documented failures: status → (body, headers); None for the bare "Forbidden". 400, 401,
# 429 and 500 are the OpenAPI examples; the others carry the phrase of the docs' status tables
# ("API Response Codes", the older "Errors" table of api-intro) as their message.
DOCUMENTED_ERRORS: dict[int, tuple[Any, dict[str, str]]] = {
    400: ({"message": "to parameter is not a valid address. please check documentation."}, {}),
    401: (None, {}),
    402: ({"message": "Request Failed - Parameters were valid but request failed"}, {}),
    403: ({"message": "Auth error or access denied"}, {}),
    404: ({"message": "Resource not found"}, {}),
    413: ({"message": "Request Entity Too Large"}, {}),
    429: (
        {
            "message": "Domain example.com is not allowed to send: account-requests-per-sec "
            "limit exceeded, try again after 120 seconds"
        },
        {},
    ),
    500: ({"message": "Internal Server Error"}, {}),
    502: ({"message": "Bad Gateway"}, {}),
    503: ({"message": "Service Unavailable"}, {}),
    504: ({"message": "Gateway Timeout"}, {}),
}
OPTIONS_LIMIT = 16 * 1024


@dataclass
class Accepted:
    """A message Mailgun took: its id (with angle brackets, as the API answers) and fields."""

    id: str
    fields: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        return next((v for k, v in self.fields if k == name), None)

    @property
    def user_variables(self) -> dict[str, str]:
        return {k.removeprefix("v:"): v for k, v in self.fields if k.startswith("v:")}


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


def _valid_address(value: str | None) -> bool:
    if not value:
        return False
    _, address = parseaddr(value)
    local, at, domain = address.rpartition("@")
    return bool(at and local and "." in domain)


def check(fields: list[tuple[str, str]]) -> None:
    """Raise ``Refused`` unless ``fields`` make a message Mailgun takes."""
    given = dict(fields)
    if "from" not in given:
        raise Refused(400, "from parameter is missing. ")
    if not _valid_address(given["from"]):
        raise Refused(400, "from parameter is not a valid address. please check documentation.")
    if "to" not in given:
        raise Refused(400, "to parameter is missing. ")
    if not all(_valid_address(v) for k, v in fields if k == "to"):
        raise Refused(400, "to parameter is not a valid address. please check documentation.")
    if "subject" not in given:
        raise Refused(400, "subject parameter is missing. ")
    if not any(given.get(k) for k in ("text", "html", "amp-html", "template")):
        raise Refused(
            400,
            "Need at least one of 'text', 'html', 'amp-html' or 'template' parameters specified.",
        )
    options = sum(
        len(k.encode()) + len(v.encode()) for k, v in fields if k[:2] in ("o:", "h:", "v:", "t:")
    )
    if options > OPTIONS_LIMIT:
        raise Refused(
            400, "Send options (parameters starting with o:, h:, or v:) are limited to 16KB total"
        )


def message_id() -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    return f"<{stamp}.{secrets.token_hex(8)}@{DOMAIN}>"


@dataclass
class MailgunApi:
    api_key: str = API_KEY
    domain: str = DOMAIN
    local: LocalApi = field(default_factory=LocalApi)
    accepted: list[Accepted] = field(default_factory=list)
    _failures: list[tuple[int, Any, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.local.route("POST", "/v3/{domain_name}/messages")(self._messages)

    @property
    def url(self) -> str:
        return self.local.url

    @property
    def calls(self) -> list[Call]:
        return self.local.calls

    def __enter__(self) -> MailgunApi:
        self.local.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.local.__exit__(*exc)

    def fail_next(
        self,
        status: int,
        times: int = 1,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next ``times`` good requests with ``status`` and its documented body."""
        documented, documented_headers = DOCUMENTED_ERRORS.get(status, ({"message": "error"}, {}))
        answer = (status, documented if body is None else body, headers or documented_headers)
        self._failures.extend([answer] * times)

    def _authorized(self, request: Request) -> bool:
        expected = base64.b64encode(f"api:{self.api_key}".encode()).decode()
        return request.headers.get("authorization") == f"Basic {expected}"

    async def _messages(self, request: Request) -> Response:
        if not self._authorized(request):
            return PlainTextResponse("Forbidden", 401)
        if request.path_params["domain_name"] != self.domain:
            return JSONResponse({"message": "Domain not found"}, 404)
        try:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "multipart/form-data":
                raise Refused(400, "the request body must be multipart/form-data")
            form = await request.form()
            fields: list[tuple[str, str]] = []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    raise Refused(400, f"{key} parameter must not be a file")
                fields.append((key, value))
            check(fields)
        except Refused as refused:
            return JSONResponse({"message": refused.message}, refused.status)
        if self._failures:
            status, failure, headers = self._failures.pop(0)
            if failure is None:
                return PlainTextResponse("Forbidden", status, headers=headers)
            return JSONResponse(failure, status, headers=headers)
        accepted = Accepted(message_id(), fields)
        self.accepted.append(accepted)
        return JSONResponse({"id": accepted.id, "message": "Queued. Thank you."})


# -- Mailgun's side of its webhooks ---------------------------------------------------------------


def event_data(kind: str, sent: Accepted, **fields: Any) -> dict[str, Any]:
    """An ``event-data`` about ``sent`` shaped as "Webhook Payloads" shows it: the message-id
    header without angle brackets, user variables, the event's own id and timestamp."""
    recipient = parseaddr(sent.get("to") or "")[1]
    return {
        "event": kind,
        "id": base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("="),
        "timestamp": time.time(),
        "log-level": "info",
        "flags": {"is-authenticated": True, "is-test-mode": False},
        "envelope": {"sender": f"bounce@{DOMAIN}", "transport": "smtp", "targets": recipient},
        "message": {
            "headers": {
                "to": recipient,
                "message-id": sent.id.strip("<>"),
                "from": sent.get("from"),
                "subject": sent.get("subject"),
            },
            "attachments": [],
            "size": 4111,
        },
        "recipient": recipient,
        "recipient-domain": recipient.rpartition("@")[2],
        "tags": [],
        "campaigns": [],
        "user-variables": sent.user_variables,
        **fields,
    }


def signature(key: str, timestamp: int | None = None, token: str | None = None) -> dict[str, str]:
    """A ``signature`` object: hex HMAC-SHA256 of timestamp + token under the signing key."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    tok = token or secrets.token_hex(25)  # "Randomly generated string with length of 50"
    digest = hmac.new(key.encode(), (ts + tok).encode(), hashlib.sha256).hexdigest()
    return {"timestamp": ts, "token": tok, "signature": digest}


def webhook(data: dict[str, Any], key: str = SIGNING_KEY, **signed: Any) -> bytes:
    """The body Mailgun POSTs for one event."""
    return json.dumps({"signature": signature(key, **signed), "event-data": data}).encode()
