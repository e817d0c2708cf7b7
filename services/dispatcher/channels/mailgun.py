"""``mailgun``: Mailgun's Messages API, and its signed webhooks for delivery receipts.

Sending (https://documentation.mailgun.com/docs/mailgun/api-reference/send/mailgun/messages/
post-v3--domain-name--messages; the same OpenAPI description ships in mailgun/mailgun-mcp-server,
``src/openapi.yaml``). ``POST {KAIKU_MAILGUN_BASE_URL}/v3/{KAIKU_MAILGUN_DOMAIN}/messages``
(``https://api.eu.mailgun.net`` for EU domains), HTTP Basic authentication with the user name
``api`` and the API key as the password
(https://documentation.mailgun.com/en/latest/api-intro.html#authentication), a
``multipart/form-data`` body (the only request body the API describes):

- ``from`` (``KAIKU_EMAIL_FROM``, "Name <address>" as it is), ``to``, ``subject``, ``text``,
  ``html``;
- ``h:<Header>`` "allows to append a custom MIME header to the message": ``h:Message-ID``,
  ``h:List-Unsubscribe``, ``h:List-Unsubscribe-Post``, ``h:Auto-Submitted`` and
  ``h:X-Kaiku-Invitation``, unfolded;
- ``v:invitation_id``: a user variable, which Mailgun adds to every event of the message
  (``user-variables`` in the webhook payload). "Send options (parameters starting with o:, h:,
  v:, or t:) are limited to 16KB total."

The answer: ``200 {"id": "<...>", "message": "Queued. Thank you."}``; failures carry
``{"message": "..."}`` (401 answers the bare string ``Forbidden``). Codes from the endpoint's
description and "API Response Codes"
(https://documentation.mailgun.com/docs/mailgun/quickstart-guide/responses):

==========  ==========  ===========================================================================
status      outcome     notes
==========  ==========  ===========================================================================
200         sent        ``provider_message_id``: ``id`` without its angle brackets
400         permanent   ``suppress="invalid_recipient"`` for "to parameter is not a valid address";
                        otherwise a request Mailgun will never take ("from parameter is missing",
                        "Send options ... are limited to 16KB total", ...)
401, 403    permanent   the API key is wrong, or may not send for the domain ("Forbidden", "Auth
                        error or access denied")
402         permanent   "Request Failed - Parameters were valid but request failed" (older docs)
404         transient   with a JSON answer: "this one can be temporal as our system is an
                        eventually-consistent system"; permanent without one ("a sign that there
                        was a mistake in the API request, such as a non-existing endpoint")
other 4xx   permanent   (``channels.http.generic_failure``: 408 and 425 are transient)
429         transient   after ``Retry-After``, else the "try again after N seconds" of the message
5xx         transient   "Retries are recommended with exponential or logarithmic retry intervals"
no answer   transient   connection refused, timeout (``channels.http.request``)
==========  ==========  ===========================================================================

Receipts (webhooks: https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/
webhooks; payloads: .../webhooks/webhook-payloads; signature: .../webhooks/securing-webhooks).
Mailgun POSTs ``application/json``: ``{"signature": {"timestamp", "token", "signature"},
"event-data": {...}}``, one event per request. The signature is the hex HMAC-SHA256 of
``timestamp`` + ``token`` (no separator) under the HTTP webhook signing key
(``KAIKU_MAILGUN_WEBHOOK_SIGNING_KEY``, separate from the API key; several comma-separated while
one is rotated). For a subaccount's domain Mailgun adds ``parent-signature``, the same made with
the primary account's key: either is accepted. The docs suggest checking "the timestamp is not
too far from the current time", without aggressiveness, because of delays in webhook processing:
``KAIKU_MAILGUN_TOLERANCE_SECONDS`` (600). Mailgun retries anything but 200 and 406 for hours
(https://help.mailgun.com/hc/en-us/articles/202236504-Webhooks); a refused (401) or malformed
(400) request is therefore retried, and receipts are idempotent on the event id. The signature
does not cover the event, so a signature seen once would carry any event-data while its timestamp
is fresh: as the docs advise, a token seen before is refused (401) when it comes with another
body; the same body again is taken as a retry (its receipts are stored once). Tokens are
remembered with their body's SHA-256 in ``dispatcher_webhook_tokens`` for twice the tolerance,
in the transaction that stores the request's receipts.

=======================================  ===========  ========================================
event-data                               status       suppress
=======================================  ===========  ========================================
``delivered``                            delivered
``failed``, ``severity`` ``permanent``:
  ``reason`` ``bounce``                  bounced      hard_bounce
  ``reason`` ``suppress-bounce``         failed       hard_bounce (on the bounce list)
  ``reason`` ``suppress-unsubscribe``    failed       unsubscribed
  ``reason`` ``suppress-complaint``      failed       spam_report
  any other reason (``old``: soft        failed       (none: "Soft bounces ... and other
  bounces until Mailgun gave up;                      failures ... are not added to the
  ``generic``)                                        [bounce] list")
``failed``, ``severity`` ``temporary``   (skipped: Mailgun retries the delivery itself)
``complained``                           complained   spam_report
``unsubscribed``                         opted_out    unsubscribed
accepted, opened, clicked, others        (skipped)
=======================================  ===========  ========================================

The ``reason`` values are those of Mailgun's payload examples ("Tracking Failures",
https://documentation.mailgun.com/docs/mailgun/user-manual/tracking-messages/tracking-failures,
says a message to an address on a "Do Not Send" list is dropped with a permanent failure); the
docs give no complete list of them, so an unknown reason suppresses nothing.

The event id is ``event-data.id``, which belongs to the event, not to one delivery of the
webhook (the token cannot serve: the docs suggest refusing a token seen before, so each request,
a retry too, must carry a new one).
``event-data.message.headers.message-id`` carries the id without angle brackets, the send's
``id`` with them: both are stored without, so they match. ``invitation_id`` is the
``invitation_id`` user variable; ``occurred_at`` the event's ``timestamp`` (seconds, with a
fraction). Addresses never reach a log line, an exception or a ``reason``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
from fastapi.responses import Response

from services.common.webhooks import (
    WebhookRequest,
    hmac_digest,
    json_body,
    malformed,
    require_fresh,
    required_signing_keys,
    same,
    unauthorized,
)
from services.dispatcher.channels import (
    OutboundEmail,
    Receipt,
    ReceiptStatus,
    SendResult,
    SuppressReason,
    log_outcome,
)
from services.dispatcher.channels import http as channel_http
from services.dispatcher.config import MailgunSettings

log = logging.getLogger(__name__)

PROVIDER = "mailgun"

_INVALID_RECIPIENT = re.compile(r"\bto\b.{0,12}\bis not a valid address", re.IGNORECASE)
_TRY_AGAIN = re.compile(r"try again after (\d{1,6}) seconds", re.IGNORECASE)
_DIGITS = re.compile(r"^[0-9]{1,12}$")
_MAX_REASON = 300

_PERMANENT: dict[str, tuple[ReceiptStatus, SuppressReason | None]] = {
    "bounce": ("bounced", "hard_bounce"),
    "suppress-bounce": ("failed", "hard_bounce"),
    "suppress-unsubscribe": ("failed", "unsubscribed"),
    "suppress-complaint": ("failed", "spam_report"),
}


def message_id(value: Any) -> str | None:
    """A Mailgun message id as kaiku stores it: without the angle brackets."""
    if not isinstance(value, str):
        return None
    text = value.strip().removeprefix("<").removesuffix(">").strip()
    return text or None


def form_fields(message: OutboundEmail) -> list[tuple[str, str]]:
    """The form fields of one email, in the order of the API description."""
    fields = [
        ("from", message.sender),
        ("to", message.to),
        ("subject", message.subject),
    ]
    if message.text:
        fields.append(("text", message.text))
    if message.html:
        fields.append(("html", message.html))
    # The rendered message's own headers, as Mailgun's ``h:`` custom headers.
    fields.extend((f"h:{name}", value) for name, value in channel_http.passed_headers(message))
    fields.append(("v:invitation_id", message.invitation_id))
    return fields


def classify(response: httpx.Response) -> SendResult:
    """The outcome of Mailgun's answer (the table in the module docstring)."""
    status = response.status_code
    body = channel_http.json_body(response)
    said = body.get("message") if isinstance(body, dict) else body
    # Not JSON: the bare text (401 answers "Forbidden").
    text = said if isinstance(said, str) else "" if body is not None else response.text[:200]
    if status == 200:
        given = body.get("id") if isinstance(body, dict) else None
        return SendResult("sent", provider_message_id=message_id(given))
    detail = channel_http.redact_addresses(text)
    if status == 404 and isinstance(body, dict):
        return SendResult(
            "transient",
            reason=f"{PROVIDER} 404: {detail or 'not found'} (maybe not yet consistent)",
            retry_after=channel_http.retry_after(response),
        )
    result = channel_http.generic_failure(PROVIDER, response, detail)
    if status == 429 and result.retry_after is None:
        wait = _TRY_AGAIN.search(text)
        if wait:
            return replace(result, retry_after=float(wait.group(1)))
    if status == 400 and _INVALID_RECIPIENT.search(text):
        return replace(result, suppress="invalid_recipient")
    return result


