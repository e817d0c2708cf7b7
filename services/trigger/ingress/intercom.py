"""``intercom``: Intercom webhook notifications, signed with the app's client secret.

Signature (https://developers.intercom.com/docs/webhooks/setting-up-webhooks, "Signed
notifications"; https://developers.intercom.com/intercom-api-reference/v1.0/reference/signed-notifications):
every notification carries ``X-Hub-Signature: sha1=<hex>``, the hexadecimal (40 characters)
HMAC-SHA1 (RFC 2104) of the raw JSON body keyed with the app's ``client_secret`` (Developer Hub >
your app > Basic information). ``KAIKU_INTERCOM_WEBHOOK_SECRET`` is that client secret; several may
be given separated by commas (one per app sending to kaiku, or during a rotation).

Freshness. Intercom sends no signed timestamp header, so the signature alone cannot stop a replay.
The body's ``created_at`` (Unix seconds, "the timestamp the notification was created") is covered by
the signature, so notifications created more than ``KAIKU_INTERCOM_TOLERANCE_SECONDS`` away from our
clock are refused. The default, 7200 s, is Intercom's documented longest delivery delay: throttled
notifications are retried for up to 2 hours and then dropped
(https://developers.intercom.com/docs/webhooks/webhook-notifications). Notifications that Intercom
queues during its own outages may arrive later than that and would be refused; raise the tolerance
if that matters more than replays (a replay keeps its event id, so it is also deduplicated).

Payload (https://developers.intercom.com/docs/references/2.11/webhooks/webhook-models, "Webhook
notification object"): ``{"type": "notification_event", "app_id", "id": "notif_…", "topic":
"conversation.admin.closed", "created_at", "first_sent_at", "delivery_attempts", "data": {"type":
"notification_event_data", "item": {...}}}``. The item of a conversation topic is a Conversation of
the app's API version (2.x: ``{"type": "conversation", "id", "state", "source": {"type",
"delivered_as", "author"}, "contacts": {"type": "contact.list", "contacts": [{"type": "contact",
"id", "external_id"}]}, "admin_assignee_id", "team_assignee_id", "priority", ...}``). Resent
notifications keep their ``id``, the idempotency key. The vendor type is the ``topic``.

Intercom validates the endpoint URL with a HEAD request when it is saved; the webhook route answers
POST only (see docs/webhooks/intercom.md).

Contact look-up (https://developers.intercom.com/docs/references/2.11/rest-api/api.intercom.io/contacts/showcontact):
``GET https://api.intercom.io/contacts/{id}`` (``api.eu.intercom.io`` and ``api.au.intercom.io`` for
EU and Australian workspaces) with ``Authorization: Bearer <access token>`` and an
``Intercom-Version`` header answers a Contact: ``email``, ``phone``, ``language_override``,
``browser_language``, ``companies: {"data": [{"id"}]}``. Contacts have no time zone field. 404 means
no such contact; 429 is the rate limit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
from fastapi.responses import Response
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.events import CloudEvent
from services.common.webhooks import hmac_digest, require_fresh, required_signing_keys, same
from services.trigger.ingress import (
    Contact,
    LookupFailed,
    WebhookRequest,
    json_body,
    malformed,
    unauthorized,
)
from services.trigger.ingress.lookup import TtlCache, get_json

SIGNATURE_HEADER = "x-hub-signature"


class IntercomSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_INTERCOM_", extra="ignore")

    # The app's client_secret (Developer Hub > Basic information); comma-separated for several.
    webhook_secret: SecretStr | None = None
    tolerance_seconds: float = 7200.0
    # The CloudEvents source: intercom://<workspace>.
    workspace: str = "default"
    source: str | None = None
    api_base_url: str = "https://api.intercom.io"
    # An access token of the app (Developer Hub > Authentication) with "Read one user" or
    # "Read users and companies" permission.
    access_token: SecretStr | None = None
    api_version: str = "2.11"
    cache_ttl_seconds: float = 300.0


def sign(secret: str, body: bytes) -> str:
    """The ``X-Hub-Signature`` of a notification (what Intercom computes)."""
    return "sha1=" + hmac_digest(secret.encode(), body, "sha1").hex()


def _created_at(body: bytes) -> float | None:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None  # items() answers 400
    value = parsed.get("created_at") if isinstance(parsed, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class Intercom:
    name: ClassVar[str] = "intercom"
    CONTENT_TYPES: ClassVar[tuple[str, ...]] = ("application/json",)
    DEFAULT_MAPPING: ClassVar[dict[str, str]] = {
        "time": "created_at",
        "customer_id": "data.item.contacts.contacts.0.id",
        "channel": "data.item.source.type",
        "team": "data.item.team_assignee_id",
        "agent": "data.item.admin_assignee_id",
        "case_id": "data.item.id",
        "attributes.external_id": "data.item.contacts.contacts.0.external_id",
        "attributes.priority": "data.item.priority",
    }
    DEFAULT_TYPES: ClassVar[dict[str, str]] = {
        "conversation.admin.closed": "chat.ended",
        "conversation.admin.opened": "chat.reopened",
    }
    PASS_THROUGH_TYPES: ClassVar[bool] = False

    def __init__(self, settings: IntercomSettings) -> None:
        self._keys = required_signing_keys(settings.webhook_secret, "KAIKU_INTERCOM_WEBHOOK_SECRET")
        self.settings = settings

    def verify(self, request: WebhookRequest) -> None:
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            raise unauthorized("X-Hub-Signature is required")
        given = signature.strip().lower()
        if not any(
            same(given, "sha1=" + hmac_digest(key, request.body, "sha1").hex())
            for key in self._keys
        ):
            raise unauthorized("X-Hub-Signature does not match the body")
        created_at = _created_at(request.body)
        if created_at is not None:
            require_fresh(
                created_at,
                request.received_at,
                self.settings.tolerance_seconds,
                "the notification's created_at",
            )

    def items(self, request: WebhookRequest) -> list[dict[str, Any]]:
        body = json_body(request)
        if not isinstance(body, dict):
            raise malformed("expected a notification_event object")
        if not isinstance(body.get("topic"), str):
            raise malformed("a notification_event needs a topic")
        if not isinstance(body.get("data", {}), dict):
            raise malformed("a notification_event's data must be an object")
        return [body]

    def vendor_type(self, item: Mapping[str, Any]) -> str | None:
        topic = item.get("topic")
        return topic if isinstance(topic, str) else None

    def event_id(self, item: Mapping[str, Any]) -> str | None:
        value = item.get("id")
        return str(value) if value not in (None, "") else None

    def source(self) -> str:
        return self.settings.source or f"intercom://{self.settings.workspace}"

    def acknowledge(self, accepted: list[str]) -> Response | None:
        return None


def from_env() -> Intercom | None:
    settings = IntercomSettings()
    return Intercom(settings) if settings.webhook_secret is not None else None


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, bool | Mapping | list):
        return None
    text = str(value).strip()
    return text or None


def _first_company(contact: Mapping[str, Any]) -> str | None:
    companies = contact.get("companies")
    data = companies.get("data") if isinstance(companies, Mapping) else None
    if isinstance(data, list) and data and isinstance(data[0], Mapping):
        return _text(data[0].get("id"))
    return None


class IntercomResolver:
    """The contact's email, phone, language and first company, from "Retrieve a contact"."""

    name: ClassVar[str] = "intercom"

    def __init__(self, settings: IntercomSettings) -> None:
        if settings.access_token is None:
            raise ValueError("KAIKU_INTERCOM_ACCESS_TOKEN is not set")
        self._base = settings.api_base_url.rstrip("/")
        self._headers = {
            "Authorization": f"Bearer {settings.access_token.get_secret_value()}",
            "Intercom-Version": settings.api_version,
            "Accept": "application/json",
        }
        # A hit holds (contact,) — (None,) remembers that Intercom does not know the contact.
        self._cache: TtlCache[tuple[Contact | None]] = TtlCache(settings.cache_ttl_seconds)

    async def resolve(self, event: CloudEvent, http: httpx.AsyncClient) -> Contact | None:
        contact_id = event.data.customer.id
        cached = self._cache.get(contact_id)
        if cached is not None:
            return cached[0]
        body = await get_json(
            http, f"{self._base}/contacts/{quote(contact_id, safe='')}", headers=self._headers
        )
        contact = None
        if body is not None:
            if body.get("type") != "contact":
                raise LookupFailed("Intercom's Retrieve a contact answered without a contact")
            contact = Contact(
                email=_text(body.get("email")),
                phone=_text(body.get("phone")),
                locale=_text(body.get("language_override")) or _text(body.get("browser_language")),
                timezone=None,
                account_id=_first_company(body),
            )
        self._cache.put(contact_id, (contact,))
        return contact


def resolver_from_env() -> IntercomResolver | None:
    settings = IntercomSettings()
    return IntercomResolver(settings) if settings.access_token is not None else None
