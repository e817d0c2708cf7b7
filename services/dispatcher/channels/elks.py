"""``46elks``: SMS through the 46elks API, its delivery reports and inbound STOPs.

Sending (https://46elks.com/docs/send-sms): ``POST {base_url}/a1/sms`` with HTTP Basic
``API username:API password`` (``KAIKU_46ELKS_USERNAME``, ``KAIKU_46ELKS_PASSWORD``) and an
``application/x-www-form-urlencoded`` body: ``from`` (required: a text sender id or an E.164 number;
``KAIKU_SMS_FROM``), ``to`` (E.164), ``message`` and ``whendelivered`` (the delivery-report URL).
The answer is the SMS object (https://46elks.com/docs/show-sms-id): ``id`` (the provider message id
the reports repeat), ``status`` ``created`` (received by 46elks), ``sent``, ``delivered`` or
``failed``, ``parts``, ``cost`` … A text sender id (https://46elks.com/kb/text-sender-id: A–Z, a–z,
0–9, 3–11 characters, not starting with a digit) cannot receive replies: inbound STOP needs a
46elks number as the sender.

Errors: 46elks documents no error codes or bodies (errors come back as short plain text, which may
repeat the number: it is redacted before it becomes a reason). So the shared rule decides: 408, 429
and 5xx are transient (with ``Retry-After``), any other 4xx is permanent and suppresses nothing —
from the status alone kaiku cannot tell an invalid number from a wrong sender or an empty account
("once your balance reaches 0, any API call that would result in your account being charged will
fail", https://46elks.com/faq). No connection or a timeout is transient.

Callbacks. 46elks signs nothing. Its delivery-report docs
(https://46elks.com/docs/sms-delivery-reports) say: "You may use Basic Auth by using the
https://username:password@yourserver.example url format". So ``whendelivered`` is kaiku's
``…/v1/provider-events/46elks`` with userinfo ``kaiku:{KAIKU_46ELKS_CALLBACK_SECRET}``, and
``verify`` wants those HTTP Basic credentials (constant-time). Basic credentials rather than a
query parameter (also documented) keep the secret out of access logs. The secret must be URL-safe
(``A–Z a–z 0–9 . _ ~ -``, e.g. ``openssl rand -hex 32``). Set the number's ``sms_url``
(https://46elks.com/docs/receive-sms) to the same URL with the same userinfo for inbound STOPs.
Both arrive as ``application/x-www-form-urlencoded`` POSTs and are retried "for at least 6 hours"
unless answered 200–204:

- delivery reports: ``id``, ``status`` (``sent``, ``delivered`` or ``failed``) and ``delivered``
  (UTC, only when delivered). ``delivered`` → ``delivered``, ``failed`` → ``failed`` (no reason is
  given, so nothing is suppressed); ``sent`` is skipped. ``event_id`` is ``{id}:{status}``.
- incoming SMS: ``id``, ``direction=incoming``, ``from``, ``to``, ``message``, ``created``. A
  message that is only an opt-out keyword (``KAIKU_46ELKS_OPT_OUT_KEYWORDS``, default ``STOP``;
  46elks documents no opt-out keywords of its own, and none for Swedish or Finnish — add ``LOPETA``
  or ``SLUTA`` there if your recipients use them) is ``opted_out`` with ``suppress="stop"`` and
  ``contact`` = ``from``; anything else makes no receipt. ``event_id`` is the SMS ``id``.

46elks sends the body of the answer to an incoming SMS back to the sender as a reply ("You can
optionally reply to the SMS directly in your webhook response"), so ``acknowledge`` answers
``204 No Content``: no reply, and in the 200–204 range that stops 46elks' retries.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import ClassVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx
from fastapi.responses import Response

from services.common.webhooks import WebhookRequest, malformed, verify_shared_secret
from services.dispatcher.channels import OutboundSms, Receipt, SendResult
from services.dispatcher.channels.http import (
    HttpProvider,
    generic_failure,
    json_object,
    redact_numbers,
    request,
)
from services.dispatcher.config import ElksSettings

log = logging.getLogger(__name__)

NAME = "46elks"
FORM = "application/x-www-form-urlencoded"
# The username of the HTTP Basic credentials in the callback URLs given to 46elks.
CALLBACK_USER = "kaiku"
_URL_SAFE = re.compile(r"^[A-Za-z0-9._~-]+$")


def _secret(settings: ElksSettings) -> str | None:
    if settings.callback_secret is None:
        return None
    secret = settings.callback_secret.get_secret_value()
    if not _URL_SAFE.match(secret):
        raise ValueError(
            "KAIKU_46ELKS_CALLBACK_SECRET may contain only A-Z a-z 0-9 . _ ~ - "
            "(it is the password in the callback URL given to 46elks)"
        )
    return secret


def callback_url(url: str, secret: str) -> str:
    """``url`` with ``kaiku:{secret}@`` as userinfo, the way 46elks documents Basic Auth."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the 46elks delivery-report URL must be an absolute http(s) URL")
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{CALLBACK_USER}:{secret}@{netloc}"))


