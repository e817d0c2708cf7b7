"""``sendgrid``: Twilio SendGrid's v3 Mail Send, and its Signed Event Webhook for receipts.

Sending (https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send; SendGrid's
OpenAPI description: https://github.com/twilio/sendgrid-oai, ``spec/yaml/tsg_mail_v3.yaml``).
``POST {KAIKU_SENDGRID_BASE_URL}/v3/mail/send`` (``https://api.eu.sendgrid.com`` for EU
subusers), ``Authorization: Bearer <KAIKU_SENDGRID_API_KEY>``, a JSON body:

- ``personalizations``: one, with ``to`` ``[{"email"}]`` and ``custom_args``
  ``{"invitation_id": ...}``. Custom arguments "will be carried along with the email and its
  activity data": the Event Webhook adds them to every event as top-level fields
  (https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event, "Custom
  Arguments");
- ``from`` ``{"email", "name"}``, parsed from ``KAIKU_EMAIL_FROM`` ("Name <address>");
- ``subject``; ``content``: ``text/plain`` first, then ``text/html`` (SendGrid refuses another
  order, and empty values: "The content value must be a string at least one character in
  length");
- ``headers``: ``Message-ID``, ``List-Unsubscribe``, ``List-Unsubscribe-Post``,
  ``Auto-Submitted`` and ``X-Kaiku-Invitation`` as the rendered message has them. SendGrid
  reserves ``x-sg-id``, ``x-sg-eid``, ``received``, ``dkim-signature``, ``Content-Type``,
  ``Content-Transfer-Encoding``, ``To``, ``From``, ``Subject``, ``Reply-To``, ``CC`` and
  ``BCC``: those are never passed (the request fields set them). Header values must be strings;
  a value folded over lines in the MIME message is sent on one line.

The answer (https://www.twilio.com/docs/sendgrid/api-reference/mail-send/errors,
https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/errors,
https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/rate-limits).
Failed requests carry ``{"errors": [{"field", "message", "help"}]}``.

==============  ==========  =====================================================================
status          outcome     notes
==============  ==========  =====================================================================
202 Accepted    sent        ``provider_message_id``: the ``X-Message-Id`` response header
200 OK          permanent   "valid, but not queued to be delivered" (sandbox mode only)
400             permanent   ``suppress="invalid_recipient"`` when an error's ``field`` is the
                            recipient (``personalizations.to``): "must ... have an email parameter
                            with a valid email address", "The To email exceeds the maximum total
                            length of 320 characters"
401             permanent   the API key is wrong, revoked or lacks the Mail Send permission
403             permanent   "access forbidden": a From address that is not a verified sender
                            identity, or a blocked account
404, 405, 406   permanent   a wrong ``KAIKU_SENDGRID_BASE_URL``
413             permanent   "The JSON payload you have included in your request is too large"
415             permanent   "Invalid UTF8 in request"
429             transient   after ``Retry-After``, else ``X-RateLimit-Reset`` (Unix time)
451             permanent   "Unavailable due to data residency restrictions": the other region's URL
5xx             transient   500 "internal server error", 503 "The SendGrid v3 Web API is not
                            available"
no answer       transient   connection refused, timeout (``channels.http.request``)
==============  ==========  =====================================================================

Receipts (the Event Webhook, https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/
event; security: https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/
getting-started-event-webhook-security-features). SendGrid POSTs a JSON array of events. With
the Signed Event Webhook enabled, ``X-Twilio-Email-Event-Webhook-Signature`` is the base64 of an
ASN.1 DER ECDSA signature of SHA-256 over ``X-Twilio-Email-Event-Webhook-Timestamp`` + the raw
body; the public key (``KAIKU_SENDGRID_EVENT_PUBLIC_KEY``) is the base64 DER
SubjectPublicKeyInfo of an elliptic-curve key (P-256 in SendGrid's SDK test vector) that the
console shows under Mail Settings → Signed Event Webhook Requests. The docs name no tolerance:
kaiku refuses timestamps further than ``KAIKU_SENDGRID_TOLERANCE_SECONDS`` (600) from now.
SendGrid's own SDK test vector (sendgrid-python, ``test/unit/test_eventwebhook.py``) is checked
in the tests. Without a public key the receipt endpoint refuses to start: unsigned events would
let anyone unsubscribe anyone.

=====================================  ===========  ==============================================
event                                  status       suppress
=====================================  ===========  ==============================================
``delivered``                          delivered
``bounce``, ``type`` ``bounce``        bounced      hard_bounce ("could not or would not accept
(or no ``type``)                                    mail to this recipient permanently")
``bounce``, ``type`` ``blocked``       failed       (temporary refusal, not the address's fault)
``dropped``                            failed       by ``reason``: "Bounced Address" hard_bounce,
                                                    "Unsubscribed Address" unsubscribed, "Spam
                                                    Reporting Address" spam_report, "Invalid"
                                                    invalid_recipient; other reasons (spam
                                                    content, an invalid SMTPAPI header, over the
                                                    quota) none (the reasons: the reference's
                                                    "Dropped" row and
                                                    https://docs.sendgrid.com/glossary/drops)
``spamreport``                         complained   spam_report
``unsubscribe``, ``group_unsubscribe`` opted_out    unsubscribed
processed, deferred, open, click,      (skipped)
group_resubscribe, others
=====================================  ===========  ==============================================

The event id is ``sg_event_id`` ("a unique ID to this event that you can use for deduplication
purposes"). ``sg_message_id`` is the message's id after SendGrid split the request per
recipient (``14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0``); the ``X-Message-Id`` of
the send is its part before the first ``.`` (SendGrid support: "X-Message-ID is specific to the
API request prior to messages being broken up individually", filtered as ``msg_id LIKE
'<X-Message-ID>%'``; https://support.sendgrid.com/hc/en-us/articles/35804743679259), so that
prefix is the ``provider_message_id``. An asynchronous bounce has no ``sg_message_id``; the
``invitation_id`` custom argument still names the invitation. An event without ``sg_event_id``
cannot be deduplicated and is skipped (with a warning).

Addresses never reach a log line, an exception or a ``reason``: SendGrid's error messages and
bounce reasons can quote the recipient, so addresses in them are replaced with ``<address>``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import parseaddr
from typing import Any, ClassVar

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.responses import Response

from services.common.webhooks import (
    WebhookRequest,
    json_body,
    malformed,
    require_fresh,
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
from services.dispatcher.config import SendGridSettings

log = logging.getLogger(__name__)

PROVIDER = "sendgrid"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

# "You may not override the following headers" (Mail Send, ``headers``).
RESERVED_HEADERS = frozenset(
    name.lower()
    for name in (
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "Content-Type",
        "Content-Transfer-Encoding",
        "To",
        "From",
        "Subject",
        "Reply-To",
        "CC",
        "BCC",
    )
)
# The error ``field`` of a refused recipient: the docs' ``personalizations.to``; the indexed
# form (``personalizations.0.to.0.email``) is not in the docs but matched too.
_RECIPIENT_FIELD = re.compile(r"^personalizations(?:\.\d+)?\.to(?:\.|$)")
_DIGITS = re.compile(r"^[0-9]{1,12}$")
_MAX_REASON = 300

# ``dropped`` reasons that name the suppression list the address is on ("Drops", "Event Webhook
# Reference"). Compared in lower case.
_DROP_SUPPRESS: dict[str, SuppressReason] = {
    "bounced address": "hard_bounce",
    "unsubscribed address": "unsubscribed",
    "spam reporting address": "spam_report",
    "invalid": "invalid_recipient",
}


def mail_body(message: OutboundEmail) -> dict[str, Any]:
    """The Mail Send request of one email."""
    sender_name, sender_address = parseaddr(message.sender)
    _, to_address = parseaddr(message.to)
    sender: dict[str, str] = {"email": sender_address}
    if sender_name:
        sender["name"] = sender_name
    headers = {
        name: value
        for name, value in channel_http.passed_headers(message)
        if name.lower() not in RESERVED_HEADERS
    }
    content = [
        {"type": kind, "value": value}
        for kind, value in (("text/plain", message.text), ("text/html", message.html))
        if value
    ]
    body: dict[str, Any] = {
        "personalizations": [
            {
                "to": [{"email": to_address or message.to}],
                "custom_args": {"invitation_id": message.invitation_id},
            }
        ],
        "from": sender,
        "subject": message.subject,
        "content": content,
    }
    if headers:
        body["headers"] = headers
    return body


def _errors(response: httpx.Response) -> list[dict[str, Any]]:
    try:
        body = response.json()
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    errors = body.get("errors") if isinstance(body, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def _describe(errors: list[dict[str, Any]]) -> str:
    parts = []
    for error in errors[:3]:
        field = error.get("field")
        message = error.get("message")
        text = str(message) if message is not None else ""
        if isinstance(field, str) and field and field != "null":
            text = f"{field}: {text}"
        parts.append(text)
    return channel_http.redact_addresses("; ".join(p for p in parts if p))


def _rate_limit_reset(response: httpx.Response) -> float | None:
    value = response.headers.get("x-ratelimit-reset")
    try:
        return max(0.0, float(value) - time.time()) if value else None
    except ValueError:
        return None


def classify(response: httpx.Response) -> SendResult:
    """The outcome of SendGrid's answer (the table in the module docstring)."""
    status = response.status_code
    if status == 202:
        return SendResult("sent", provider_message_id=response.headers.get("x-message-id"))
    if status == 200:
        return SendResult(
            "permanent", reason=f"{PROVIDER} 200: valid but not queued (sandbox mode)"
        )
    errors = _errors(response)
    result = channel_http.generic_failure(PROVIDER, response, _describe(errors))
    if status == 429 and result.retry_after is None:
        return replace(result, retry_after=_rate_limit_reset(response))
    if status == 400 and any(
        isinstance(e.get("field"), str) and _RECIPIENT_FIELD.match(e["field"]) for e in errors
    ):
        return replace(result, suppress="invalid_recipient")
    return result


