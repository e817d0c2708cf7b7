"""Providers behind one small Protocol: ``async def send(message) -> SendResult``.

One module per provider. An email provider takes an ``OutboundEmail`` (the rendered parts, the
headers every invitation carries, and the whole MIME message for SMTP and the outbox); an SMS
provider takes an ``OutboundSms``. A provider never raises for a refused or failed send: it
classifies the outcome as its documentation describes it:

- ``sent``: the provider accepted the message (``provider_message_id`` is its id, used to match
  delivery receipts later);
- ``transient``: try again later (rate limits, 5xx, timeouts); ``retry_after`` when the provider
  said how long to wait;
- ``permanent``: never retry; ``suppress`` names why the contact point must not be used again
  (an invalid number, an unsubscribed recipient, a hard bounce), which becomes an opt-out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from typing import ClassVar, Literal, Protocol, TypeVar

from fastapi.responses import Response

from services.common.webhooks import WebhookRequest

Outcome = Literal["sent", "transient", "permanent"]
# Why a permanent failure means the contact point must not be used again.
SuppressReason = Literal["invalid_recipient", "unsubscribed", "hard_bounce", "spam_report", "stop"]


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    provider_message_id: str | None = None
    reason: str | None = None
    suppress: SuppressReason | None = None
    retry_after: float | None = None


@dataclass(frozen=True)
class OutboundEmail:
    invitation_id: str
    sender: str  # "Name <address>"
    to: str
    subject: str
    text: str
    html: str
    # Message-ID, Date, List-Unsubscribe, List-Unsubscribe-Post, Auto-Submitted, ... exactly as
    # in ``message``; HTTP APIs pass the ones they allow as custom headers.
    headers: dict[str, str]
    message: EmailMessage  # the whole MIME message (SMTP, the file outbox)
    locale: str = "en"
    survey_id: str = ""
    customer_id: str = ""


@dataclass(frozen=True)
class OutboundSms:
    invitation_id: str
    to: str  # E.164, validated
    body: str
    encoding: Literal["GSM-7", "UCS-2"] = "GSM-7"
    segments: int = 1
    sender: str | None = None  # alphanumeric sender id or number; the provider's default if None
    locale: str = "en"
    survey_id: str = ""
    customer_id: str = ""
    extra: dict[str, str] = field(default_factory=dict)


M_contra = TypeVar("M_contra", contravariant=True)


class Provider(Protocol[M_contra]):
    """A way to send one kind of message."""

    name: str

    async def send(self, message: M_contra) -> SendResult: ...

    async def aclose(self) -> None: ...


def log_outcome(
    logger: logging.Logger, provider: str, invitation_id: str, result: SendResult
) -> None:
    """One line per send at the provider: debug when accepted, info otherwise (the reason is
    already free of addresses and numbers)."""
    if result.outcome == "sent":
        logger.debug("%s: invitation %s accepted", provider, invitation_id)
    else:
        logger.info(
            "%s: invitation %s %s: %s", provider, invitation_id, result.outcome, result.reason
        )


EmailProvider = Provider[OutboundEmail]
SmsProvider = Provider[OutboundSms]


# -- delivery receipts: POST /v1/provider-events/{provider} ---------------------------------------

# What a provider reported about a message it took: ``delivered`` (reached the handset or the
# receiving mail server), ``failed`` (gave up, not the recipient's fault or not known to be),
# ``bounced`` (hard bounce), ``complained`` (spam report), ``opted_out`` (the recipient asked to
# stop: SMS STOP, a provider-level unsubscribe).
ReceiptStatus = Literal["delivered", "failed", "bounced", "complained", "opted_out"]


@dataclass(frozen=True)
class Receipt:
    # The provider's unique id of this event (its retries repeat it): the idempotency key.
    event_id: str
    status: ReceiptStatus
    # Which message: the provider's id from the send, and/or our invitation id where the provider
    # echoes custom arguments back.
    provider_message_id: str | None = None
    invitation_id: str | None = None
    # An inbound STOP names only the phone number that wrote: the dispatcher finds the customer
    # from its own sends. Never logged.
    contact: str | None = field(default=None, repr=False)
    reason: str | None = None
    # Set when the contact point must not be used again (hard bounce, spam report, STOP).
    suppress: SuppressReason | None = None
    occurred_at: datetime | None = None


class ReceiptSource(Protocol):
    """One provider's delivery-receipt and inbound webhooks."""

    name: ClassVar[str]
    # Content types the provider posts (anything else is 415).
    CONTENT_TYPES: ClassVar[tuple[str, ...]]

    def verify(self, request: WebhookRequest) -> None:
        """Raise ``WebhookError`` (401) unless the request is authentic (and fresh, where the
        provider's scheme allows checking it)."""

    def receipts(self, request: WebhookRequest) -> list[Receipt]:
        """The receipts in one request (SendGrid batches them); events that say nothing about
        delivery (opens, clicks, queued) are left out. ``malformed`` (400) on bad bodies."""

    def acknowledge(self) -> Response | None:
        """A provider-specific answer (Twilio wants TwiML for an inbound message); None for the
        JSON default."""

    def replay_token(self, request: WebhookRequest) -> tuple[str, float] | None:
        """For a scheme whose signature does not cover the body (Mailgun signs a timestamp and
        a token only): the verified request's one-use token and how many seconds it must be
        remembered; the token seen before with another body is a reused signature and refused
        (with the same body: a retry, its events stored once). None where the signature covers
        what the request says (a replay then repeats the same events, stored once)."""
