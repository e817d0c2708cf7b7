"""A local SendGrid v3 Mail Send that holds requests to what SendGrid documents, and SendGrid's
side of the Event Webhook (documented events, signed as the Signed Event Webhook signs).

Contract (https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send; the OpenAPI
description in twilio/sendgrid-oai ``spec/yaml/tsg_mail_v3.yaml``; the parameter errors of
https://www.twilio.com/docs/sendgrid/api-reference/mail-send/errors, kept in sendgrid/docs
``content/docs/API_Reference/Web_API_v3/Mail/errors.md``): ``POST /v3/mail/send`` with
``Authorization: Bearer <key>`` (else 401), an ``Accept`` header (else 406), ``application/json``
in UTF-8 (else 415, "Invalid UTF8 in request"), a JSON object (else 400) with
``personalizations`` (1 to 1000, each with a non-empty ``to`` of ``{"email"}`` objects, each
address once), ``from`` ``{"email"}``, a non-empty ``subject`` (at the message level or in every
personalization), ``content`` (non-empty ``type`` and ``value``; ``text/plain`` first, then
``text/html``), string ``custom_args`` and ``headers`` without SendGrid's reserved keys. A
broken request gets the documented status and ``{"errors": [{"field", "message"}]}``; a good one
gets ``202 Accepted``, an empty body and ``X-Message-Id``.

``fail_next(status)`` makes the next calls that keep the contract answer with a documented error
instead (the bodies of the OpenAPI description's examples).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tests.vendor_api import Call, LocalApi

API_KEY = "SG.kaiku-test.0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"  # a placeholder

RESERVED_HEADERS = {
    "x-sg-id",
    "x-sg-eid",
    "received",
    "dkim-signature",
    "content-type",
    "content-transfer-encoding",
    "to",
    "from",
    "subject",
    "reply-to",
    "cc",
    "bcc",
}


def errors(message: str, field: str | None = "null") -> dict[str, Any]:
    return {"errors": [{"field": field, "message": message}]}


# The documented failures: status → (body, headers). Bodies are the OpenAPI examples; 415 is
# the "Encoding Errors" row, 429 the "Rate Limits" page, 406, 451 and 503 the status tables.
DOCUMENTED_ERRORS: dict[int, tuple[dict[str, Any], dict[str, str]]] = {
    400: (errors("invalid request"), {}),
    401: (errors("authorization required"), {}),
    403: (errors("access forbidden"), {}),
    404: (errors("not found"), {}),
    405: (errors("method not allowed"), {}),
    406: (errors("Missing Accept header. For example: Accept: application/json", None), {}),
    413: (errors("content too large"), {}),
    415: (errors("Invalid UTF8 in request", None), {}),
    429: (
        errors("too many requests", None),
        {"X-RateLimit-Limit": "150", "X-RateLimit-Remaining": "0"},
    ),
    451: (errors("Unavailable due to data residency restrictions", None), {}),
    500: (errors("internal server error"), {}),
    503: (errors("The SendGrid v3 Web API is not available.", None), {}),
}

TO_INVALID = (
    "The to array must at least have an `email` parameter with a valid email address and it may "
    'also contain a `name` parameter. e.g. {"email": "example@example.com"}'
)


@dataclass
class Accepted:
    """A message SendGrid took: its ``X-Message-Id`` and the request body."""

    message_id: str
    body: dict[str, Any]

    @property
    def to(self) -> str:
        return str(self.body["personalizations"][0]["to"][0]["email"])

    @property
    def custom_args(self) -> dict[str, str]:
        args: dict[str, str] = dict(self.body.get("custom_args") or {})
        args.update(self.body["personalizations"][0].get("custom_args") or {})
        return args


class Refused(Exception):
    def __init__(self, status: int, message: str, field: str | None) -> None:
        self.status = status
        self.message = message
        self.field = field


def _valid_address(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > 320:
        return False
    local, at, domain = value.rpartition("@")
    return bool(at and local and "." in domain and not any(c.isspace() for c in value))


def _check_headers(headers: Any, where: str) -> None:
    if not isinstance(headers, dict):
        raise Refused(400, "invalid request", where)
    seen: set[str] = set()
    for key, value in headers.items():
        if not isinstance(value, str):
            raise Refused(400, "The header values must be strings.", where)
        if not key.isascii() or any(c.isspace() for c in key) or not key:
            raise Refused(
                400, "Header keys cannot contain non-ASCII characters and empty spaces.", where
            )
        if key.lower() in RESERVED_HEADERS:
            raise Refused(400, "Header can not be one of the reserved keys.", where)
        if key.lower() in seen:
            raise Refused(400, "The headers cannot contain duplicate keys.", where)
        seen.add(key.lower())


def _check_custom_args(args: Any, where: str) -> None:
    if not isinstance(args, dict) or not args:
        raise Refused(400, "`custom_args` cannot be empty.", where)
    if not all(isinstance(v, str) for v in args.values()):
        raise Refused(400, "All values of custom arguments object must be strings", where)


def check(body: Any) -> None:
    """Raise ``Refused`` unless ``body`` is a Mail Send request SendGrid takes."""
    if not isinstance(body, dict):
        raise Refused(400, "invalid request", "null")
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        raise Refused(400, "You must have at least one personalization.", "personalizations")
    if len(personalizations) > 1000:
        raise Refused(
            400,
            "The personalization block is limited to 1000 personalizations per API request.",
            "personalizations",
        )
    seen: set[str] = set()
    for p in personalizations:
        if not isinstance(p, dict) or not isinstance(p.get("to"), list) or not p["to"]:
            raise Refused(
                400,
                "The to parameter is required for all personalization objects.",
                "personalizations",
            )
        for recipient in p["to"]:
            email = recipient.get("email") if isinstance(recipient, dict) else None
            if isinstance(email, str) and len(email) > 320:
                raise Refused(
                    400,
                    "The To email exceeds the maximum total length of 320 characters",
                    "personalizations.to",
                )
            if not isinstance(email, str) or not _valid_address(email):
                raise Refused(400, TO_INVALID, "personalizations.to")
            if email.lower() in seen:
                raise Refused(
                    400,
                    "Each unique email address in the `personalizations` array should only be "
                    f"included once. You have included {email} more than once.",
                    "personalizations",
                )
            seen.add(email.lower())
        if "custom_args" in p:
            _check_custom_args(p["custom_args"], "personalizations.custom_args")
        if "headers" in p:
            _check_headers(p["headers"], "personalizations.headers")
        if "subject" in p and (not isinstance(p["subject"], str) or not p["subject"]):
            raise Refused(
                400,
                "The subject of your email must be a string at least one character in length.",
                "personalizations.subject",
            )
    sender = body.get("from")
    if not isinstance(sender, dict) or not _valid_address(sender.get("email")):
        raise Refused(
            400,
            "The from object must be provided for every email send. It is an object that requires "
            "the email parameter, but may also contain a name parameter.",
            "from",
        )
    subject = body.get("subject")
    if subject is not None and (not isinstance(subject, str) or not subject):
        raise Refused(
            400,
            "The subject of your email must be a string at least one character in length.",
            "subject",
        )
    if subject is None and not all("subject" in p for p in personalizations):
        raise Refused(
            400,
            "The subject is required. You can get around this requirement if you use a template "
            "with a subject defined.",
            "subject",
        )
    content = body.get("content")
    if not isinstance(content, list) or not content:
        raise Refused(
            400,
            "The content param is required unless you are using a transactional template and "
            "have defined a template_ID.",
            "content",
        )
    kinds = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        value = part.get("value") if isinstance(part, dict) else None
        if not isinstance(kind, str) or not kind:
            raise Refused(
                400,
                "A content type is required, this tells email clients how to display the email.",
                "content.type",
            )
        if not isinstance(value, str) or not value:
            raise Refused(
                400,
                "The content value must be a string at least one character in length.",
                "content.value",
            )
        kinds.append(kind)
    ordered = [k for k in kinds if k in ("text/plain", "text/html")]
    if ordered not in ([], ["text/plain"], ["text/html"], ["text/plain", "text/html"]) or (
        ordered and kinds[: len(ordered)] != ordered
    ):
        raise Refused(
            400,
            "Following RFC 1341, section 7.2, if either text/html or text/plain are to be sent in "
            "your email: text/plain needs to be first, followed by text/html, followed by any "
            "other content.",
            "content.value",
        )
    if "headers" in body:
        _check_headers(body["headers"], "headers")
    if "custom_args" in body:
        _check_custom_args(body["custom_args"], "custom_args")


def message_id() -> str:
    """An ``X-Message-Id``: 22 URL-safe characters, like ``LRzXl_NHStOGhQ4kofSm_A``."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")