class SendGridEmail(channel_http.HttpProvider):
    """Sends through SendGrid's v3 Mail Send."""

    name = PROVIDER

    def __init__(self, settings: SendGridSettings, http: httpx.AsyncClient | None = None) -> None:
        if settings.api_key is None or not settings.api_key.get_secret_value().strip():
            raise ValueError("the sendgrid provider needs KAIKU_SENDGRID_API_KEY")
        self.settings = settings
        self._url = settings.base_url.rstrip("/") + "/v3/mail/send"
        self._headers = {
            "Authorization": f"Bearer {settings.api_key.get_secret_value().strip()}",
            "Accept": "application/json",
        }
        super().__init__(http, settings.timeout_seconds)

    async def send(self, message: OutboundEmail) -> SendResult:
        answer = await channel_http.request(
            self._http,
            PROVIDER,
            "POST",
            self._url,
            json=mail_body(message),
            headers=self._headers,
        )
        result = answer if isinstance(answer, SendResult) else classify(answer)
        log_outcome(log, PROVIDER, message.invitation_id, result)
        return result


def load_public_key(value: str) -> ec.EllipticCurvePublicKey:
    """The Signed Event Webhook's verification key: base64 DER as the console shows it (a PEM
    block is accepted too)."""
    text = value.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error, TypeError):
        raise ValueError(
            "KAIKU_SENDGRID_EVENT_PUBLIC_KEY is not a public key (expected the base64 "
            "verification key of the Signed Event Webhook)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("KAIKU_SENDGRID_EVENT_PUBLIC_KEY is not an ECDSA (elliptic curve) key")
    return key


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str | int):
        text = str(value).strip()
        return text or None
    return None


