"""Signed HTTP callbacks, both ways: what an incoming webhook is, how it is refused, and the
signature helpers (HMAC, constant-time comparison, freshness, Standard Webhooks) that the trigger's
vendor webhooks, the dispatcher's provider events and kaiku's own outgoing webhooks share."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import Request
from pydantic import SecretStr

from services.common.http import ApiError, read_body


@dataclass(frozen=True)
class WebhookRequest:
    """What a vendor sent, exactly as it arrived (signatures cover the raw bytes)."""

    method: str
    url: str  # the full URL as the vendor called it: scheme://host[:port]/path[?query]
    headers: Mapping[str, str]  # case-insensitive (Starlette's Headers)
    body: bytes
    received_at: datetime


class WebhookError(Exception):
    """A refused webhook: the status and a JSON error naming the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def unauthorized(message: str) -> WebhookError:
    return WebhookError(401, "bad_signature", message)


def malformed(message: str) -> WebhookError:
    return WebhookError(400, "malformed_payload", message)


def json_body(request: WebhookRequest) -> Any:
    """The body as JSON, or ``malformed`` (400)."""
    try:
        return json.loads(request.body)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, too long a number, too deep
        raise malformed("the body is not valid JSON") from None


def json_objects(request: WebhookRequest, expected: str) -> list[dict[str, Any]]:
    """A JSON object or a non-empty array of objects, as a list; ``malformed`` otherwise."""
    body = json_body(request)
    items = body if isinstance(body, list) else [body]
    if not items or not all(isinstance(i, dict) for i in items):
        raise malformed(f"expected {expected}")
    return items


def hmac_digest(key: bytes, message: bytes, algorithm: str = "sha256") -> bytes:
    return hmac.new(key, message, getattr(hashlib, algorithm)).digest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def same(given: str | None, expected: str) -> bool:
    """Constant-time comparison of two signatures as text."""
    return given is not None and hmac.compare_digest(given.strip().encode(), expected.encode())


def signing_keys(secret: str) -> list[bytes]:
    """The HMAC keys of a secret setting that may list several, comma-separated (a vendor that
    gives each webhook its own secret, or a rotation in progress)."""
    return [part.strip().encode() for part in secret.split(",") if part.strip()]


def required_signing_keys(secret: SecretStr | None, setting: str, why: str = "") -> list[bytes]:
    """The keys of a secret setting a receiver cannot work without; a ValueError naming the
    setting (and ``why``) when it is unset or empty."""
    keys = signing_keys(secret.get_secret_value()) if secret is not None else []
    if not keys:
        raise ValueError(f"{setting} is not set{why}")
    return keys


def require_fresh(timestamp: float, now: datetime, tolerance: float, what: str) -> None:
    """Refuse requests older (or further in the future) than ``tolerance`` seconds: replays."""
    try:
        age = now.timestamp() - timestamp
    except OverflowError:  # an integer beyond any float
        age = -math.inf if timestamp > 0 else math.inf
    if not math.isfinite(age):  # NaN, or beyond any float
        raise unauthorized(f"{what} is not a usable time")
    if abs(age) > tolerance:
        raise unauthorized(
            f"{what} is {abs(age):.0f}s {'old' if age > 0 else 'in the future'}; "
            f"the tolerance is {tolerance:.0f}s"
        )


SECRET_HEADER = "X-Kaiku-Webhook-Secret"  # noqa: S105 (a header name, not a secret)


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """The (username, password) of an ``Authorization: Basic`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except ValueError:  # binascii.Error, text that is not ASCII, bytes that are not UTF-8
        return None
    username, colon, password = decoded.partition(":")
    return (username, password) if colon else None


def verify_shared_secret(request: WebhookRequest, secret: str, username: str) -> None:
    """For vendors with no signature scheme: the secret in the ``X-Kaiku-Webhook-Secret`` header,
    or as the password of HTTP Basic credentials (with ``username``), compared in constant time."""
    given = request.headers.get(SECRET_HEADER)
    if given is not None:
        if same(given, secret):
            return
        raise unauthorized(f"{SECRET_HEADER} does not match the configured secret")
    credentials = basic_credentials(request.headers.get("authorization"))
    if credentials is None:
        raise unauthorized(f"expected the {SECRET_HEADER} header or HTTP Basic credentials")
    user_ok = hmac.compare_digest(credentials[0].encode(), username.encode())
    password_ok = hmac.compare_digest(credentials[1].encode(), secret.encode())
    if not (user_ok and password_ok):
        raise unauthorized("the HTTP Basic credentials do not match")


# -- Standard Webhooks (https://www.standardwebhooks.com) -----------------------------------------


def standard_secret_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (``whsec_`` + base64); a bare string is used
    as it is."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except binascii.Error as exc:
            raise ValueError("a whsec_ secret must be followed by base64") from exc
    return secret.encode()


def standard_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,`` + base64 HMAC-SHA256 of
    ``{id}.{timestamp}.{body}``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + b64(hmac_digest(standard_secret_key(secret), signed))


def standard_headers(
    secrets: str, msg_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers for an outgoing request. ``secrets`` may list several
    comma-separated secrets (a rotation in progress): each adds one signature."""
    ts = int(time.time()) if timestamp is None else timestamp
    signatures = [
        standard_signature(s.strip(), msg_id, ts, body) for s in secrets.split(",") if s.strip()
    ]
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
    }


def verify_standard(request: WebhookRequest, key: bytes, tolerance: float) -> None:
    """Refuse (401) a request without a fresh, matching Standard Webhooks signature."""
    msg_id = request.headers.get("webhook-id")
    timestamp = request.headers.get("webhook-timestamp")
    signatures = request.headers.get("webhook-signature")
    if not (msg_id and timestamp and signatures):
        raise unauthorized("webhook-id, webhook-timestamp and webhook-signature are required")
    try:
        ts = int(timestamp)
    except ValueError:
        raise unauthorized("webhook-timestamp is not a Unix time in seconds") from None
    require_fresh(ts, request.received_at, tolerance, "webhook-timestamp")
    expected = b64(hmac_digest(key, f"{msg_id}.{ts}.".encode() + request.body))
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and same(value, expected):
            return
    raise unauthorized("no webhook-signature matches the body")


# -- receiving ------------------------------------------------------------------------------------


async def receive(
    request: Request,
    *,
    sender: str,
    content_types: tuple[str, ...],
    max_body: int,
    public_url: str | None,
    now: datetime,
) -> WebhookRequest:
    """The request as the sender signed it: content type checked (415), body read within the
    limit (413), and the URL rebuilt from ``public_url`` (as the sender called it, in front of
    proxies: some signatures cover the URL)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in content_types:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"{sender} sends {' or '.join(content_types)}, not {ctype or 'nothing'}",
        )
    body = await read_body(request, max_body)
    url = str(request.url)
    if public_url:
        url = (
            public_url.rstrip("/")
            + request.url.path
            + (f"?{request.url.query}" if request.url.query else "")
        )
    return WebhookRequest(request.method, url, request.headers, body, now)
