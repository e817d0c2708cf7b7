"""``zendesk``: Zendesk Support webhooks, signed with the webhook's signing secret.

Signature (https://developer.zendesk.com/documentation/webhooks/verifying/ and
https://developer.zendesk.com/documentation/webhooks/anatomy-of-a-webhook-request/): every request
carries ``X-Zendesk-Webhook-Signature`` = base64(HMAC-SHA256(signing secret, TIMESTAMP + BODY)) and
``X-Zendesk-Webhook-Signature-Timestamp``, an ISO 8601 time such as ``2021-03-25T05:09:27Z``.
The key is the signing secret exactly as Admin Center shows it (its text, not base64-decoded); the
signed message is the timestamp header's text immediately followed by the raw body (no
separator). Zendesk says the signature guards against replays but documents no window, so
requests whose timestamp is more than ``KAIKU_ZENDESK_TOLERANCE_SECONDS`` (default 300) away from
our clock are refused.

Each webhook has its own signing secret, and one webhook is either subscribed to Zendesk events or
connected to triggers, never both
(https://developer.zendesk.com/documentation/webhooks/creating-and-monitoring-webhooks/).
``KAIKU_ZENDESK_WEBHOOK_SECRET`` may therefore hold several secrets separated by commas (signing
secrets never contain a comma); any of them verifies.

Not confirmed: one older revision of the verifying page wrote the recipe as BODY + TIMESTAMP and
published a sample (secret ``HRkRd4BeOAoUkfZr-mhauJT64rvBASlJRoIyPsd3zeA=``, body
``{"say": "hello"}``, timestamp ``2021-07-25T10:00:00Z``, signature
``tRDSF7URY8BLCDlaBcQ7FHu051Zk+aAB0NKMP53teMw=``) that matches body + timestamp. The current page,
Zendesk's own Node example and public implementations all sign TIMESTAMP + BODY, which is what is
checked here.

Payloads. Two shapes, one mapping:

* Event-subscribed webhooks send Zendesk's event envelope
  (https://developer.zendesk.com/api-reference/webhooks/event-types/webhook-event-types/ and
  .../event-types/ticket-events/): ``{"type": "zen:event-type:ticket.status_changed",
  "id": "<uuid>", "time", "account_id", "subject": "zen:ticket:<id>", "detail": {"id",
  "requester_id", "organization_id", "assignee_id", "group_id", "priority", "status",
  "via": {"channel"}, ...}, "event": {"current": "SOLVED", "previous": "OPEN"}}``.
* Trigger webhooks send whatever JSON body the admin writes. The recommended body (see
  docs/webhooks/zendesk.md) mirrors the event envelope, with the status typed as a literal (the
  ``{{ticket.status}}`` placeholder is translated into the requester's language) and the requester's
  contact details from placeholders under ``requester``. It has no ``id``: the request's
  ``X-Zendesk-Webhook-Invocation-Id`` header (one per trigger firing) becomes the event id.

The vendor type of a ``ticket.status_changed`` item is its new status in lower case (``solved``,
``closed``, ...) or ``reopened`` when a solved or closed ticket became new, open, pending or
on-hold; any other item's vendor type is its ``type``.

Contact look-up (https://developer.zendesk.com/api-reference/ticketing/users/users/ "Show User"):
``GET https://{subdomain}.zendesk.com/api/v2/users/{user_id}`` answers ``{"user": {"email",
"phone", "locale", "time_zone", "iana_time_zone", "organization_id", ...}}``, authenticated with
HTTP Basic ``{email}/token:{api_token}`` (or ``Authorization: Bearer`` with an OAuth token)
(https://developer.zendesk.com/api-reference/introduction/security-and-auth/). 404 means no such
user; 429 carries ``Retry-After``
(https://developer.zendesk.com/documentation/ticketing/using-the-zendesk-api/best-practices-for-avoiding-rate-limiting/).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
from fastapi.responses import Response
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.events import CloudEvent
from services.common.webhooks import b64, hmac_digest, require_fresh, required_signing_keys, same
from services.trigger.ingress import (
    Contact,
    LookupFailed,
    WebhookRequest,
    json_body,
    malformed,
    unauthorized,
)
from services.trigger.ingress.lookup import TtlCache, get_json

SIGNATURE_HEADER = "x-zendesk-webhook-signature"
TIMESTAMP_HEADER = "x-zendesk-webhook-signature-timestamp"
INVOCATION_HEADER = "x-zendesk-webhook-invocation-id"
STATUS_CHANGED = "zen:event-type:ticket.status_changed"
_DONE = ("solved", "closed")
_ACTIVE = ("new", "open", "pending", "hold", "on-hold")


class ZendeskSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_ZENDESK_", extra="ignore")

    # The webhook's signing secret (Admin Center > Webhooks > the webhook > Reveal secret); several
    # separated by commas when more than one webhook (or a rotation) points at kaiku.
    webhook_secret: SecretStr | None = None
    tolerance_seconds: float = 300.0
    # Your Zendesk subdomain (acme for acme.zendesk.com): the events' source and the API's host.
    subdomain: str | None = None
    # The CloudEvents source; zendesk://<subdomain> when unset.
    source: str | None = None
    # The API's base URL; https://<subdomain>.zendesk.com when unset.
    api_base_url: str | None = None
    # API token authentication: an agent's or admin's email address and an API token ...
    api_email: str | None = None
    api_token: SecretStr | None = None
    # ... or an OAuth access token.
    oauth_token: SecretStr | None = None
    cache_ttl_seconds: float = 300.0

    def base_url(self) -> str | None:
        if self.api_base_url:
            return self.api_base_url.rstrip("/")
        return f"https://{self.subdomain}.zendesk.com" if self.subdomain else None


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Zendesk-Webhook-Signature`` of a request (what Zendesk computes)."""
    return b64(hmac_digest(secret.encode(), timestamp.encode() + body))


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _lower(value: Any) -> str | None:
    return value.strip().lower() if isinstance(value, str) and value.strip() else None


