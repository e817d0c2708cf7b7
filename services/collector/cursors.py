"""Opaque keyset cursors of the collector's paged APIs (``GET /v1/responses``,
``GET /v1/scores``).

A cursor is the position of the last item of a page (JSON), bound to the request it was made
for (its *scope*: the filters, never the page size) and signed with a key derived from the API
token, so every replica reads every other's and a new token ends the paging in progress. A
damaged, forged or foreign cursor, or one made for other filters, is a 422 naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import SecretStr

from services.common.http import ApiError

T = TypeVar("T")
# Characters: a scores cursor carries up to five segment values of up to 200 characters (as
# UTF-8, base64: at most 5 * 800 * 4/3 plus the rest).
MAX_CURSOR = 8000


def cursor_key(token: SecretStr | None) -> bytes:
    """The key that signs cursors: derived from the API token."""
    secret = token.get_secret_value() if token is not None else ""
    return hashlib.sha256(b"kaiku responses cursor\0" + secret.encode()).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Cursors:
    def __init__(self, key: bytes) -> None:
        self.key = key

    @staticmethod
    def _digest(scope: str) -> str:
        return hashlib.sha256(scope.encode()).hexdigest()[:16]

    def _sign(self, data: bytes) -> bytes:
        return hmac.new(self.key, data, hashlib.sha256).digest()[:16]

    def make(self, scope: str, position: list[Any]) -> str:
        """The cursor after ``position`` (JSON values) for requests of ``scope``."""
        made = [*position, self._digest(scope)]
        data = json.dumps(made, separators=(",", ":"), ensure_ascii=False).encode()
        return f"{_b64(data)}.{_b64(self._sign(data))}"

    def read(self, scope: str, cursor: str, parse: Callable[[list[Any]], T]) -> T:
        """The position in ``cursor``, as ``parse`` makes it of the JSON values ``make`` was
        given (its ValueError or TypeError is a damaged cursor too)."""
        try:
            data_part, _, sig_part = cursor.partition(".")
            data = _unb64(data_part)
            if not hmac.compare_digest(_unb64(sig_part), self._sign(data)):
                raise ValueError("signature")
            *values, made_for = json.loads(data)
            position = parse(values)
        except (ValueError, TypeError, binascii.Error):
            raise ApiError(
                422, "invalid", "not a cursor of this API (or the API token changed)", "cursor"
            ) from None
        if made_for != self._digest(scope):
            raise ApiError(
                422, "invalid", "the cursor was made for other filters: keep them", "cursor"
            )
        return position