class MailgunEmail(channel_http.HttpProvider):
    """Sends through Mailgun's Messages API."""

    name = PROVIDER

    def __init__(self, settings: MailgunSettings, http: httpx.AsyncClient | None = None) -> None:
        if settings.api_key is None or not settings.api_key.get_secret_value().strip():
            raise ValueError("the mailgun provider needs KAIKU_MAILGUN_API_KEY")
        if not settings.domain or not settings.domain.strip():
            raise ValueError("the mailgun provider needs KAIKU_MAILGUN_DOMAIN (the sending domain)")
        self.settings = settings
        domain = quote(settings.domain.strip(), safe="")
        self._url = f"{settings.base_url.rstrip('/')}/v3/{domain}/messages"
        self._auth = httpx.BasicAuth("api", settings.api_key.get_secret_value().strip())
        super().__init__(http, settings.timeout_seconds)

    async def send(self, message: OutboundEmail) -> SendResult:
        # (name, (None, value)): multipart/form-data fields without a file name.
        files = [(name, (None, value)) for name, value in form_fields(message)]
        answer = await channel_http.request(
            self._http,
            PROVIDER,
            "POST",
            self._url,
            files=files,
            auth=self._auth,
            headers={"Accept": "application/json"},
        )
        result = answer if isinstance(answer, SendResult) else classify(answer)
        log_outcome(log, PROVIDER, message.invitation_id, result)
        return result


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    return text or None


