"""The ``webhook`` channel: each rendered invitation is POSTed as JSON to your own system.

For a company that sends through its own messaging platform: ``KAIKU_SEND_WEBHOOK_URL``
receives the invitation, signed the Standard Webhooks way (https://www.standardwebhooks.com)
with ``KAIKU_SEND_WEBHOOK_SECRET`` (``whsec_`` + base64, or any string; several comma-separated
while a secret is rotated). The ``webhook-id`` header is the invitation id, the same on every
retry, so the receiver can recognise a repeat and send once. One channel serves both kinds of
message.

An email::

    {"type": "invitation.email", "invitation_id": "...", "survey_id": "...",
     "customer_id": "...", "locale": "fi", "to": "maija@example.com", "subject": "...",
     "text": "...", "html": "...", "headers": {"Message-ID": "...", "List-Unsubscribe": "...",
     ...}}

An SMS::

    {"type": "invitation.sms", "invitation_id": "...", "survey_id": "...", "customer_id": "...",
     "locale": "fi", "to": "+358401234567", "body": "...", "encoding": "GSM-7", "segments": 1}

The answer:

=========================  =========  ==============================================
status                     outcome    notes
=========================  =========  ==============================================
2xx                        sent       ``provider_message_id``: the ``id`` of a JSON
                                      answer, else the invitation id
408, 425, 429, 5xx         transient  after ``Retry-After`` when the answer has one
no answer, timeout         transient
410 Gone                   permanent  no suppression (see below)
any other 3xx or 4xx       permanent  no suppression, unless the JSON answer names
                                      one: ``{"suppress": "unsubscribed"}``
=========================  =========  ==============================================

410 does not suppress the recipient. In HTTP (RFC 9110, 15.5.11) 410 says the *target
resource*, the endpoint, is gone for good (a receiver that was removed), not that the customer
opted out: reading it as an opt-out would unsubscribe every customer a retired endpoint
answered. A
receiver that knows the recipient must not be contacted again says so explicitly with a 4xx
(422, say) and ``{"suppress": "<reason>"}``, one of ``invalid_recipient``, ``unsubscribed``,
``hard_bounce``, ``spam_report`` or ``stop``; kaiku then records an opt-out.
Redirects are not followed (a redirect would carry a signed invitation somewhere else).
"""

from __future__ import annotations

import json
import logging
from typing import Any, get_args
from urllib.parse import urlsplit

import httpx

from services.common.webhooks import standard_headers, standard_secret_key
from services.dispatcher.channels import (
    OutboundEmail,
    OutboundSms,
    SendResult,
    SuppressReason,
    http,
    log_outcome,
)
from services.dispatcher.config import WebhookChannelSettings

log = logging.getLogger(__name__)

PROVIDER = "webhook"
_SUPPRESS: dict[str, SuppressReason] = {reason: reason for reason in get_args(SuppressReason)}


def email_payload(message: OutboundEmail) -> dict[str, Any]:
    return {
        "type": "invitation.email",
        "invitation_id": message.invitation_id,
        "survey_id": message.survey_id,
        "customer_id": message.customer_id,
        "locale": message.locale,
        "to": message.to,
        "subject": message.subject,
        "text": message.text,
        "html": message.html,
        "headers": dict(message.headers),
    }


def sms_payload(message: OutboundSms) -> dict[str, Any]:
    return {
        "type": "invitation.sms",
        "invitation_id": message.invitation_id,
        "survey_id": message.survey_id,
        "customer_id": message.customer_id,
        "locale": message.locale,
        "to": message.to,
        "body": message.body,
        "encoding": message.encoding,
        "segments": message.segments,
    }


def classify(response: httpx.Response, invitation_id: str) -> SendResult:
    """The outcome of the receiver's answer (the table in the module docstring)."""
    status = response.status_code
    if 200 <= status < 300:
        body = http.json_body(response)
        given = body.get("id") if isinstance(body, dict) else None
        if isinstance(given, int) and not isinstance(given, bool):
            given = str(given)
        message_id = given if isinstance(given, str) and given else invitation_id
        return SendResult("sent", provider_message_id=message_id)
    if status == 410:
        return SendResult("permanent", reason=f"{PROVIDER} 410: the receiving endpoint is gone")
    result = http.generic_failure(PROVIDER, response)
    if result.outcome == "permanent":
        body = http.json_body(response)
        named = body.get("suppress") if isinstance(body, dict) else None
        suppress = _SUPPRESS.get(named) if isinstance(named, str) else None
        if suppress is not None:
            return SendResult(
                "permanent",
                reason=f"{PROVIDER} {status}: the receiver suppressed the recipient ({suppress})",
                suppress=suppress,
            )
    return result


class WebhookChannel(http.HttpProvider):
    """Posts emails and SMS alike: it is a ``Provider[OutboundEmail]`` and a
    ``Provider[OutboundSms]``."""

    name = PROVIDER

    def __init__(self, settings: WebhookChannelSettings) -> None:
        if not settings.url:
            raise ValueError("the webhook channel needs KAIKU_SEND_WEBHOOK_URL")
        if urlsplit(settings.url).scheme not in ("http", "https"):
            raise ValueError("KAIKU_SEND_WEBHOOK_URL must be an http:// or https:// URL")
        secret = settings.secret.get_secret_value() if settings.secret is not None else ""
        if not secret.strip(", "):
            raise ValueError("the webhook channel needs KAIKU_SEND_WEBHOOK_SECRET")
        for part in secret.split(","):
            if part.strip():
                try:
                    standard_secret_key(part.strip())
                except ValueError:
                    # Named by its setting; nothing of the value, nor a chained error.
                    raise ValueError(
                        "KAIKU_SEND_WEBHOOK_SECRET: a whsec_ secret must be followed by base64"
                    ) from None
        self.settings = settings
        self._url = settings.url
        self._secret = secret
        super().__init__(None, settings.timeout_seconds)

    async def send(self, message: OutboundEmail | OutboundSms) -> SendResult:
        if isinstance(message, OutboundEmail):
            payload = email_payload(message)
        else:
            payload = sms_payload(message)
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        headers = standard_headers(self._secret, message.invitation_id, body)
        answer = await http.request(
            self._http, PROVIDER, "POST", self._url, content=body, headers=headers
        )
        if isinstance(answer, SendResult):
            result = answer
        else:
            result = classify(answer, message.invitation_id)
        log_outcome(log, PROVIDER, message.invitation_id, result)
        return result