def _occurred(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _outcome(event: dict[str, Any]) -> tuple[ReceiptStatus, SuppressReason | None] | None:
    kind = event.get("event")
    if kind == "delivered":
        return "delivered", None
    if kind == "bounce":
        if event.get("type") == "blocked":
            return "failed", None
        return "bounced", "hard_bounce"
    if kind == "dropped":
        reason = event.get("reason")
        key = reason.strip().lower() if isinstance(reason, str) else ""
        return "failed", _DROP_SUPPRESS.get(key)
    if kind == "spamreport":
        return "complained", "spam_report"
    if kind in ("unsubscribe", "group_unsubscribe"):
        return "opted_out", "unsubscribed"
    return None


def receipt(event: dict[str, Any]) -> Receipt | None:
    """The receipt of one event, or None for events that say nothing about delivery."""
    outcome = _outcome(event)
    if outcome is None:
        return None
    status, suppress = outcome
    event_id = _text(event.get("sg_event_id"))
    if event_id is None:
        log.warning("sendgrid: a %s event without sg_event_id is skipped", event.get("event"))
        return None
    message_id = _text(event.get("sg_message_id"))
    reason_parts = [
        str(event[k]) for k in ("type", "status", "reason") if _text(event.get(k)) is not None
    ]
    return Receipt(
        event_id=event_id,
        status=status,
        provider_message_id=message_id.split(".", 1)[0] if message_id else None,
        invitation_id=_text(event.get("invitation_id")),
        reason=channel_http.redact_addresses(f"{event['event']}: {' '.join(reason_parts)}")
        if reason_parts
        else None,
        suppress=suppress,
        occurred_at=_occurred(event.get("timestamp")),
    )


class SendGridReceipts:
    """SendGrid's Event Webhook, signed (the Signed Event Webhook must be enabled)."""

    name: ClassVar[str] = PROVIDER
    CONTENT_TYPES: ClassVar[tuple[str, ...]] = ("application/json",)

    def __init__(self, settings: SendGridSettings) -> None:
        if not settings.event_public_key or not settings.event_public_key.strip():
            raise ValueError(
                "sendgrid receipts need KAIKU_SENDGRID_EVENT_PUBLIC_KEY (Mail Settings → Signed "
                "Event Webhook Requests): unsigned events are refused"
            )
        self.settings = settings
        self._key = load_public_key(settings.event_public_key)

    def verify(self, request: WebhookRequest) -> None:
        signature = request.headers.get(SIGNATURE_HEADER)
        timestamp = request.headers.get(TIMESTAMP_HEADER)
        if not (signature and timestamp):
            raise unauthorized(f"{SIGNATURE_HEADER} and {TIMESTAMP_HEADER} are required")
        timestamp = timestamp.strip()
        if not _DIGITS.match(timestamp):
            raise unauthorized(f"{TIMESTAMP_HEADER} is not a Unix time in seconds")
        require_fresh(
            int(timestamp), request.received_at, self.settings.tolerance_seconds, TIMESTAMP_HEADER
        )
        try:
            der = base64.b64decode(signature.strip(), validate=True)
        except binascii.Error:
            raise unauthorized(f"{SIGNATURE_HEADER} is not base64") from None
        try:
            self._key.verify(der, timestamp.encode() + request.body, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise unauthorized(f"{SIGNATURE_HEADER} does not match the body") from None

    def receipts(self, request: WebhookRequest) -> list[Receipt]:
        events = json_body(request)
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise malformed("expected a JSON array of SendGrid events")
        found = []
        for event in events:
            r = receipt(event)
            if r is not None:
                found.append(r)
        return found

    def acknowledge(self) -> Response | None:
        return None

    def replay_token(self, request: WebhookRequest) -> tuple[str, float] | None:
        return None  # the signature covers the request: a replay repeats its events
