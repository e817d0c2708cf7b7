"""Native webhooks: one module per vendor behind one small interface.

A vendor module knows three things: how the vendor signs its requests (``verify``), how its body
splits into items (``items``), and the defaults of the mapping from its payload to kaiku's
CloudEvent (``DEFAULT_MAPPING``, ``DEFAULT_TYPES``, ``vendor_type``, ``event_id``). Everything else
— the route, the mapping engine, publishing, the answer — is shared (``router.py``,
``mapping.py``). The mapping can be changed per source in the program file (``sources:``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import httpx
from fastapi.responses import Response

from services.common.events import CloudEvent
from services.common.webhooks import (
    WebhookError,
    WebhookRequest,
    json_body,
    json_objects,
    malformed,
    unauthorized,
)

__all__ = [
    "Contact",
    "ContactResolver",
    "LookupFailed",
    "Vendor",
    "WebhookError",
    "WebhookRequest",
    "json_body",
    "json_objects",
    "malformed",
    "unauthorized",
]


class Vendor(Protocol):
    """One vendor's webhook format."""

    name: ClassVar[str]
    # Content types the vendor sends (checked before the signature; anything else is 415).
    CONTENT_TYPES: ClassVar[tuple[str, ...]]
    # Canonical field → dotted path into one item ("=text" is a constant). See mapping.FIELDS.
    DEFAULT_MAPPING: ClassVar[dict[str, str]]
    # The vendor's own event type (as ``vendor_type`` returns it) → kaiku event type.
    DEFAULT_TYPES: ClassVar[dict[str, str]]
    # True when a type missing from the table passes through unchanged (``generic``).
    PASS_THROUGH_TYPES: ClassVar[bool]

    def verify(self, request: WebhookRequest) -> None:
        """Raise ``WebhookError`` (401) unless the request is authentic and fresh."""

    def items(self, request: WebhookRequest) -> list[dict[str, Any]]:
        """The payload items of one request (HubSpot sends arrays); ``malformed`` (400) on bad
        bodies."""

    def vendor_type(self, item: Mapping[str, Any]) -> str | None:
        """The item's event type in the vendor's terms (looked up in the ``types`` table)."""

    def event_id(self, item: Mapping[str, Any]) -> str | None:
        """The vendor's own id of this event: the idempotency key."""

    def source(self) -> str:
        """The CloudEvents ``source`` of this vendor's events, e.g. ``zendesk://acme``."""

    def acknowledge(self, accepted: list[str]) -> Response | None:
        """A vendor-specific answer (Salesforce wants a SOAP Ack); None for the JSON default."""


@dataclass(frozen=True)
class Contact:
    """What a vendor's API says about a customer: contact points and preferences."""

    email: str | None = None
    phone: str | None = None
    # The vendor's id of the person, when the webhook named another object (a HubSpot ticket):
    # it replaces the event's customer id so per-customer rules count per person.
    customer_id: str | None = None
    locale: str | None = None
    timezone: str | None = None
    account_id: str | None = None


class LookupFailed(Exception):
    """The vendor's API could not answer (after bounded retries); the reason is recorded."""


class ContactResolver(Protocol):
    """Finds a customer's contact points through the vendor's documented API, for events whose
    webhook carried only ids. Its ``name`` is the vendor's, as in the event's ``source`` scheme."""

    name: ClassVar[str]

    async def resolve(self, event: CloudEvent, http: httpx.AsyncClient) -> Contact | None:
        """The customer's contact details; None when the vendor does not know the customer.
        Raise ``LookupFailed`` when the API cannot be reached or refuses."""