@dataclass
class SendGridApi:
    api_key: str = API_KEY
    local: LocalApi = field(default_factory=LocalApi)
    accepted: list[Accepted] = field(default_factory=list)
    _failures: list[tuple[int, Any, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.local.route("POST", "/v3/mail/send")(self._mail_send)

    @property
    def url(self) -> str:
        return self.local.url

    @property
    def calls(self) -> list[Call]:
        return self.local.calls

    def __enter__(self) -> SendGridApi:
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
        documented, documented_headers = DOCUMENTED_ERRORS.get(status, (errors("error"), {}))
        answer = (status, documented if body is None else body, headers or documented_headers)
        self._failures.extend([answer] * times)

    async def _mail_send(self, request: Request) -> Response:
        raw = await request.body()
        try:
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                raise Refused(401, "authorization required", "null")
            if not request.headers.get("accept"):
                raise Refused(
                    406, "Missing Accept header. For example: Accept: application/json", None
                )
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise Refused(415, "UNSUPPORTED MEDIA TYPE", None)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise Refused(415, "Invalid UTF8 in request", None) from None
            try:
                body = json.loads(text)
            except json.JSONDecodeError:
                raise Refused(400, "invalid request", "null") from None
            check(body)
        except Refused as refused:
            return JSONResponse(errors(refused.message, refused.field), refused.status)
        if self._failures:
            status, failure, headers = self._failures.pop(0)
            return JSONResponse(failure, status, headers=headers)
        accepted = Accepted(message_id(), body)
        self.accepted.append(accepted)
        return Response(status_code=202, headers={"X-Message-Id": accepted.message_id})


# -- SendGrid's side of the Event Webhook ---------------------------------------------------------


def event(kind: str, sent: Accepted, **fields: Any) -> dict[str, Any]:
    """An event about ``sent`` shaped as the Event Webhook Reference's examples: the recipient,
    ids, and the custom arguments as top-level fields."""
    event_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
    return {
        "email": sent.to,
        "timestamp": int(time.time()),
        "smtp-id": f"<{sent.message_id}@ismtpd0039p1iad1.sendgrid.net>",
        "event": kind,
        "category": "cat facts",
        "sg_event_id": event_id,
        "sg_message_id": f"{sent.message_id}.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",
        **sent.custom_args,
        **fields,
    }


def public_key_b64(key: ec.EllipticCurvePrivateKey) -> str:
    """The verification key as the SendGrid console shows it: base64 DER SubjectPublicKeyInfo."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def signed_headers(
    key: ec.EllipticCurvePrivateKey, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    """The headers of a Signed Event Webhook request: ECDSA/SHA-256 over timestamp + body."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = key.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": ts,
    }
