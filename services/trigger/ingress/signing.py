"""Signature helpers shared by the vendor modules: HMAC, constant-time comparison, freshness."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from datetime import datetime

from services.trigger.ingress import WebhookRequest, unauthorized


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


def require_fresh(timestamp: float, now: datetime, tolerance: float, what: str) -> None:
    """Refuse requests older (or further in the future) than ``tolerance`` seconds: replays."""
    age = now.timestamp() - timestamp
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
    except (binascii.Error, UnicodeDecodeError):
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
