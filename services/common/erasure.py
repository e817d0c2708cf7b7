"""Salted hashes of personal identifiers, for what must outlive an erasure.

When a customer is erased, every service forgets who they were, but an opt-out must survive it:
an erased customer who unsubscribed is never contacted again, even under a new customer id. So an
erased opt-out keeps its contact point (and customer id) as a keyed hash, ``h:<hex HMAC-SHA256>``,
and every opt-out check matches a contact point by its plain value or by its hash.

The key is ``KAIKU_ERASURE_SALT``: the same in every service, set once in production and never
changed (a new salt makes every erased opt-out unrecognisable).
"""

from __future__ import annotations

import hashlib
import hmac
import re

from pydantic import SecretStr

HASH_PREFIX = "h:"
# The development default of ``KAIKU_ERASURE_SALT``; production must set its own.
DEV_ERASURE_SALT = "insecure-development-erasure-salt-change-me"
_PHONE_NOISE = re.compile(r"[\s().\-/]")


def normalize(channel: str, contact: str) -> str:
    """The form a contact point is compared (and hashed) in: an email address lower-cased, a
    phone number in E.164 (``+`` and digits), any other identifier as it is."""
    value = contact.strip()
    if channel == "email":
        return value.lower()
    if channel == "sms":
        value = _PHONE_NOISE.sub("", value)
        return "+" + value[2:] if value.startswith("00") else value
    return value


def contact_hash(salt: SecretStr | str, channel: str, contact: str) -> str:
    """``h:`` + hex HMAC-SHA256 of the normalized contact point on its channel."""
    key = salt.get_secret_value() if isinstance(salt, SecretStr) else salt
    message = f"{channel}\x00{normalize(channel, contact)}".encode()
    return HASH_PREFIX + hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def customer_hash(salt: SecretStr | str, customer_id: str) -> str:
    """The salted hash of a customer id (the ``customer`` channel of ``contact_hash``)."""
    return contact_hash(salt, "customer", customer_id)


def is_hash(value: str | None) -> bool:
    return value is not None and value.startswith(HASH_PREFIX)
