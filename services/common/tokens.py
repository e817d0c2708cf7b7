"""Survey-link tokens: short, unguessable, signed with a key id so keys can rotate.

A token is ``kid`` (1 character) + 16 characters of random id (96 bits) + 12 characters of
HMAC-SHA256 over kid and id (72 bits): 29 URL-safe characters, short enough for an SMS link.
The signature lets the collector refuse forged or tampered tokens without a database look-up;
expiry lives with the invitation, so a token never has to be re-issued to change it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from pydantic import SecretStr

TOKEN_LENGTH = 29
_TOKEN = re.compile(r"^[0-9A-Za-z][A-Za-z0-9_-]{28}$")


class InvalidToken(Exception):
    """The token is malformed, signed with an unknown key, or tampered with."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclass(frozen=True)
class LinkKeys:
    """Signing keys by id; the first one signs new tokens, every one verifies."""

    keys: dict[str, bytes]
    current: str

    @classmethod
    def parse(cls, spec: SecretStr | str) -> LinkKeys:
        raw = spec.get_secret_value() if isinstance(spec, SecretStr) else spec
        keys: dict[str, bytes] = {}
        current = ""
        for item in filter(None, (p.strip() for p in raw.split(","))):
            kid, sep, secret = item.partition(":")
            if not sep or not re.fullmatch(r"[0-9A-Za-z]", kid) or len(secret) < 16:
                raise ValueError(
                    "KAIKU_LINK_KEYS must be 'kid:secret' pairs: a one-character key id "
                    "(0-9, a-z, A-Z) and a secret of at least 16 characters"
                )
            keys[kid] = secret.encode()
            current = current or kid
        if not keys:
            raise ValueError("KAIKU_LINK_KEYS holds no key")
        return cls(keys, current)

    def _mac(self, kid: str, rid: str) -> str:
        digest = hmac.new(self.keys[kid], f"{kid}{rid}".encode(), hashlib.sha256).digest()
        return _b64(digest[:9])

    def issue(self) -> str:
        rid = _b64(secrets.token_bytes(12))
        return f"{self.current}{rid}{self._mac(self.current, rid)}"

    def verify(self, token: str) -> str:
        """Return the token when it is well-formed and its signature checks out."""
        if not _TOKEN.match(token):
            raise InvalidToken("malformed token")
        kid, rid, mac = token[0], token[1:17], token[17:]
        if kid not in self.keys:
            raise InvalidToken("unknown signing key")
        if not hmac.compare_digest(mac, self._mac(kid, rid)):
            raise InvalidToken("bad signature")
        return token
