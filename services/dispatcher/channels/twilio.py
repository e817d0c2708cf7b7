"""``twilio``: SMS through Twilio Programmable Messaging, its status callbacks and inbound STOPs.

Sending (https://www.twilio.com/docs/messaging/api/message-resource, "Create a Message resource"):
``POST {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json`` with HTTP Basic
``AccountSid:AuthToken`` and an ``application/x-www-form-urlencoded`` body (Twilio error 21604
names a JSON body as a cause of "'To' is required"): ``To`` (E.164), ``Body``, ``StatusCallback``
(kaiku's ``…/v1/provider-events/twilio``) and either ``MessagingServiceSid``
(``KAIKU_TWILIO_MESSAGING_SERVICE_SID``, preferred when set) or ``From`` (``KAIKU_SMS_FROM``; a
Twilio number or an alphanumeric sender id). ``201 Created`` answers with the Message resource;
its ``sid`` is the provider message id that status callbacks repeat as ``MessageSid``.

Errors (https://www.twilio.com/docs/usage/twilios-response, https://www.twilio.com/docs/api/errors)
are JSON ``{"code", "message", "more_info", "status"}``. The code decides, not the HTTP status:
``SEND_ERRORS`` below lists the documented codes that need more than the shared rule (408, 429,
5xx transient; other 4xx permanent), each with its page under
``https://www.twilio.com/docs/api/errors/<code>``. 21610 (the recipient replied STOP) suppresses
with ``stop``; 21211, 21614, 21635 (landline) and 21265 (short code) mean the number can never
receive our SMS (``invalid_recipient``). 20429 ("never processed and always safe to retry") and
21611 (the sender's queue holds more than 10 hours of messages) are transient. Twilio's own
``message`` often repeats the phone number, so it is never copied into a reason unredacted. Twilio
warns that codes are refined over time (changelog "Updates to the error code dictionary to clarify
number validation errors", 2024-07-10); an unknown code falls back to the HTTP status.

Callbacks (https://www.twilio.com/docs/usage/webhooks/webhooks-security): every request carries
``X-Twilio-Signature`` = base64(HMAC-SHA1(auth token, full URL + each POST parameter's name and
value, sorted by name)). The URL is the one Twilio called, query string included (``request.url``;
behind a proxy the public URL). Like Twilio's SDKs (twilio-python ``RequestValidator``), the URL
is also tried without its port and with the scheme's default port, and repeated parameter names
are signed with their values sorted. The docs' worked example (token ``12345``) and the SDK's test
vectors are checked in the tests. Twilio signs no timestamp, so replays cannot be refused by age:
the receipt's ``event_id`` makes a replay a no-op.

Two kinds of request arrive at the same URL:

- Status callbacks (https://www.twilio.com/docs/messaging/guides/outbound-message-status-in-status-callbacks):
  ``MessageSid``, ``MessageStatus``, ``ErrorCode``. ``delivered`` → ``delivered``;
  ``undelivered``/``failed`` → ``failed``, suppressing when ``CALLBACK_ERRORS`` says the number is
  gone for good (30005 unknown handset, 30006 landline; with a Messaging Service the send-time
  codes such as 21610 also arrive here). 30003 (handset off or out of coverage) and 30004 (blocked:
  opt-out, filtering, an unavailable device — too many causes) do not suppress. ``queued``,
  ``sending``, ``sent``, ``accepted``, ``scheduled``, ``read``, ``canceled`` say nothing kaiku acts
  on. ``event_id`` is ``{MessageSid}:{status}``: unique per event, equal on Twilio's retries.
- Incoming messages (https://www.twilio.com/docs/messaging/guides/webhook-request): ``MessageSid``,
  ``From``, ``To``, ``Body`` (``SmsStatus=received``). Twilio's default opt-out keywords
  (https://www.twilio.com/docs/messaging/tutorials/advanced-opt-out, and the 30004 page: "STOP,
  UNSUBSCRIBE, END, QUIT, STOPALL, CANCEL, and as of April 29, 2025, also REVOKE and OPTOUT") count
  only as the whole message, in any case. With Advanced Opt-Out the webhook carries ``OptOutType``
  (``STOP``, ``START`` or ``HELP``; Twilio help centre "How to Track Opt-Out, Opt-In and Help
  Messages Using the OptOutType Parameter"), which then decides alone, so custom keywords work. A
  STOP is ``opted_out`` with ``suppress="stop"`` and ``contact`` = ``From``; START, HELP and any
  other text make no receipt. kaiku also accepts a keyword followed by "." or "!" ("Stop.") — its
  own choice, on the side of the recipient; Twilio's blocklist may not.

Incoming-message webhooks expect TwiML: ``acknowledge`` answers the documented empty
``<Response></Response>`` (``text/xml``), which sends no reply
(https://www.twilio.com/docs/usage/webhooks/messaging-webhooks, "Incoming Message Webhook").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import httpx
from fastapi.responses import Response

from services.common.webhooks import (
    WebhookRequest,
    b64,
    hmac_digest,
    malformed,
    same,
    unauthorized,
)
from services.dispatcher.channels import (
    OutboundSms,
    Receipt,
    SendResult,
    SuppressReason,
)
from services.dispatcher.channels.http import (
    HttpProvider,
    generic_failure,
    json_object,
    redact_numbers,
    request,
    retry_after,
)
from services.dispatcher.config import TwilioSettings

log = logging.getLogger(__name__)

NAME = "twilio"
SIGNATURE_HEADER = "X-Twilio-Signature"
FORM = "application/x-www-form-urlencoded"
TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'

# Twilio's default opt-out keywords (whole message, any case).
OPT_OUT_KEYWORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
)


@dataclass(frozen=True)
class TwilioError:
    what: str
    suppress: SuppressReason | None = None
    # At send time: worth trying again later (otherwise permanent).
    transient: bool = False


# Send-time error codes (the JSON ``code`` of a refused create). Anything else: the HTTP status.
SEND_ERRORS: dict[int, TwilioError] = {
    20003: TwilioError("authentication failed (KAIKU_TWILIO_ACCOUNT_SID, KAIKU_TWILIO_AUTH_TOKEN)"),
    20429: TwilioError("too many concurrent requests", transient=True),
    21211: TwilioError("invalid 'To' phone number", "invalid_recipient"),
    21265: TwilioError("'To' is a short code", "invalid_recipient"),
    21266: TwilioError("'To' and 'From' are the same number"),
    21602: TwilioError("message body is required"),
    21603: TwilioError("'From' or 'MessagingServiceSid' is required"),
    21604: TwilioError("'To' is required"),
    21606: TwilioError("'From' is not a message-capable Twilio number for this destination"),
    21608: TwilioError("trial account: 'To' is not a verified number"),
    21609: TwilioError("invalid 'StatusCallback' URL"),
    21610: TwilioError("the recipient replied STOP (unsubscribed)", "stop"),
    21611: TwilioError("the sender's queue holds over 10 hours of messages", transient=True),
    21612: TwilioError("this 'To' and 'From' combination cannot be routed"),
    21614: TwilioError("'To' is not a valid mobile number", "invalid_recipient"),
    21635: TwilioError("'To' is a landline", "invalid_recipient"),
    21659: TwilioError("'From' is not a Twilio number"),
}

# Delivery-time error codes (``ErrorCode`` of a failed/undelivered status callback); with a
# Messaging Service the send-time codes that suppress arrive here too.
CALLBACK_ERRORS: dict[int, TwilioError] = {
    30001: TwilioError("queue overflow"),
    30002: TwilioError("account suspended"),
    30003: TwilioError("unreachable destination handset"),
    30004: TwilioError("message blocked"),
    30005: TwilioError("unknown destination handset", "invalid_recipient"),
    30006: TwilioError("landline or unreachable carrier", "invalid_recipient"),
    30007: TwilioError("message filtered"),
    30008: TwilioError("unknown error"),
    **{code: e for code, e in SEND_ERRORS.items() if e.suppress is not None},
}


def _error_code(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


class TwilioSms(HttpProvider):
    """Sends one SMS per call through the Messages resource."""

    name = NAME

    def __init__(
        self,
        settings: TwilioSettings,
        *,
        sender: str | None,
        status_callback: str | None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if not settings.account_sid:
            raise ValueError("KAIKU_TWILIO_ACCOUNT_SID is not set")
        if settings.auth_token is None or not settings.auth_token.get_secret_value():
            raise ValueError("KAIKU_TWILIO_AUTH_TOKEN is not set")
        if not (settings.messaging_service_sid or sender):
            raise ValueError(
                "Twilio needs a sender: set KAIKU_SMS_FROM (a Twilio number or an alphanumeric "
                "sender id) or KAIKU_TWILIO_MESSAGING_SERVICE_SID"
            )
        self.settings = settings
        self.sender = sender
        self.status_callback = status_callback
        self._auth = httpx.BasicAuth(settings.account_sid, settings.auth_token.get_secret_value())
        self._url = (
            f"{settings.base_url.rstrip('/')}/2010-04-01/Accounts/"
            f"{quote(settings.account_sid, safe='')}/Messages.json"
        )
        super().__init__(http, settings.timeout_seconds)

    def form(self, message: OutboundSms) -> dict[str, str]:
        """The create-message parameters, as Twilio documents them."""
        data = {"To": message.to, "Body": message.body}
        if self.settings.messaging_service_sid:
            data["MessagingServiceSid"] = self.settings.messaging_service_sid
        else:
            sender = message.sender or self.sender
            assert sender is not None  # checked in __init__
            data["From"] = sender
        if self.status_callback:
            data["StatusCallback"] = self.status_callback
        return data

    async def send(self, message: OutboundSms) -> SendResult:
        answer = await request(
            self._http,
            NAME,
            "POST",
            self._url,
            data=self.form(message),
            auth=self._auth,
            headers={"accept": "application/json"},
        )
        if isinstance(answer, SendResult):
            return answer
        if answer.is_success:  # 201 Created, documented
            sid = json_object(answer).get("sid")
            if not isinstance(sid, str) or not sid:
                log.warning("twilio answered %s without a message sid", answer.status_code)
                return SendResult("sent", reason=f"twilio {answer.status_code} without a sid")
            return SendResult("sent", provider_message_id=sid)
        return classify(answer)


def classify(response: httpx.Response) -> SendResult:
    """A refused create, by Twilio's error code first and its HTTP status otherwise."""
    body = json_object(response)
    code = _error_code(body.get("code"))
    known = SEND_ERRORS.get(code) if code is not None else None
    status = response.status_code
    if known is None:
        message = body.get("message")
        detail = f"error {code}" if code is not None else ""
        if isinstance(message, str) and message:
            detail = f"{detail}: {redact_numbers(message)}" if detail else redact_numbers(message)
        return generic_failure(NAME, response, detail)
    reason = f"twilio {status} error {code}: {known.what}"
    if known.transient:
        return SendResult("transient", reason=reason, retry_after=retry_after(response))
    return SendResult("permanent", reason=reason, suppress=known.suppress)