def _occurred(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _outcome(data: dict[str, Any]) -> tuple[ReceiptStatus, SuppressReason | None] | None:
    kind = data.get("event")
    if kind == "delivered":
        return "delivered", None
    if kind == "failed":
        if data.get("severity") != "permanent":
            return None  # temporary: Mailgun tries again, and reports the end of it
        reason = data.get("reason")
        return _PERMANENT.get(reason if isinstance(reason, str) else "", ("failed", None))
    if kind == "complained":
        return "complained", "spam_report"
    if kind == "unsubscribed":
        return "opted_out", "unsubscribed"
    return None


def _reason(data: dict[str, Any]) -> str | None:
    parts = []
    if _text(data.get("reason")):
        parts.append(str(data["reason"]))
    status = data.get("delivery-status")
    if isinstance(status, dict):
        for key in ("code", "description", "message"):
            if _text(status.get(key)) and str(status[key]) not in parts:
                parts.append(str(status[key]))
    return channel_http.redact_addresses(f"{data['event']}: {' '.join(parts)}") if parts else None


def receipt(data: dict[str, Any]) -> Receipt | None:
    """The receipt of one event, or None for events that say nothing about delivery."""
    outcome = _outcome(data)
    if outcome is None:
        return None
    status, suppress = outcome
    event_id = _text(data.get("id"))
    if event_id is None:
        log.warning("mailgun: a %s event without an id is skipped", data.get("event"))
        return None
    message = data.get("message")
    headers = message.get("headers") if isinstance(message, dict) else None
    variables = data.get("user-variables")
    invitation = variables.get("invitation_id") if isinstance(variables, dict) else None
    return Receipt(
        event_id=event_id,
        status=status,
        provider_message_id=message_id(headers.get("message-id"))
        if isinstance(headers, dict)
        else None,
        invitation_id=_text(invitation),
        reason=_reason(data),
        suppress=suppress,
        occurred_at=_occurred(data.get("timestamp")),
    )


class MailgunReceipts:
    """Mailgun's webhooks (the current, JSON ones; not the legacy form-encoded webhooks)."""

    name: ClassVar[str] = PROVIDER
    CONTENT_TYPES: ClassVar[tuple[str, ...]] = ("application/json",)

    def __init__(self, settings: MailgunSettings) -> None:
        self._keys = required_signing_keys(
            settings.webhook_signing_key,
            "KAIKU_MAILGUN_WEBHOOK_SIGNING_KEY",
            " (the HTTP webhook signing key): unsigned events are refused",
        )
        self.settings = settings

    def verify(self, request: WebhookRequest) -> None:
        try:
            body = json.loads(request.body)
        except (ValueError, RecursionError):  # not UTF-8 or JSON, too long a number, too deep
            raise unauthorized("the body is not JSON, so it carries no Mailgun signature") from None
        block = body.get("signature") if isinstance(body, dict) else None
        if not isinstance(block, dict):
            raise unauthorized("the body has no signature object")
        timestamp = _text(block.get("timestamp"))
        token = block.get("token")
        given = [block.get(k) for k in ("signature", "parent-signature")]
        signatures = [s.strip().lower() for s in given if isinstance(s, str) and s.strip()]
        if timestamp is None or not isinstance(token, str) or not token or not signatures:
            raise unauthorized(
                "signature.timestamp, signature.token and signature.signature are required"
            )
        if not _DIGITS.match(timestamp):
            raise unauthorized("signature.timestamp is not a Unix time in seconds")
        require_fresh(
            int(timestamp),
            request.received_at,
            self.settings.tolerance_seconds,
            "signature.timestamp",
        )
        signed = (timestamp + token).encode()
        for key in self._keys:
            expected = hmac_digest(key, signed).hex()
            if any(same(candidate, expected) for candidate in signatures):
                return
        raise unauthorized("signature.signature does not match the timestamp and token")

    def receipts(self, request: WebhookRequest) -> list[Receipt]:
        body = json_body(request)
        data = body.get("event-data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("event"), str):
            raise malformed('expected {"signature": {...}, "event-data": {"event": ...}}')
        found = receipt(data)
        return [found] if found is not None else []

    def acknowledge(self) -> Response | None:
        return None

    def replay_token(self, request: WebhookRequest) -> tuple[str, float] | None:
        """The signature covers only the timestamp and the token, so the token is what makes it
        one-use (Mailgun's docs advise refusing a token seen before). Remembered while its
        timestamp is fresh (and as long again, for clocks apart); older, the timestamp check
        refuses it."""
        block = json_body(request).get("signature")
        assert isinstance(block, dict)  # verify() has passed
        return str(block["token"]), 2 * self.settings.tolerance_seconds
