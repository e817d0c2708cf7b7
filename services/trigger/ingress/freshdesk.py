"""``freshdesk``: the "Trigger webhook" action of Freshdesk automation rules.

Freshdesk has no webhook subscriptions and signs nothing. A webhook is an action of an automation
rule (Admin → Workflows → Automations → "Ticket updates" → … → Actions → "Trigger webhook"):
the admin picks the request type, the callback URL, the encoding (JSON) and the content, either
"Simple" (ticked fields sent as ``{"freshdesk_webhook": {"ticket_id": …, "ticket_status": …}}``)
or "Advanced" (a JSON body written with placeholders such as ``{{ticket.id}}``). The action
offers "Requires authentication" (username and password, or an API key) and "Add custom
headers". Sources:

- https://support.freshdesk.com/support/solutions/articles/132589-using-webhooks-in-automation-rules
  (the action and its options; read through a mirror of the article, the official page itself
  could not be fetched)
- https://developers.freshdesk.com/api/#view_contact and #authentication
  (``GET /api/v2/contacts/[id]`` with HTTP Basic ``api_key:X``; 404 when the contact does not
  exist; 429 with ``Retry-After`` when rate limited)

Authenticity — a per-source shared secret, compared in constant time, sent in either way:

- a custom header ``X-Kaiku-Webhook-Secret: <KAIKU_FRESHDESK_WEBHOOK_SECRET>`` ("Add custom
  headers" in the action), or
- HTTP Basic: tick "Requires authentication", choose username and password, username
  ``KAIKU_FRESHDESK_WEBHOOK_USERNAME`` (default ``kaiku``), password the secret.

The action's "API key" authentication option is not supported: how Freshdesk encodes it on the
wire is not documented. Freshdesk sends no timestamp, so there is no replay window:
``tolerance_seconds`` exists for uniformity with the other sources and is not used; a replayed
request produces the same event id and is deduplicated as an idempotent retry.

The payload is the admin's. Use the Advanced content in ``docs/webhooks/freshdesk.md``: it keeps
the key names of the Simple mode and adds the requester's id (``{{ticket.requester.id}}``),
mobile and language. Assumption: ``{{ticket.requester.id}}``, ``.mobile`` and ``.language`` are
not in Freshdesk's published placeholder list; they are attributes of Freshdesk's user drop (seen
in Freshdesk's own source), and the contact look-up fills in anything missing. The event type is
the ticket's status name (``{{ticket.status}}`` renders "Open", "Pending", "Resolved", "Closed",
or a custom status name). Freshdesk gives a webhook no id of its own: the idempotency key is
``<ticket id>-<status>``.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar

import httpx
from fastapi.responses import Response
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.events import CloudEvent
from services.common.webhooks import verify_shared_secret
from services.trigger.ingress import Contact, WebhookRequest, json_body, malformed
from services.trigger.ingress.lookup import TtlCache, get_json
from services.trigger.ingress.mapping import normalize_email, normalize_phone


class FreshdeskSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_FRESHDESK_", extra="ignore")

    webhook_secret: SecretStr | None = None
    webhook_username: str = "kaiku"
    # Freshdesk sends no timestamp: kept for uniformity, not used.
    tolerance_seconds: float = 300.0
    # The helpdesk's subdomain: acme for https://acme.freshdesk.com.
    domain: str | None = None
    source: str | None = None  # default freshdesk://<domain>
    api_base_url: str | None = None  # default https://<domain>.freshdesk.com
    api_key: SecretStr | None = None
    cache_ttl_seconds: float = 300.0

    def source_uri(self) -> str:
        return self.source or f"freshdesk://{self.domain or 'default'}"

    def api_base(self) -> str | None:
        if self.api_base_url:
            return self.api_base_url.rstrip("/")
        return f"https://{self.domain}.freshdesk.com" if self.domain else None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class Freshdesk:
    name: ClassVar[str] = "freshdesk"
    CONTENT_TYPES: ClassVar[tuple[str, ...]] = ("application/json",)
    # Keys of the recommended Advanced content (docs/webhooks/freshdesk.md).
    DEFAULT_MAPPING: ClassVar[dict[str, str]] = {
        "customer_id": "ticket_requester_id",
        "email": "ticket_requester_email",
        "phone": "ticket_requester_mobile",
        "locale": "ticket_requester_language",
        "case_id": "ticket_id",
        "channel": "ticket_source",
        "team": "ticket_group_name",
        "agent": "ticket_agent_name",
        "attributes.priority": "ticket_priority",
        "attributes.ticket_type": "ticket_type",
    }
    # {{ticket.status}} renders the status name. Freshdesk has no "reopened" status (a reopened
    # ticket is "Open" again), so reopening is not mapped by default.
    DEFAULT_TYPES: ClassVar[dict[str, str]] = {
        "Resolved": "ticket.solved",
        "Closed": "ticket.closed",
    }
    PASS_THROUGH_TYPES: ClassVar[bool] = False

    def __init__(self, settings: FreshdeskSettings) -> None:
        if settings.webhook_secret is None:
            raise ValueError("KAIKU_FRESHDESK_WEBHOOK_SECRET is not set")
        self.settings = settings
        self._secret = settings.webhook_secret.get_secret_value()

    def verify(self, request: WebhookRequest) -> None:
        verify_shared_secret(request, self._secret, self.settings.webhook_username)

    def items(self, request: WebhookRequest) -> list[dict[str, Any]]:
        body = json_body(request)
        if isinstance(body, dict) and isinstance(body.get("freshdesk_webhook"), dict):
            body = body["freshdesk_webhook"]
        if not isinstance(body, dict):
            raise malformed("expected a JSON object (optionally inside freshdesk_webhook)")
        return [body]

    def vendor_type(self, item: Mapping[str, Any]) -> str | None:
        value = item.get("ticket_status")
        if not isinstance(value, str):
            return None
        return value.strip() or None

    def event_id(self, item: Mapping[str, Any]) -> str | None:
        ticket = item.get("ticket_id")
        status = self.vendor_type(item)
        if ticket in (None, "") or isinstance(ticket, dict | list) or status is None:
            return None
        return f"{str(ticket).strip()}-{_slug(status)}"

    def source(self) -> str:
        return self.settings.source_uri()

    def acknowledge(self, accepted: list[str]) -> Response | None:
        return None


def from_env() -> Freshdesk | None:
    settings = FreshdeskSettings()
    return Freshdesk(settings) if settings.webhook_secret is not None else None


# Freshdesk stores time zones by their Rails (ActiveSupport) names: most are the city part of an
# IANA name ("Helsinki", "Brisbane"); these are not.
_RAILS_ZONES = {
    "Eastern Time (US & Canada)": "America/New_York",
    "Central Time (US & Canada)": "America/Chicago",
    "Mountain Time (US & Canada)": "America/Denver",
    "Pacific Time (US & Canada)": "America/Los_Angeles",
    "Alaska": "America/Juneau",
    "Hawaii": "Pacific/Honolulu",
    "Arizona": "America/Phoenix",
    "Chennai": "Asia/Kolkata",
    "Mumbai": "Asia/Kolkata",
    "New Delhi": "Asia/Kolkata",
    "Beijing": "Asia/Shanghai",
    "Hong Kong": "Asia/Hong_Kong",
    "Edinburgh": "Europe/London",
    "Osaka": "Asia/Tokyo",
    "Sapporo": "Asia/Tokyo",
    "Wellington": "Pacific/Auckland",
    "UTC": "UTC",
}


@lru_cache(maxsize=512)
def iana_zone(name: str | None) -> str | None:
    """An IANA zone for Freshdesk's time zone name; None when there is no sure match."""
    if not name:
        return None
    if name in _RAILS_ZONES:
        return _RAILS_ZONES[name]
    if "/" in name:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder
            return None
        return name
    suffix = "/" + name.replace(" ", "_")
    matches = sorted(z for z in zoneinfo.available_timezones() if z.endswith(suffix))
    return matches[0] if len(matches) == 1 else None