class ElksSms(HttpProvider):
    """Sends one SMS per call through ``POST /a1/sms``."""

    name = NAME

    def __init__(
        self,
        settings: ElksSettings,
        *,
        sender: str | None,
        delivery_report_url: str | None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if not settings.username:
            raise ValueError("KAIKU_46ELKS_USERNAME is not set")
        if settings.password is None or not settings.password.get_secret_value():
            raise ValueError("KAIKU_46ELKS_PASSWORD is not set")
        if not sender:
            raise ValueError("46elks needs a sender ('from'): set KAIKU_SMS_FROM")
        secret = _secret(settings)
        if delivery_report_url and secret is None:
            raise ValueError(
                "KAIKU_46ELKS_CALLBACK_SECRET is not set: 46elks does not sign delivery reports, "
                "so kaiku puts this secret into the report URL and refuses reports without it"
            )
        self.settings = settings
        self.sender = sender
        self._whendelivered = (
            callback_url(delivery_report_url, secret)
            if delivery_report_url and secret is not None
            else None
        )
        self._auth = httpx.BasicAuth(settings.username, settings.password.get_secret_value())
        self._url = f"{settings.base_url.rstrip('/')}/a1/sms"
        super().__init__(http, settings.timeout_seconds)

    def form(self, message: OutboundSms) -> dict[str, str]:
        """The send parameters, as 46elks documents them."""
        data = {"from": message.sender or self.sender, "to": message.to, "message": message.body}
        if self._whendelivered:
            data["whendelivered"] = self._whendelivered
        return data

    async def send(self, message: OutboundSms) -> SendResult:
        answer = await request(
            self._http, NAME, "POST", self._url, data=self.form(message), auth=self._auth
        )
        if isinstance(answer, SendResult):
            return answer
        if not answer.is_success:
            detail = redact_numbers(answer.text) if answer.text.strip() else ""
            return generic_failure(NAME, answer, detail)
        body = json_object(answer)
        sms_id = body.get("id")
        status = body.get("status")
        if status == "failed":
            return SendResult("permanent", reason=f"46elks {answer.status_code}: failed")
        if not isinstance(sms_id, str) or not sms_id:
            log.warning("46elks answered %s without an SMS id", answer.status_code)
            return SendResult("sent", reason=f"46elks {answer.status_code} without an id")
        return SendResult("sent", provider_message_id=sms_id)


# -- callbacks: POST /v1/provider-events/46elks ---------------------------------------------------


def _form(request: WebhookRequest) -> dict[str, str]:
    try:
        pairs = parse_qsl(request.body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise malformed(
            "the body is not a UTF-8 form (application/x-www-form-urlencoded)"
        ) from None
    params: dict[str, str] = {}
    for name, value in pairs:
        params.setdefault(name, value)
    return params


def _utc(value: str | None) -> datetime | None:
    """46elks times ("2018-07-13T13:57:23.741000", UTC)."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _keyword(text: str) -> str:
    return text.strip().rstrip(".!").strip().upper()


class ElksReceipts:
    """Delivery reports (``whendelivered``) and incoming SMS (``sms_url``) from 46elks."""

    name: ClassVar[str] = NAME
    CONTENT_TYPES: ClassVar[tuple[str, ...]] = (FORM,)

    def __init__(self, settings: ElksSettings) -> None:
        secret = _secret(settings)
        if secret is None:
            raise ValueError(
                "KAIKU_46ELKS_CALLBACK_SECRET is not set: 46elks does not sign its callbacks"
            )
        self._secret = secret
        self.keywords = frozenset(
            k.strip().upper() for k in settings.opt_out_keywords.split(",") if k.strip()
        )

    def verify(self, request: WebhookRequest) -> None:
        verify_shared_secret(request, self._secret, CALLBACK_USER)

    def receipts(self, request: WebhookRequest) -> list[Receipt]:
        params = _form(request)
        sms_id = params.get("id", "").strip()
        if not sms_id:
            raise malformed("expected a 46elks delivery report or incoming SMS with an id")
        direction = params.get("direction", "").strip().lower()
        if direction == "incoming" or ("status" not in params and "message" in params):
            receipt = self._incoming(sms_id, params)
            return [receipt] if receipt is not None else []
        status = params.get("status", "").strip().lower()
        if not status:
            raise malformed("expected status (a delivery report) or message (an incoming SMS)")
        if status == "delivered":
            when = _utc(params.get("delivered"))
            return [Receipt(f"{sms_id}:delivered", "delivered", sms_id, occurred_at=when)]
        if status == "failed":
            return [Receipt(f"{sms_id}:failed", "failed", sms_id, reason="46elks: failed")]
        log.debug("46elks status %s of %s: nothing to record", status, sms_id)
        return []

    def _incoming(self, sms_id: str, params: dict[str, str]) -> Receipt | None:
        sender = params.get("from", "").strip()
        if not sender:
            raise malformed("an incoming 46elks SMS without from")
        word = _keyword(params.get("message", ""))
        if word not in self.keywords:
            log.debug("46elks incoming SMS %s is not an opt-out", sms_id)
            return None
        log.info("46elks incoming SMS %s is an opt-out (%s)", sms_id, word)
        return Receipt(
            sms_id,
            "opted_out",
            contact=sender,
            reason=f"46elks: the recipient opted out ({word})",
            suppress="stop",
            occurred_at=_utc(params.get("created")),
        )

    def acknowledge(self) -> Response | None:
        return Response(status_code=204)

    def replay_token(self, request: WebhookRequest) -> tuple[str, float] | None:
        # 46elks signs nothing: a shared secret in the callback URL's credentials admits the
        # request (anyone holding it can post any report); no token to remember.
        return None