# -- callbacks: POST /v1/provider-events/twilio ---------------------------------------------------


def _form(request: WebhookRequest) -> list[tuple[str, str]]:
    try:
        text = request.body.decode("utf-8")
        return parse_qsl(text, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise malformed(
            "the body is not a UTF-8 form (application/x-www-form-urlencoded)"
        ) from None


def signature(auth_token: str, url: str, params: Sequence[tuple[str, str]]) -> str:
    """The ``X-Twilio-Signature`` of a request: base64 HMAC-SHA1 over the URL followed by each
    parameter's name and value, sorted by name (and, for a repeated name, by value)."""
    grouped: dict[str, list[str]] = {}
    for name, value in params:
        grouped.setdefault(name, []).append(value)
    data = url + "".join(
        name + value for name in sorted(grouped) for value in sorted(grouped[name])
    )
    return b64(hmac_digest(auth_token.encode(), data.encode(), "sha1"))


def url_variants(url: str) -> list[str]:
    """The URL as given, without its port, and with the scheme's default port (Twilio's SDKs
    accept all three: a proxy may add or drop the port Twilio signed)."""
    parts = urlsplit(url)
    if not parts.hostname:
        return [url]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    variants = [url, urlunsplit(parts._replace(netloc=prefix + host))]
    try:
        port = parts.port
    except ValueError:
        port = None
    default = {"https": 443, "http": 80}.get(parts.scheme)
    if port is None and default is not None:
        variants.append(urlunsplit(parts._replace(netloc=f"{prefix}{host}:{default}")))
    return list(dict.fromkeys(variants))


def _keyword(body: str) -> str:
    return body.strip().rstrip(".!").strip().upper()


class TwilioReceipts:
    """Status callbacks and incoming messages (STOP) for the Twilio account."""

    name: ClassVar[str] = NAME
    CONTENT_TYPES: ClassVar[tuple[str, ...]] = (FORM,)

    def __init__(self, settings: TwilioSettings) -> None:
        if settings.auth_token is None or not settings.auth_token.get_secret_value():
            raise ValueError("KAIKU_TWILIO_AUTH_TOKEN is not set: Twilio signs callbacks with it")
        self._token = settings.auth_token.get_secret_value()

    def verify(self, request: WebhookRequest) -> None:
        given = request.headers.get(SIGNATURE_HEADER)
        if not given:
            raise unauthorized(f"{SIGNATURE_HEADER} is required")
        params = _form(request)
        for url in url_variants(request.url):
            if same(given, signature(self._token, url, params)):
                return
        raise unauthorized(f"{SIGNATURE_HEADER} does not match the URL and parameters")

    def receipts(self, request: WebhookRequest) -> list[Receipt]:
        params: dict[str, str] = {}
        for name, value in _form(request):
            params.setdefault(name, value)
        status = (params.get("MessageStatus") or params.get("SmsStatus") or "").strip().lower()
        sid = (params.get("MessageSid") or params.get("SmsSid") or "").strip()
        if not sid:
            raise malformed("expected a Twilio message webhook with MessageSid")
        if status in ("received", "receiving") or (not status and "From" in params):
            receipt = self._incoming(sid, params)
            return [receipt] if receipt is not None else []
        if not status:
            raise malformed("expected MessageStatus (a status callback) or From (a message)")
        return self._status(sid, status, params)

    @staticmethod
    def _status(sid: str, status: str, params: dict[str, str]) -> list[Receipt]:
        if status == "delivered":
            return [Receipt(f"{sid}:delivered", "delivered", provider_message_id=sid)]
        if status not in ("undelivered", "failed"):
            log.debug("twilio status %s of %s: nothing to record", status, sid)
            return []
        code = _error_code(params.get("ErrorCode"))
        known = CALLBACK_ERRORS.get(code) if code is not None else None
        reason = f"twilio {status}" + (f" {code}" if code is not None else "")
        if known is not None:
            reason += f": {known.what}"
        return [
            Receipt(
                f"{sid}:{status}",
                "failed",
                provider_message_id=sid,
                reason=reason,
                suppress=known.suppress if known is not None else None,
            )
        ]

    @staticmethod
    def _incoming(sid: str, params: dict[str, str]) -> Receipt | None:
        sender = params.get("From", "").strip()
        if not sender:
            raise malformed("an incoming Twilio message without From")
        opt_out_type = params.get("OptOutType", "").strip().upper()
        if opt_out_type:
            is_stop = opt_out_type == "STOP"
            what = f"OptOutType={opt_out_type}"
        else:
            word = _keyword(params.get("Body", ""))
            is_stop = word in OPT_OUT_KEYWORDS
            what = word if is_stop else "text"
        if not is_stop:
            log.debug("twilio incoming message %s is not an opt-out", sid)
            return None
        log.info("twilio incoming message %s is an opt-out (%s)", sid, what)
        return Receipt(
            sid,
            "opted_out",
            contact=sender,
            reason=f"twilio: the recipient opted out ({what})",
            suppress="stop",
        )

    def acknowledge(self) -> Response | None:
        return Response(content=TWIML_EMPTY, media_type="text/xml")

    def replay_token(self, request: WebhookRequest) -> tuple[str, float] | None:
        return None  # the signature covers the request: a replay repeats its events