def _str(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list | bool):
        return None
    text = str(value).strip()
    return text or None


class FreshdeskResolver:
    """The requester's contact details: ``GET /api/v2/contacts/{id}`` (Basic ``api_key:X``)."""

    name: ClassVar[str] = "freshdesk"

    def __init__(self, settings: FreshdeskSettings) -> None:
        base = settings.api_base()
        if settings.api_key is None or base is None:
            raise ValueError("KAIKU_FRESHDESK_API_KEY and KAIKU_FRESHDESK_DOMAIN are required")
        self.base = base
        self._auth = (settings.api_key.get_secret_value(), "X")
        self._cache: TtlCache[tuple[Contact | None]] = TtlCache(settings.cache_ttl_seconds)

    async def resolve(self, event: CloudEvent, http: httpx.AsyncClient) -> Contact | None:
        contact_id = event.data.customer.id
        if not contact_id.isdigit():  # Freshdesk contact ids are numbers
            return None
        cached = self._cache.get(contact_id)
        if cached is not None:
            return cached[0]
        body = await get_json(http, f"{self.base}/api/v2/contacts/{contact_id}", auth=self._auth)
        contact = None if body is None else _contact(body)
        self._cache.put(contact_id, (contact,))
        return contact


def _contact(body: Mapping[str, Any]) -> Contact:
    return Contact(
        email=normalize_email(body.get("email")),
        phone=normalize_phone(body.get("mobile")) or normalize_phone(body.get("phone")),
        locale=_str(body.get("language")),
        timezone=iana_zone(_str(body.get("time_zone"))),
        account_id=_str(body.get("company_id")),
    )


def resolver_from_env() -> FreshdeskResolver | None:
    settings = FreshdeskSettings()
    if settings.api_key is None or settings.api_base() is None:
        return None
    return FreshdeskResolver(settings)