class Zendesk:
    name: ClassVar[str] = "zendesk"
    CONTENT_TYPES: ClassVar[tuple[str, ...]] = ("application/json",)
    DEFAULT_MAPPING: ClassVar[dict[str, str]] = {
        "time": "time",
        "customer_id": "detail.requester_id",
        "email": "requester.email",
        "phone": "requester.phone",
        "locale": "requester.locale",
        "account_id": "detail.organization_id",
        "channel": "detail.via.channel",
        "team": "detail.group_id",
        "agent": "detail.assignee_id",
        "case_id": "detail.id",
        "attributes.priority": "detail.priority",
    }
    DEFAULT_TYPES: ClassVar[dict[str, str]] = {
        "solved": "ticket.solved",
        "closed": "ticket.closed",
        "reopened": "ticket.reopened",
    }
    PASS_THROUGH_TYPES: ClassVar[bool] = False

    def __init__(self, settings: ZendeskSettings) -> None:
        self._keys = required_signing_keys(settings.webhook_secret, "KAIKU_ZENDESK_WEBHOOK_SECRET")
        self.settings = settings

    def verify(self, request: WebhookRequest) -> None:
        signature = request.headers.get(SIGNATURE_HEADER)
        timestamp = request.headers.get(TIMESTAMP_HEADER)
        if not (signature and timestamp):
            raise unauthorized(
                "X-Zendesk-Webhook-Signature and X-Zendesk-Webhook-Signature-Timestamp are required"
            )
        try:
            signed_at = _parse_time(timestamp)
        except ValueError:
            raise unauthorized(
                "X-Zendesk-Webhook-Signature-Timestamp is not an ISO 8601 time"
            ) from None
        require_fresh(
            signed_at.timestamp(),
            request.received_at,
            self.settings.tolerance_seconds,
            "X-Zendesk-Webhook-Signature-Timestamp",
        )
        message = timestamp.encode() + request.body
        for key in self._keys:
            if same(signature, b64(hmac_digest(key, message))):
                return
        raise unauthorized("X-Zendesk-Webhook-Signature does not match the body")

    def items(self, request: WebhookRequest) -> list[dict[str, Any]]:
        body = json_body(request)
        if not isinstance(body, dict):
            raise malformed("expected a JSON object")
        if body.get("id") in (None, ""):
            invocation = request.headers.get(INVOCATION_HEADER)
            if invocation:
                body = {**body, "id": invocation}
        return [body]

    def vendor_type(self, item: Mapping[str, Any]) -> str | None:
        kind = item.get("type")
        if kind != STATUS_CHANGED:
            return kind if isinstance(kind, str) else None
        event = item.get("event")
        detail = item.get("detail")
        current = previous = None
        if isinstance(event, Mapping):
            current, previous = _lower(event.get("current")), _lower(event.get("previous"))
        if current is None and isinstance(detail, Mapping):
            current = _lower(detail.get("status"))
        if current in _ACTIVE and previous in _DONE:
            return "reopened"
        return current

    def event_id(self, item: Mapping[str, Any]) -> str | None:
        value = item.get("id")
        return str(value) if value not in (None, "") else None

    def source(self) -> str:
        if self.settings.source:
            return self.settings.source
        return f"zendesk://{self.settings.subdomain or 'default'}"

    def acknowledge(self, accepted: list[str]) -> Response | None:
        return None


