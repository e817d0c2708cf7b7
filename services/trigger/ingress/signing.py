"""Signature helpers shared by the vendor modules: HMAC, constant-time comparison, freshness."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime

from services.trigger.ingress import unauthorized


def hmac_digest(key: bytes, message: bytes, algorithm: str = "sha256") -> bytes:
    return hmac.new(key, message, getattr(hashlib, algorithm)).digest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def same(given: str | None, expected: str) -> bool:
    """Constant-time comparison of two signatures as text."""
    return given is not None and hmac.compare_digest(given.strip().encode(), expected.encode())


def require_fresh(timestamp: float, now: datetime, tolerance: float, what: str) -> None:
    """Refuse requests older (or further in the future) than ``tolerance`` seconds: replays."""
    age = now.timestamp() - timestamp
    if abs(age) > tolerance:
        raise unauthorized(
            f"{what} is {abs(age):.0f}s {'old' if age > 0 else 'in the future'}; "
            f"the tolerance is {tolerance:.0f}s"
        )