def from_env() -> Zendesk | None:
    settings = ZendeskSettings()
    return Zendesk(settings) if settings.webhook_secret is not None else None


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, bool | Mapping | list):
        return None
    text = str(value).strip()
    return text or None


class ZendeskResolver:
    """The requester's email, phone, locale, IANA time zone and organization, from Show User."""

    name: ClassVar[str] = "zendesk"

    def __init__(self, settings: ZendeskSettings) -> None:
        base = settings.base_url()
        if base is None:
            raise ValueError("set KAIKU_ZENDESK_SUBDOMAIN or KAIKU_ZENDESK_API_BASE_URL")
        self._base = base
        self._auth: tuple[str, str] | None = None
        self._headers = {"Accept": "application/json"}
        if settings.oauth_token is not None:
            self._headers["Authorization"] = f"Bearer {settings.oauth_token.get_secret_value()}"
        elif settings.api_email and settings.api_token is not None:
            self._auth = (f"{settings.api_email}/token", settings.api_token.get_secret_value())
        else:
            raise ValueError(
                "set KAIKU_ZENDESK_API_EMAIL and KAIKU_ZENDESK_API_TOKEN, "
                "or KAIKU_ZENDESK_OAUTH_TOKEN"
            )
        # A hit holds (contact,) — (None,) remembers that Zendesk does not know the user.
        self._cache: TtlCache[tuple[Contact | None]] = TtlCache(settings.cache_ttl_seconds)

    async def resolve(self, event: CloudEvent, http: httpx.AsyncClient) -> Contact | None:
        user_id = event.data.customer.id
        cached = self._cache.get(user_id)
        if cached is not None:
            return cached[0]
        body = await get_json(
            http,
            f"{self._base}/api/v2/users/{quote(user_id, safe='')}",
            headers=self._headers,
            auth=self._auth,
        )
        contact = None
        if body is not None:
            user = body.get("user")
            if not isinstance(user, Mapping):
                raise LookupFailed("Zendesk's Show User answered without a user object")
            contact = Contact(
                email=_text(user.get("email")),
                phone=_text(user.get("phone")),
                locale=_text(user.get("locale")),
                timezone=_text(user.get("iana_time_zone")),
                account_id=_text(user.get("organization_id")),
            )
        self._cache.put(user_id, (contact,))
        return contact


def resolver_from_env() -> ZendeskResolver | None:
    settings = ZendeskSettings()
    has_auth = settings.oauth_token is not None or (
        settings.api_email is not None and settings.api_token is not None
    )
    if not has_auth or settings.base_url() is None:
        return None
    return ZendeskResolver(settings)
